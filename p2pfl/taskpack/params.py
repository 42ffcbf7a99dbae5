"""Task parameters: ``configs/default.yaml`` merged with ``--param KEY=VALUE`` overrides.

The merged dict is validated against ``configs/schema.json`` (JSON Schema, Draft 2020-12),
with every problem listed by path. Top-level keys named like federated manifest fields
(``rounds``, ``min_nodes``...) override the manifest's values: see `effective_federated`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from p2pfl.errors import ValidationError
from p2pfl.taskpack._schema import (
    FORMAT_CHECKER,
    json_problems,
    load_yaml,
    schema_problems,
)
from p2pfl.taskpack.manifest import Manifest, federated_problems, manifest_schema

__all__ = [
    "DEFAULTS_FILE",
    "FEDERATED_KEYS",
    "SCHEMA_FILE",
    "effective_federated",
    "load_params",
    "parse_param_args",
    "validate_params",
]

DEFAULTS_FILE = "configs/default.yaml"
SCHEMA_FILE = "configs/schema.json"
# Params keys that override spec.federated.<key> of the manifest.
FEDERATED_KEYS = (
    "protocol",
    "rounds",
    "local_epochs",
    "mu",
    "min_nodes",
    "max_nodes",
    "aggregator",
    "fanout",
    "deadline_s",
    "differential_privacy",
)


def parse_param_args(args: Iterable[str]) -> dict[str, str]:
    """``["rounds=5", "model.hidden=32"]`` -> ``{"rounds": "5", "model.hidden": "32"}``."""
    out: dict[str, str] = {}
    problems = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            problems.append(f"--param {arg!r}: expected KEY=VALUE")
            continue
        out[key.strip()] = value
    if problems:
        raise ValidationError(problems, "params")
    return out


def _scalar(text: str) -> Any:
    """A YAML scalar (so ``5`` is an int, ``true`` a bool, ``[1, 2]`` a list); else the text."""
    if text == "":
        return ""
    if _EXPONENT_FLOAT.fullmatch(text.strip()):
        # YAML 1.1 reads `1e-5` (no dot) as a string; a person means a number.
        return float(text)
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _apply(params: dict[str, Any], key: str, value: Any, problems: list[str]) -> None:
    parts = key.split(".")
    if any(not p for p in parts):
        problems.append(f"{key}: empty component in dotted key")
        return
    node = params
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            problems.append(f"{key}: cannot set inside {where}, which is not a mapping")
            return
        node = child
    node[parts[-1]] = value


def _fill_defaults(value: Any, schema: Any) -> None:
    """Fill ``default``s of object properties in place (jsonschema validates, never fills)."""
    if not isinstance(schema, dict) or not isinstance(value, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if not isinstance(sub, dict):
            continue
        if name not in value and "default" in sub:
            value[name] = copy.deepcopy(sub["default"])
        if name in value:
            _fill_defaults(value[name], sub)


def _load_defaults(root: Path) -> dict[str, Any]:
    path = root / DEFAULTS_FILE
    if not path.exists():
        return {}
    try:
        doc = load_yaml(path.read_bytes())
    except yaml.YAMLError as exc:
        raise ValidationError([f"{DEFAULTS_FILE}: not valid YAML: {exc}"], "params") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValidationError([f"{DEFAULTS_FILE}: must be a mapping"], "params")
    return doc


def _load_schema(root: Path) -> dict[str, Any] | None:
    path = root / SCHEMA_FILE
    if not path.exists():
        return None
    try:
        schema = json.loads(path.read_bytes())
        Draft202012Validator.check_schema(schema)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError([f"{SCHEMA_FILE}: not valid JSON: {exc}"], "params") from exc
    except SchemaError as exc:
        raise ValidationError(
            [f"{SCHEMA_FILE}: not a valid JSON Schema: {exc.message}"], "params"
        ) from exc
    if not isinstance(schema, dict):
        raise ValidationError([f"{SCHEMA_FILE}: must be a JSON object"], "params")
    return schema


def validate_params(params: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, Any]:
    """Fill schema defaults into a copy of `params` and validate it; ValidationError lists all.

    Federated keys (`FEDERATED_KEYS`) are checked against the manifest's federated rules,
    and against the task's schema only if that schema declares them.
    """
    params = copy.deepcopy(params)
    problems = json_problems(params)
    if schema is not None:
        _fill_defaults(params, schema)
        declared = schema.get("properties", {})
        task_view = {k: v for k, v in params.items() if k not in FEDERATED_KEYS or k in declared}
        validator = Draft202012Validator(schema, format_checker=FORMAT_CHECKER)
        problems += schema_problems(validator, task_view)
    problems += _federated_override_problems(params)
    if problems:
        raise ValidationError(sorted(set(problems)), "params")
    return params


def _federated_override_problems(params: Mapping[str, Any]) -> list[str]:
    overrides = {k: params[k] for k in FEDERATED_KEYS if k in params}
    if not overrides:
        return []
    fed_schema = manifest_schema()["properties"]["spec"]["properties"]["federated"]
    partial = {**fed_schema, "required": []}  # only the keys present are checked here
    validator = Draft202012Validator(partial, format_checker=FORMAT_CHECKER)
    return schema_problems(validator, overrides)


def load_params(root: str | Path, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``configs/default.yaml`` + overrides (dotted keys, YAML scalar values), validated.

    Both config files are optional: no defaults means ``{}``, no schema means no checks
    beyond the federated rules. Raises ValidationError naming every problem by path.
    """
    root = Path(root)
    params = _load_defaults(root)
    problems: list[str] = []
    for key in sorted(overrides or {}):  # sorted: "a=1" and "a.b=2" resolve the same way
        _apply(params, key, _scalar((overrides or {})[key]), problems)
    if problems:
        raise ValidationError(problems, "params")
    return validate_params(params, _load_schema(root))


def effective_federated(manifest: Manifest, params: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``spec.federated`` (defaults filled) with params' overrides applied.

    ``differential_privacy`` in params is merged key by key over the manifest's. The result
    is re-checked (e.g. ``--param max_nodes=1`` below ``min_nodes``) -> ValidationError.
    """
    fed = manifest.spec.federated
    out: dict[str, Any] = {
        "protocol": fed.protocol,
        "rounds": fed.rounds,
        "local_epochs": fed.local_epochs,
        "mu": fed.mu,
        "min_nodes": fed.min_nodes,
        "max_nodes": fed.max_nodes,
        "aggregator": fed.aggregator,
        "fanout": fed.fanout,
        "deadline_s": fed.deadline_s,
        "differential_privacy": {
            "enabled": fed.differential_privacy.enabled,
            "epsilon": fed.differential_privacy.epsilon,
            "delta": fed.differential_privacy.delta,
            "max_grad_norm": fed.differential_privacy.max_grad_norm,
        },
    }
    for key in FEDERATED_KEYS:
        if key not in params:
            continue
        if key == "differential_privacy" and isinstance(params[key], Mapping):
            out[key] = {**out[key], **params[key]}
        else:
            out[key] = copy.deepcopy(params[key])
    checked = {k: v for k, v in out.items() if v is not None}
    dp = out["differential_privacy"]
    if isinstance(dp, dict):
        checked["differential_privacy"] = {k: v for k, v in dp.items() if v is not None}
    problems = _federated_override_problems(checked)
    problems += federated_problems(checked, "")
    if problems:
        raise ValidationError(sorted(set(problems)), "params")
    return out
