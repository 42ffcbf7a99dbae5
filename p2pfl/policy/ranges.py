"""Taskpack patterns of a site policy: ``PUBLISHER/NAME@RANGE``.

PUBLISHER is an Ed25519 peer id (or ``*`` for any publisher the node's trust policy
already accepts), NAME a taskpack name, RANGE an npm-style semver range: ``^1``, ``~1.2``,
``1.2.3``, ``*``, or comparators joined by commas or spaces (``>=1.2.0, <2``). No RANGE
means any version. Versions are compared by the pinned ``semver`` package; ranges are
translated to its comparators here (it has no caret/tilde syntax of its own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import semver

from p2pfl.identity import public_bytes_from_peer_id

# A manifest's metadata.name is a lowercase DNS-like name; be a little looser (policy files
# are written by hand) but never accept separators that would make the pattern ambiguous.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_COMPARATOR_RE = re.compile(r"^(>=|<=|>|<|==|=|!=)?\s*v?([0-9][0-9A-Za-z.+-]*)$")


def _partial(text: str) -> tuple[semver.Version, int]:
    """A version that may omit minor/patch ("1", "1.2"), and how many parts were given."""
    core = text.split("-", 1)[0].split("+", 1)[0]
    parts = len(core.split("."))
    if parts > 3 or not all(p.isdigit() for p in core.split(".")):
        raise ValueError(f"{text!r} is not a version")
    return semver.Version.parse(text, optional_minor_and_patch=True), parts


def _caret(text: str) -> list[str]:
    v, _ = _partial(text)
    if v.major > 0:
        upper = v.bump_major()
    elif v.minor > 0:
        upper = v.bump_minor()
    else:
        upper = v.bump_patch()
    return [f">={v}", f"<{upper}"]


def _tilde(text: str) -> list[str]:
    v, parts = _partial(text)
    upper = v.bump_major() if parts == 1 else v.bump_minor()
    return [f">={v}", f"<{upper}"]


def parse_range(text: str) -> tuple[str, ...]:
    """Comparators (``">=1.0.0"``, ``"<2.0.0"``) for a range; ValueError if malformed.

    An empty tuple matches every version."""
    text = text.strip()
    if text in ("", "*", "x"):
        return ()
    out: list[str] = []
    for token in re.split(r"[\s,]+", text):
        if token.startswith("^"):
            out += _caret(token[1:])
        elif token.startswith("~"):
            out += _tilde(token[1:].lstrip(">"))
        else:
            m = _COMPARATOR_RE.match(token)
            if m is None:
                raise ValueError(f"{token!r} is not a version comparator")
            op, ver = m.group(1) or "==", m.group(2)
            v, parts = _partial(ver)
            if op in ("==", "=") and parts < 3:
                out += _tilde(ver)  # "=1.2" means 1.2.x, "=1" means 1.x.x
            else:
                out.append(f"{'==' if op == '=' else op}{v}")
    return tuple(out)


def version_in(version: str, comparators: tuple[str, ...]) -> bool:
    """Whether `version` (semver) satisfies every comparator. Invalid versions never do."""
    try:
        v = semver.Version.parse(version)
    except (ValueError, TypeError):
        return False
    return all(v.match(c) for c in comparators)


@dataclass(frozen=True)
class TaskpackPattern:
    publisher: str  # a peer id, or "*"
    name: str
    comparators: tuple[str, ...]
    text: str  # as written, for reasons

    def matches(self, publisher: str, name: str, version: str) -> bool:
        return (
            (self.publisher == "*" or self.publisher == publisher)
            and self.name == name
            and version_in(version, self.comparators)
        )


def parse_taskpack_pattern(text: str) -> TaskpackPattern:
    """``PUBLISHER/NAME[@RANGE]`` -> TaskpackPattern; ValueError naming the bad part."""
    publisher, slash, rest = text.partition("/")
    if not slash:
        raise ValueError(f"{text!r} is not PUBLISHER/NAME@RANGE")
    if publisher != "*" and public_bytes_from_peer_id(publisher) is None:
        raise ValueError(f"publisher {publisher!r} is not an Ed25519 peer id (12D3KooW...) or *")
    name, _, rng = rest.partition("@")
    if not _NAME_RE.match(name):
        raise ValueError(f"taskpack name {name!r} is not a valid name")
    try:
        comparators = parse_range(rng)
    except ValueError as exc:
        raise ValueError(f"version range {rng!r}: {exc}") from None
    return TaskpackPattern(publisher, name, comparators, text)
