"""The taskpack manifest (``manifest.yaml``): schema, validation and a typed, frozen view.

``load_manifest`` validates the whole document and raises ``ValidationError`` listing every
problem by path; on success it returns a ``Manifest`` whose fields have defaults filled in
and whose ``raw`` dict is the document exactly as written. ``canonical_bytes()`` (sorted keys,
no spaces, UTF-8 JSON of ``raw``) is what a publisher signs and what a node compares.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeGuard

import yaml
from jsonschema import Draft202012Validator

from p2pfl.errors import ValidationError
from p2pfl.taskpack._schema import (
    FORMAT_CHECKER,
    canonical_json,
    json_problems,
    load_yaml,
    parse_size,
    schema_problems,
)

__all__ = [
    "MANIFEST_FILE",
    "MAX_MANIFEST_BYTES",
    "DifferentialPrivacy",
    "Federated",
    "IOSpec",
    "LLMConfig",
    "Limits",
    "LoRAConfig",
    "Manifest",
    "Metadata",
    "Requirements",
    "Spec",
    "federated_problems",
    "load_manifest",
    "manifest_schema",
    "parse_size",
]

MANIFEST_FILE = "manifest.yaml"
# A manifest travels on GossipSub (frames of about 1 MiB); real ones are a few KiB.
MAX_MANIFEST_BYTES = 64 * 1024


@functools.cache
def manifest_schema() -> dict[str, Any]:
    """The JSON Schema (Draft 2020-12) of a manifest, from manifest.schema.json."""
    text = resources.files("p2pfl.taskpack").joinpath("manifest.schema.json").read_text("utf-8")
    return json.loads(text)


@functools.cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(manifest_schema(), format_checker=FORMAT_CHECKER)


@dataclass(frozen=True)
class Metadata:
    name: str
    version: str
    author: str
    description: str


@dataclass(frozen=True)
class Requirements:
    python: str = ""  # a PEP 440 specifier such as ">=3.11"; "" accepts any
    gpu: str = "none"  # required | optional | none
    memory_bytes: int = 0  # 0: not stated
    storage_bytes: int = 0


@dataclass(frozen=True)
class IOSpec:
    name: str  # for inputs: the dataset name a node must have registered
    type: str  # e.g. tabular, image, weights
    format: str  # e.g. csv, parquet, npz


@dataclass(frozen=True)
class DifferentialPrivacy:
    enabled: bool = False
    epsilon: float | None = None  # required when enabled
    delta: float = 1e-5
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class Federated:
    min_nodes: int
    max_nodes: int
    protocol: str = "fedavg"  # fedavg | fedprox | gossip
    rounds: int = 1
    local_epochs: int = 1
    mu: float = 0.0  # FedProx proximal weight
    aggregator: str = "fedavg"  # fedavg | median | trimmed_mean | krum
    fanout: int = 2  # gossip peers per round
    deadline_s: float | None = None  # per-round deadline; None: the node's default
    # Versions with equal model schemas may be averaged together (core/versions.py);
    # None: the name and the semver-compatible part of the version (1.x, 0.3.x).
    model_schema: str | None = None
    differential_privacy: DifferentialPrivacy = field(default_factory=DifferentialPrivacy)


@dataclass(frozen=True)
class LoRAConfig:
    r: int
    target_modules: tuple[str, ...]  # module names to adapt, e.g. (q_proj, v_proj)
    lora_alpha: float = 8.0  # peft's defaults where the manifest says nothing
    lora_dropout: float = 0.0
    bias: str = "none"  # none | all | lora_only


@dataclass(frozen=True)
class LLMConfig:
    """A pretrained language model the task fine-tunes (spec.llm_config)."""

    base_model: str  # e.g. sentence-transformers/all-MiniLM-L6-v2
    training_method: str  # lora
    lora: LoRAConfig | None = None
    base_model_package: str = ""  # the package that ships the weights offline
    base_model_sha256: str = ""  # of the weights file: every node fine-tunes the same base


@dataclass(frozen=True)
class Spec:
    type: str  # training | analysis | inference | preprocessing
    framework: str
    requirements: Requirements
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    federated: Federated
    llm_config: LLMConfig | None = None


@dataclass(frozen=True)
class Limits:
    """Resource limits for the child process that runs the task (None: node default)."""

    cpu_seconds: int | None = None
    memory_bytes: int | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class Manifest:
    api_version: str
    kind: str
    metadata: Metadata
    spec: Spec
    limits: Limits
    # The document exactly as written (no defaults). Treat as read-only.
    raw: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    def canonical_bytes(self) -> bytes:
        """Deterministic JSON of `raw` (sorted keys, no spaces, UTF-8): what gets signed."""
        return canonical_json(self.raw)


def federated_problems(fed: Any, prefix: str) -> list[str]:
    """Cross-field rules JSON Schema cannot say; `fed` may be malformed (schema reports that)."""
    if not isinstance(fed, dict):
        return []
    pre = f"{prefix}." if prefix else ""
    problems = []
    lo, hi = fed.get("min_nodes"), fed.get("max_nodes")
    if _is_int(lo) and _is_int(hi) and hi < lo:
        problems.append(f"{pre}max_nodes: must be >= min_nodes ({hi} < {lo})")
    mu = fed.get("mu")
    protocol = fed.get("protocol", "fedavg")
    if _is_num(mu) and mu > 0 and protocol != "fedprox":
        problems.append(f"{pre}mu: only protocol fedprox uses mu (protocol is {protocol!r})")
    if protocol == "fedprox" and not (_is_num(mu) and mu > 0):
        # FedProx with mu 0 is plain FedAvg: refuse rather than run one under the other's name.
        problems.append(f"{pre}mu: protocol fedprox needs mu > 0 (mu 0 would be plain FedAvg)")
    dp = fed.get("differential_privacy")
    if isinstance(dp, dict) and dp.get("enabled") is True and "epsilon" not in dp:
        problems.append(f"{pre}differential_privacy.epsilon: is required when enabled")
    return problems


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problems(doc: Any) -> list[str]:
    problems = json_problems(doc) + schema_problems(_validator(), doc)
    spec = doc.get("spec") if isinstance(doc, dict) else None
    if isinstance(spec, dict):
        problems += federated_problems(spec.get("federated"), "spec.federated")
        if "llm_config" in spec and spec.get("type") != "training":
            problems.append(
                f"spec.llm_config: only a training task fine-tunes a model (type is {spec.get('type')!r})"
            )
        for key in ("inputs", "outputs"):
            items = spec.get(key)
            if isinstance(items, list):
                names = [i.get("name") for i in items if isinstance(i, dict)]
                dupes = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
                problems += [f"spec.{key}: name {n!r} appears more than once" for n in dupes]
    # Stable order and no duplicates (a value can break two rules that say the same thing).
    return sorted(set(problems))


def _read(source: str | Path | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValidationError([f"{MANIFEST_FILE}: cannot read {path}: {exc}"], "manifest") from exc


def parse_manifest_doc(data: bytes) -> Any:
    """Bytes (YAML, or canonical JSON) -> a plain document; ValidationError if unparsable."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValidationError(
            [f"(root): manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}"], "manifest"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError([f"(root): not UTF-8 text ({exc})"], "manifest") from exc
    try:
        # Canonical JSON is the common case on the wire; json is strict and fast for it.
        return json.loads(text) if text.lstrip().startswith("{") else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        try:
            return load_yaml(text)  # JSON-looking YAML (flow mapping) is still YAML
        except yaml.YAMLError:
            raise ValidationError([f"(root): not valid YAML: {exc}"], "manifest") from exc


