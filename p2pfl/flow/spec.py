"""Flow files: a workflow of taskpack steps, read from YAML and checked as a whole.

    name: heart-disease
    datasets: [heart]                  # the name each site registered its data under
    steps:
      - {name: standardise, taskpack: taskpacks/standardize, output: heart_std}
      - {name: train, taskpack: taskpacks/fedavg-mlp-tabular, input: heart_std,
         params: {rounds: 20}}
      - {name: validate, taskpack: taskpacks/evaluate-model, input: heart_std, model: train}

`load_flow` reports *every* problem by path (schema first, then the rules between steps:
unique names, an input is a site dataset or an earlier output, `model` names an earlier
step, output names fit the derived-dataset charset), as `ValidationError`. `resolve_flow`
then loads each step's taskpack (its manifest and parameters, with `--param STEP.KEY=VALUE`
overrides applied and checked) and reports those problems the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from p2pfl.core.flowrec import DATASET_RE, DERIVED_RE, MAX_FLOW_STEPS, NAME_RE
from p2pfl.errors import ValidationError
from p2pfl.taskpack._schema import json_problems, load_yaml, schema_problems

MAX_FLOW_FILE_BYTES = 256 * 1024

_NAME = {"type": "string", "pattern": f"^{NAME_RE.pattern}$"}
_DATASET = {"type": "string", "pattern": f"^{DATASET_RE.pattern}$"}
_SCALAR = {"type": ["string", "number", "boolean", "array", "object", "null"]}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "steps"],
    "properties": {
        "name": _NAME,
        "description": {"type": "string", "maxLength": 2000},
        "datasets": {"type": "array", "items": _DATASET, "maxItems": 16, "uniqueItems": True},
        "steps": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_FLOW_STEPS,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "taskpack"],
                "properties": {
                    "name": _NAME,
                    "taskpack": {"type": "string", "minLength": 1, "maxLength": 1000},
                    "input": {
                        "oneOf": [
                            _DATASET,
                            {"type": "array", "items": _DATASET, "minItems": 1, "maxItems": 8},
                        ]
                    },
                    "output": {"type": "string", "pattern": f"^{DERIVED_RE.pattern}$"},
                    "model": _NAME,
                    "params": {
                        "type": "object",
                        "maxProperties": 64,
                        "additionalProperties": _SCALAR,
                    },
                },
            },
        },
    },
}
_VALIDATOR = Draft202012Validator(SCHEMA)


@dataclass(frozen=True)
class StepSpec:
    name: str
    taskpack: str  # a taskpack directory, as written in the flow file
    inputs: tuple[str, ...]
    output: str = ""
    model: str = ""
    params: dict[str, str] = field(default_factory=dict)  # overrides, as --param strings


@dataclass(frozen=True)
class FlowSpec:
    name: str
    datasets: tuple[str, ...]
    steps: tuple[StepSpec, ...]
    path: Path | None = None  # the file it was read from (taskpack dirs resolve near it)
    description: str = ""


def _param_text(value: Any) -> str:
    """A flow file's parameter value as `--param` text (YAML scalars round-trip)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def parse_flow(doc: Any, path: Path | None = None) -> FlowSpec:
    """A FlowSpec from a parsed document; ValidationError lists every problem by path."""
    problems = json_problems(doc)
    if not problems:
        problems = schema_problems(_VALIDATOR, doc)
    if problems:
        raise ValidationError(problems, "flow")
    datasets = tuple(doc.get("datasets") or ())
    steps: list[StepSpec] = []
    seen: list[str] = []
    outputs: dict[str, int] = {}
    for i, raw in enumerate(doc["steps"]):
        where = f"steps[{i}]"
        name = raw["name"]
        if name in seen:
            problems.append(f"{where}.name: {name!r} is used by steps[{seen.index(name)}]")
        given = raw.get("input")
        if given is None:
            inputs = (outputs and (list(outputs)[-1],)) or datasets[:1]
            if not inputs:
                problems.append(f"{where}.input: is required (the flow names no datasets)")
        else:
            inputs = (given,) if isinstance(given, str) else tuple(given)
        for j, item in enumerate(inputs):
            if item not in datasets and item not in outputs:
                at = f"{where}.input" + (f"[{j}]" if isinstance(given, list) else "")
                problems.append(
                    f"{at}: {item!r} is neither a flow dataset ({', '.join(datasets) or 'none'}) "
                    "nor an earlier step's output"
                )
        output = raw.get("output", "")
        if output and (output in outputs or output in datasets):
            problems.append(f"{where}.output: {output!r} is already a dataset of this flow")
        model = raw.get("model", "")
        if model and model not in seen:
            problems.append(f"{where}.model: {model!r} is not an earlier step")
        params = {str(k): _param_text(v) for k, v in (raw.get("params") or {}).items()}
        steps.append(StepSpec(name, raw["taskpack"], tuple(inputs), output, model, params))
        seen.append(name)
        if output:
            outputs[output] = i
    if problems:
        raise ValidationError(problems, "flow")
    return FlowSpec(doc["name"], datasets, tuple(steps), path, doc.get("description", ""))


