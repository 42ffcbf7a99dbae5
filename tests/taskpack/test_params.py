from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pfl.errors import ValidationError
from p2pfl.taskpack.manifest import load_manifest
from p2pfl.taskpack.params import effective_federated, load_params, parse_param_args

from .helpers import manifest_yaml

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "lr": {"type": "number", "exclusiveMinimum": 0},
        "label": {"type": "string"},
        "model": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "hidden": {"type": "integer", "minimum": 1},
                "dropout": {"type": "number", "default": 0.1},
            },
        },
        "verbose": {"type": "boolean", "default": False},
    },
}


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text("lr: 0.1\nlabel: y\nmodel:\n  hidden: 16\n")
    (tmp_path / "configs" / "schema.json").write_text(json.dumps(SCHEMA))
    return tmp_path


def test_defaults_and_schema_defaults(pack: Path) -> None:
    assert load_params(pack, {}) == {
        "lr": 0.1,
        "label": "y",
        "model": {"hidden": 16, "dropout": 0.1},
        "verbose": False,
    }


def test_overrides_are_yaml_scalars_with_dotted_keys(pack: Path) -> None:
    params = load_params(
        pack,
        {"lr": "0.5", "model.hidden": "32", "verbose": "true", "label": "income", "rounds": "5"},
    )
    assert params["lr"] == 0.5 and params["model"]["hidden"] == 32
    assert params["verbose"] is True and params["label"] == "income"
    assert params["rounds"] == 5  # federated key: allowed even though the schema omits it


def test_every_problem_listed_by_path(pack: Path) -> None:
    with pytest.raises(ValidationError) as info:
        load_params(
            pack,
            {
                "lr": "-1",
                "model.hidden": "many",
                "model.depth": "3",
                "colour": "red",
                "rounds": "0",
            },
        )
    assert info.value.problems == [
        "colour: unknown field",
        "lr: -1 is less than or equal to the minimum of 0",
        "model.depth: unknown field",
        "model.hidden: 'many' is not of type 'integer'",
        "rounds: 0 is less than the minimum of 1",
    ]


def test_override_into_a_scalar_is_refused(pack: Path) -> None:
    with pytest.raises(ValidationError, match="lr.x: cannot set inside lr"):
        load_params(pack, {"lr.x": "1"})


def test_missing_configs_mean_no_params(tmp_path: Path) -> None:
    assert load_params(tmp_path, {"anything": "[1, 2]"}) == {"anything": [1, 2]}


def test_bad_schema_file_is_reported(pack: Path) -> None:
    (pack / "configs" / "schema.json").write_text('{"type": 5}')
    with pytest.raises(ValidationError, match="configs/schema.json: not a valid JSON Schema"):
        load_params(pack, {})


def test_parse_param_args() -> None:
    assert parse_param_args(["rounds=5", "a.b=x=y", "e="]) == {"rounds": "5", "a.b": "x=y", "e": ""}
    with pytest.raises(ValidationError, match="expected KEY=VALUE"):
        parse_param_args(["novalue"])


def test_effective_federated_overrides_manifest(tmp_path: Path) -> None:
    manifest = load_manifest(manifest_yaml())
    fed = effective_federated(manifest, {"rounds": 5, "differential_privacy": {"epsilon": 1.0}})
    assert fed["rounds"] == 5 and fed["min_nodes"] == 2 and fed["protocol"] == "fedprox"
    assert fed["differential_privacy"] == {
        "enabled": True,
        "epsilon": 1.0,
        "delta": 1e-5,
        "max_grad_norm": 1.0,
    }
    assert effective_federated(manifest, {})["rounds"] == 3
    with pytest.raises(ValidationError) as info:
        effective_federated(manifest, {"max_nodes": 1, "aggregator": "mode"})
    assert info.value.problems == [
        "aggregator: 'mode' is not one of ['fedavg', 'median', 'trimmed_mean', 'krum']",
        "max_nodes: must be >= min_nodes (1 < 2)",
    ]