def load_manifest(source: str | Path | bytes) -> Manifest:
    """Load and validate a manifest from a taskpack dir, a manifest file, or bytes.

    Raises ValidationError whose `problems` name every problem by path.
    """
    return _load_bytes(_read(source))


@functools.lru_cache(maxsize=256)
def _load_bytes(data: bytes) -> Manifest:
    """A pure function of the bytes (the Manifest is frozen), so it is memoised: every node
    of a simulation validates the same manifest once, not once each (3 ms of schema
    checks). Errors are not cached: they are raised again each time."""
    doc = parse_manifest_doc(data)
    problems = _problems(doc)
    if problems:
        raise ValidationError(problems, "manifest")
    return _build(doc)


def _io(items: list[dict[str, Any]]) -> tuple[IOSpec, ...]:
    return tuple(IOSpec(i["name"], i["type"], i["format"]) for i in items)


def _llm(raw: dict[str, Any] | None) -> LLMConfig | None:
    if raw is None:
        return None
    lora = raw.get("lora_config")
    return LLMConfig(
        base_model=raw["base_model"],
        training_method=raw["training_method"],
        lora=None
        if lora is None
        else LoRAConfig(
            r=lora["r"],
            target_modules=tuple(lora["target_modules"]),
            lora_alpha=float(lora.get("lora_alpha", 8.0)),
            lora_dropout=float(lora.get("lora_dropout", 0.0)),
            bias=lora.get("bias", "none"),
        ),
        base_model_package=raw.get("base_model_package", ""),
        base_model_sha256=raw.get("base_model_sha256", ""),
    )


def _build(doc: dict[str, Any]) -> Manifest:
    """The typed view of a *valid* document, defaults filled in."""
    meta, spec = doc["metadata"], doc["spec"]
    req = spec.get("requirements", {})
    fed = dict(spec["federated"])
    dp = DifferentialPrivacy(**fed.pop("differential_privacy", {}))
    lim = doc.get("limits", {})
    return Manifest(
        api_version=doc["apiVersion"],
        kind=doc["kind"],
        metadata=Metadata(meta["name"], meta["version"], meta["author"], meta["description"]),
        spec=Spec(
            type=spec["type"],
            framework=spec["framework"],
            requirements=Requirements(
                python=req.get("python", ""),
                gpu=req.get("gpu", "none"),
                memory_bytes=parse_size(req["memory"]) if "memory" in req else 0,
                storage_bytes=parse_size(req["storage"]) if "storage" in req else 0,
            ),
            inputs=_io(spec["inputs"]),
            outputs=_io(spec.get("outputs", [])),
            federated=Federated(differential_privacy=dp, **fed),
            llm_config=_llm(spec.get("llm_config")),
        ),
        limits=Limits(
            cpu_seconds=lim.get("cpu_seconds"),
            memory_bytes=parse_size(lim["memory"]) if "memory" in lim else None,
            timeout_s=lim.get("timeout_s"),
        ),
        raw=doc,
    )
