"""The JSON Schema of ``DATA_DIR/policy.yaml`` and the wording of its problems.

Every object is closed (``additionalProperties: false``): a misspelt field is an error, not
a silently ignored rule (fail closed). What a schema cannot say (group names that exist,
peer ids that decode, semver ranges, sizes) is checked in `site.py` afterwards.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError

from p2pfl.taskpack._schema import FORMAT_CHECKER, _describe as describe, format_path

TASK_TYPES = ("training", "analysis", "inference", "preprocessing")
DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # as `p2pfl node --dataset NAME=PATH`
GROUP_NAME = r"^[a-z][a-z0-9_-]{0,63}$"

_POS = {"type": "number", "exclusiveMinimum": 0}

_RULES: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        # Who may offer tasks on the dataset: group names, peer ids, "self" (this node's
        # operator) or "*" (anyone).
        "allow": {"type": "array", "items": {"type": "string"}},
        "taskpacks": {"type": "array", "items": {"type": "string"}},  # PUBLISHER/NAME@RANGE
        "types": {"type": "array", "items": {"enum": list(TASK_TYPES)}, "uniqueItems": True},
        "k": {"type": "integer", "minimum": 1},
        "dp": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "required": {"type": "boolean"},
                "max_epsilon_per_task": _POS,
                "budget": _POS,
                "delta": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "mechanism": {"enum": ["laplace", "gaussian"]},  # analysis noise
            },
        },
        "limits": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_rounds": {"type": "integer", "minimum": 1},
                "max_wall_s": _POS,
                "memory": {"type": "string", "format": "size"},
                "concurrent_tasks": {"type": "integer", "minimum": 1},
            },
        },
        "advertise": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"count": {"enum": ["exact", "coarse", "hidden"]}},
        },
        # Caps per requester and taskpack per period (p2pfl/policy/usage.py).
        "usage": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["requester", "taskpack", "period"],
                "properties": {
                    "requester": {"type": "string", "minLength": 1},
                    "taskpack": {"type": "string", "minLength": 1},
                    "period": {"enum": ["day", "week", "month"]},
                    "max_runs": {"type": "integer", "minimum": 1},
                    "max_records": {"type": "integer", "minimum": 1},
                },
            },
        },
        "extremes": {"enum": ["allow", "deny"]},
        # Per-round loss / local metrics of a DP task: withheld by default.
        "metrics": {"enum": ["withhold", "release"]},
    },
}

POLICY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requesters": {
            "type": "object",
            "propertyNames": {"pattern": GROUP_NAME},
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
        "defaults": _RULES,
        "datasets": {
            "type": "object",
            "propertyNames": {"pattern": DATASET_NAME},
            "additionalProperties": _RULES,
        },
    },
}

_VALIDATOR = Draft202012Validator(POLICY_SCHEMA, format_checker=FORMAT_CHECKER)


def _bound(error: SchemaError) -> str | None:
    """`must be >= 1` instead of jsonschema's `0 is less than the minimum of 1`."""
    ops = {
        "minimum": ">=",
        "exclusiveMinimum": ">",
        "maximum": "<=",
        "exclusiveMaximum": "<",
    }
    op = ops.get(str(error.validator))
    if op is None:
        return None
    return f"{format_path(error.absolute_path)}: must be {op} {error.validator_value}"


def policy_schema_problems(doc: Any) -> list[str]:
    """Every schema problem of a policy document, as ``path: message``, sorted by path."""
    problems: list[str] = []
    for error in _VALIDATOR.iter_errors(doc):
        bound = _bound(error)
        if bound is not None:
            problems.append(bound)
        elif "propertyNames" in error.schema_path:
            # jsonschema reports the parent; name the offending key itself.
            parent = format_path(error.absolute_path)
            problems.append(f"{parent}.{error.instance}: {error.instance!r} is not a valid name")
        elif error.validator == "enum":
            allowed = " | ".join(str(v) for v in error.validator_value)
            problems.append(f"{format_path(error.absolute_path)}: must be one of {allowed}")
        else:
            # The shared wording of the manifest validator (unknown field, wrong type...).
            problems += describe(error, "")
    return sorted(set(problems))
