"""Flow files: parsed, checked with every problem by path, resolved against taskpacks."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfl.errors import ValidationError
from p2pfl.flow.spec import apply_overrides, load_flow, parse_flow, resolve_flow

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "flows" / "heart-disease.yaml"


def test_the_example_flow_loads_and_resolves() -> None:
    spec = load_flow(FLOW)
    assert spec.name == "heart-disease" and spec.datasets == ("heart",)
    assert [s.name for s in spec.steps] == ["standardise", "train", "validate"]
    assert spec.steps[0].inputs == ("heart",) and spec.steps[0].output == "heart_std"
    assert spec.steps[1].params == {"rounds": "20", "lr": "0.05"}
    assert spec.steps[2].model == "train"
    resolved = resolve_flow(spec)
    assert [r.type for r in resolved] == ["preprocessing", "training", "analysis"]
    assert resolved[1].params["rounds"] == 20


def test_every_schema_problem_is_listed_by_path() -> None:
    doc = {
        "name": "bad name!",
        "datasets": ["heart", "heart"],
        "steps": [
            {"name": "a", "taskpack": "x", "output": "Bad-Name"},
            {"taskpack": "y", "extra": 1},
        ],
        "other": True,
    }
    with pytest.raises(ValidationError) as err:
        parse_flow(doc)
    problems = err.value.problems
    assert any(p.startswith("name:") for p in problems)
    assert any(p.startswith("datasets:") for p in problems)
    assert any(p.startswith("steps[0].output:") for p in problems)
    assert "steps[1].name: is required" in problems
    assert "steps[1].extra: unknown field" in problems
    assert "other: unknown field" in problems


def test_every_rule_between_steps_is_listed_by_path() -> None:
    doc = {
        "name": "f",
        "datasets": ["heart"],
        "steps": [
            {"name": "a", "taskpack": "t", "output": "heart"},
            {"name": "a", "taskpack": "t", "input": "nowhere", "model": "later"},
            {"name": "later", "taskpack": "t", "input": ["heart", "ghost"]},
        ],
    }
    with pytest.raises(ValidationError) as err:
        parse_flow(doc)
    problems = err.value.problems
    assert any(p.startswith("steps[0].output:") and "already" in p for p in problems)
    assert any(p.startswith("steps[1].name:") and "used by steps[0]" in p for p in problems)
    assert any(p.startswith("steps[1].input:") and "'nowhere'" in p for p in problems)
    assert any(p.startswith("steps[1].model:") and "earlier step" in p for p in problems)
    assert any(p.startswith("steps[2].input[1]:") and "'ghost'" in p for p in problems)


def test_a_step_without_input_reads_the_last_output_or_the_flow_dataset() -> None:
    spec = parse_flow(
        {
            "name": "f",
            "datasets": ["d"],
            "steps": [
                {"name": "a", "taskpack": "t"},
                {"name": "b", "taskpack": "t", "output": "o1"},
                {"name": "c", "taskpack": "t"},
            ],
        }
    )
    assert [s.inputs for s in spec.steps] == [("d",), ("d",), ("o1",)]


def test_overrides_name_a_step(tmp_path: Path) -> None:
    spec = apply_overrides(load_flow(FLOW), {"train.rounds": "3", "validate.split_seed": "1"})
    assert spec.steps[1].params["rounds"] == "3" and spec.steps[1].params["lr"] == "0.05"
    assert spec.steps[2].params == {"split_seed": "1"}
    with pytest.raises(ValidationError, match="STEP.KEY"):
        apply_overrides(spec, {"nosuch.rounds": "1", "rounds": "2"})
    with pytest.raises(ValidationError) as err:
        resolve_flow(apply_overrides(load_flow(FLOW), {"train.rounds": "zero"}))
    assert any(p.startswith("steps[1].taskpack") and "rounds" in p for p in err.value.problems)


def test_resolve_checks_each_step_against_its_taskpack(tmp_path: Path) -> None:
    flow = tmp_path / "f.yaml"
    flow.write_text(
        f"""
name: f
datasets: [heart]
steps:
  - {{name: a, taskpack: {ROOT}/taskpacks/fedavg-mlp-tabular, output: x}}
  - {{name: b, taskpack: {ROOT}/taskpacks/standardize, input: x}}
  - {{name: c, taskpack: {ROOT}/taskpacks/evaluate-model, input: heart, model: b}}
  - {{name: d, taskpack: {tmp_path}/missing, input: heart}}
"""
    )
    with pytest.raises(ValidationError) as err:
        resolve_flow(load_flow(flow))
    problems = err.value.problems
    assert "steps[0].output: a training taskpack writes no dataset" in problems
    assert "steps[1].output: a preprocessing step names its output dataset" in problems
    assert any(p.startswith("steps[3].taskpack") for p in problems)


def test_unreadable_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read"):
        load_flow(tmp_path / "nope.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 300_000)
    with pytest.raises(ValidationError, match="bytes"):
        load_flow(big)
    alias = tmp_path / "alias.yaml"
    alias.write_text("name: &a f\nsteps: *a\n")
    with pytest.raises(ValidationError, match="YAML"):
        load_flow(alias)


def test_flow_check_command(tmp_path: Path) -> None:
    import json

    from p2pfl.cli.main import cli

    runner = CliRunner()
    ok = runner.invoke(cli, ["flow", "check", str(FLOW), "--json"])
    assert ok.exit_code == 0, ok.output
    assert [s["type"] for s in json.loads(ok.output)["steps"]] == [
        "preprocessing",
        "training",
        "analysis",
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: f\nsteps:\n  - {name: a, taskpack: t, input: ghost}\n")
    out = runner.invoke(cli, ["flow", "check", str(bad)])
    assert out.exit_code == 1
    assert "steps[0].input" in out.output
    helped = runner.invoke(cli, ["flow", "run", "--help"])
    assert helped.exit_code == 0 and "STEP.KEY=VALUE" in helped.output