def load_flow(path: str | Path) -> FlowSpec:
    """Read and check a flow file (YAML or JSON)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError([f"(file): cannot read {path}: {exc.strerror}"], "flow") from None
    if len(data) > MAX_FLOW_FILE_BYTES:
        raise ValidationError([f"(file): {len(data)} bytes, over {MAX_FLOW_FILE_BYTES}"], "flow")
    try:
        doc = load_yaml(data)
    except yaml.YAMLError as exc:
        raise ValidationError([f"(file): not valid YAML: {exc}"], "flow") from None
    return parse_flow(doc, path)


def apply_overrides(spec: FlowSpec, overrides: dict[str, str]) -> FlowSpec:
    """`--param STEP.KEY=VALUE` overrides; an unknown step is a problem, listed by name."""
    names = [s.name for s in spec.steps]
    problems: list[str] = []
    extra: dict[str, dict[str, str]] = {}
    for key, value in overrides.items():
        step, _, param = key.partition(".")
        if step not in names or not param:
            problems.append(
                f"--param {key}: expected STEP.KEY=VALUE with STEP one of {', '.join(names)}"
            )
            continue
        extra.setdefault(step, {})[param] = value
    if problems:
        raise ValidationError(problems, "flow parameters")
    steps = tuple(
        StepSpec(
            s.name, s.taskpack, s.inputs, s.output, s.model, {**s.params, **extra.get(s.name, {})}
        )
        for s in spec.steps
    )
    return FlowSpec(spec.name, spec.datasets, steps, spec.path, spec.description)


def taskpack_dir(spec: FlowSpec, step: StepSpec) -> Path:
    """A step's taskpack directory: relative to the flow file's directory or the nearest
    of its parents that holds it (flows/x.yaml names taskpacks/y), else to the current
    directory."""
    given = Path(step.taskpack).expanduser()
    if given.is_absolute() or spec.path is None:
        return given
    here = spec.path.resolve().parent
    for base in [here, *here.parents]:
        if (base / given).is_dir():
            return base / given
    return given


@dataclass(frozen=True)
class ResolvedStep:
    step: StepSpec
    directory: Path
    type: str  # the taskpack's spec.type
    input_names: tuple[str, ...]  # the manifest's input names, in order
    params: dict[str, Any]  # merged, validated (defaults filled in)


def resolve_flow(spec: FlowSpec) -> list[ResolvedStep]:
    """Load each step's taskpack and check it fits the step; every problem by path."""
    from p2pfl.taskpack.manifest import load_manifest
    from p2pfl.taskpack.params import load_params

    problems: list[str] = []
    out: list[ResolvedStep] = []
    types: dict[str, str] = {}
    for i, step in enumerate(spec.steps):
        where = f"steps[{i}]"
        directory = taskpack_dir(spec, step)
        try:
            manifest = load_manifest(directory)
            params = load_params(directory, dict(step.params))
        except ValidationError as exc:
            problems += [f"{where}.taskpack ({step.taskpack}): {p}" for p in exc.problems]
            continue
        except (OSError, ValueError) as exc:
            problems.append(f"{where}.taskpack: {step.taskpack}: {exc}")
            continue
        kind = manifest.spec.type
        types[step.name] = kind
        if step.output and kind != "preprocessing":
            problems.append(f"{where}.output: a {kind} taskpack writes no dataset")
        if kind == "preprocessing" and not step.output:
            problems.append(f"{where}.output: a preprocessing step names its output dataset")
        if step.model and types.get(step.model) not in ("training", "preprocessing"):
            problems.append(f"{where}.model: step {step.model!r} produces no model")
        names = tuple(x.name for x in manifest.spec.inputs)
        if len(names) != len(step.inputs):
            problems.append(
                f"{where}.input: the taskpack reads {len(names)} input(s) "
                f"({', '.join(names)}), the step gives {len(step.inputs)}"
            )
        out.append(ResolvedStep(step, directory, kind, names, params))
    if problems:
        raise ValidationError(problems, "flow")
    return out
