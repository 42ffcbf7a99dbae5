"""Shared plumbing for the manifest and params validators: YAML, formats, error paths.

Every validator here collects *all* problems (never stops at the first) and words each as
``path: message`` so a person can fix a document in one pass.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import semver
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError as SchemaError
from packaging.specifiers import InvalidSpecifier, SpecifierSet

# Binary (Ki, Mi...) and decimal (K/KB, M/MB...) units, Kubernetes style; bare = bytes.
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "Ki": 2**10,
    "KiB": 2**10,
    "Mi": 2**20,
    "MiB": 2**20,
    "Gi": 2**30,
    "GiB": 2**30,
    "Ti": 2**40,
    "TiB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
# Lowercase DNS-like name: labels of [a-z0-9-], no leading/trailing hyphen, dots between.
_DNS_RE = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"512Mi"``, ``"2Gi"``, ``"1.5G"``, ``"100MB"`` or ``"4096"``.

    Raises ValueError for anything else (negative, unknown unit, not a string).
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a valid size")
    match = _SIZE_RE.match(text)
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a valid size")
    number, unit = match.groups()
    # Integer arithmetic where possible so "1Gi" is exactly 2**30 on every machine.
    if "." in number:
        whole, frac = number.split(".")
        scale = 10 ** len(frac)
        return (int(whole) * scale + int(frac)) * _UNITS[unit] // scale
    return int(number) * _UNITS[unit]


def _is_size(value: object) -> bool:
    try:
        parse_size(value)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def _is_semver(value: object) -> bool:
    return isinstance(value, str) and semver.Version.is_valid(value)


def _is_specifier(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        SpecifierSet(value)
    except InvalidSpecifier:
        return False
    return True


def _is_dns_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 253 and bool(_DNS_RE.match(value))


# format name -> (predicate, message template) -- our own wording instead of jsonschema's
# "'x' is not a 'size'", which reads like a bug report.
_FORMATS = {
    "size": (_is_size, "{!r} is not a valid size (e.g. 512Mi, 2Gi, 100MB)"),
    "semver": (_is_semver, "{!r} is not semver (e.g. 1.2.0)"),
    "python-specifier": (_is_specifier, "{!r} is not a version specifier (e.g. >=3.11)"),
    "dns-name": (
        _is_dns_name,
        "{!r} is not a lowercase DNS-like name (a-z, 0-9, '-', '.', e.g. wages-logreg)",
    ),
}

FORMAT_CHECKER = FormatChecker(formats=())
for _name, (_pred, _msg) in _FORMATS.items():
    FORMAT_CHECKER.checks(_name)(_pred)


def format_path(parts: Iterable[object], prefix: str = "") -> str:
    """``["spec", "inputs", 0, "name"]`` -> ``spec.inputs[0].name``."""
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def _describe(error: SchemaError, prefix: str) -> list[str]:
    path = list(error.absolute_path)
    if error.validator == "required":
        # jsonschema reports a missing key at its parent; name the key itself instead.
        missing = error.message.split("'")[1] if "'" in error.message else "?"
        return [f"{format_path([*path, missing], prefix)}: is required"]
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        return [f"{format_path([*path, k], prefix)}: unknown field" for k in extra]
    if error.validator == "format" and error.validator_value in _FORMATS:
        message = _FORMATS[error.validator_value][1].format(error.instance)
        return [f"{format_path(path, prefix)}: {message}"]
    return [f"{format_path(path, prefix)}: {error.message}"]


def schema_problems(validator: Draft202012Validator, doc: Any, prefix: str = "") -> list[str]:
    """Every schema violation in `doc`, as ``path: message`` strings."""
    problems: list[str] = []
    for error in validator.iter_errors(doc):
        problems.extend(_describe(error, prefix))
    return problems


def json_problems(value: Any, path: Sequence[object] = (), prefix: str = "") -> list[str]:
    """Values JSON cannot carry canonically (dates, NaN, non-string keys...) by path.

    YAML happily yields ``datetime.date`` for ``2024-01-01`` and ``nan`` for ``.nan``; such
    values would make canonical bytes ambiguous or impossible, so they are problems.
    """
    if isinstance(value, dict):
        out: list[str] = []
        for key, item in value.items():
            if not isinstance(key, str):
                out.append(f"{format_path([*path, str(key)], prefix)}: keys must be strings")
                continue
            out.extend(json_problems(item, [*path, key], prefix))
        return out
    if isinstance(value, list):
        out = []
        for index, item in enumerate(value):
            out.extend(json_problems(item, [*path, index], prefix))
        return out
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{format_path(path, prefix)}: {value!r} is not a finite number"]
    if value is None or isinstance(value, (str, int, float, bool)):
        return []
    return [
        f"{format_path(path, prefix)}: {type(value).__name__} value {value!r} is not allowed "
        "(quote it to make it a string)"
    ]


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors/aliases: a few aliases can expand to gigabytes of JSON."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases are not allowed (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def load_yaml(data: bytes | str) -> Any:
    """Parse YAML (or JSON, a subset) safely; raises yaml.YAMLError on bad input."""
    return yaml.load(data, Loader=_NoAliasLoader)  # noqa: S506 -- a SafeLoader subclass


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, UTF-8, no NaN. Used for signing."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
