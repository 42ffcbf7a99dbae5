"""Versions side by side: range resolution, model schemas and partial rollout.

A node keeps every version of a taskpack name it has verified (the TaskpackBook is keyed by
(cid, publisher)); a task names which of them run, and every node checks it by the same
rules, from the signed offer and the signed manifests alone:

- **Range.** `name@^1.2` is resolved by the requester to the newest verified version that
  satisfies the range (`resolve`: semver order, the pinned `semver` package, npm caret and
  tilde as in p2pfl.policy.ranges). The offer carries the range *and* the resolved version
  and cid; every receiver checks that the version satisfies the range (`arms_problem`) and,
  once the cid is verified here, that its signed manifest is that name and version. So every
  node agrees on what runs, whatever versions it holds itself.
- **Model schema.** What must be equal for two versions' models to be averaged: the
  manifest's `spec.federated.model_schema`, or by default `NAME@COMPAT` where COMPAT is the
  semver-compatible part of the version (`1` for 1.4.2, `0.3` for 0.3.1, `0.0.7` for 0.0.7),
  the same line npm's caret draws. Versions whose schemas differ are never averaged together.
- **Rollout.** `1.0.0=0.8,1.1.0=0.2`: the offer lists arms (version, cid, model schema,
  share in 1/10,000ths). A participant's arm is fixed by a hash every node recomputes,
  sha256("p2pfl/rollout/v1|" task_id "|" peer) mod 10,000 against the cumulative shares
  (`assign`); a volunteer names its arm's cid in its signed record, and a record naming
  another is refused. The fractions hold in expectation (each participant independently),
  so the result reports the count per version. For training, every arm that takes part must
  share the first arm's model schema: a volunteer of another schema declines, its record is
  refused, and a roster that includes one is refused, each with the reason.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

SHARE_UNITS = 10_000  # rollout shares are integers out of this (exact on every node)
MAX_ARMS = 8
MAX_SCHEMA = 128  # characters of a model schema name
MAX_RANGE = 128  # characters of a version range in an offer
MAX_METRICS = 64  # metrics reported per version in a rollout's result
_ROLLOUT_DOMAIN = b"p2pfl/rollout/v1|"


@dataclass(frozen=True)
class Arm:
    """One version of a rollout: what runs, its model schema, its share of participants."""

    version: str
    cid: str
    schema: str
    share: int  # out of SHARE_UNITS

    def wire(self) -> list[Any]:
        return [self.version, self.cid, self.schema, self.share]


# --- semver --------------------------------------------------------------------------------


def _semver(version: str) -> Any:
    import semver

    return semver.Version.parse(version)


def is_version(text: str) -> bool:
    try:
        _semver(text)
    except (ValueError, TypeError):
        return False
    return True


def satisfies(version: str, range_text: str) -> bool:
    """`version` is in the npm-style range (`^1.2`, `~1.2`, `>=1.0,<2`, `1.2.3`, `*`).

    As in npm, a prerelease (1.3.0-rc.1) satisfies a range only if the range names a
    prerelease of the same major.minor.patch: `~1.2` never picks up a release candidate."""
    from p2pfl.policy.ranges import parse_range, version_in

    try:
        comparators = parse_range(range_text)
    except ValueError:
        return False
    if not version_in(version, comparators):
        return False
    v = _semver(version)
    if v.prerelease is None:
        return True
    named = [_semver(c.lstrip("<>=!")) for c in comparators]
    return any(n.prerelease and n.finalize_version() == v.finalize_version() for n in named)


def resolve(range_text: str, versions: Iterable[str]) -> str | None:
    """The highest version (semver order) that satisfies the range; None if none does.
    A pure function of the set: every node holding the same versions gets the same one."""
    ok = {v for v in versions if is_version(v) and satisfies(v, range_text)}
    return max(ok, key=_semver) if ok else None


def versions_by_name(listing: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`p2pfl taskpacks --versions`: the book's listing grouped by name (sorted), each
    name's versions newest first (semver order; unparsable versions last)."""
    names: dict[str, list[dict[str, Any]]] = {}
    for item in listing:
        names.setdefault(str(item.get("name", "?")), []).append(dict(item))

    out = []
    for name in sorted(names):
        good = sorted(
            (i for i in names[name] if is_version(str(i.get("version")))),
            key=lambda i: _semver(str(i["version"])),
            reverse=True,
        )
        rest = [i for i in names[name] if not is_version(str(i.get("version")))]
        out.append({"name": name, "versions": good + rest})
    return out


def newest(versions: Iterable[str]) -> str | None:
    """The highest valid version, prereleases included (semver order); None if none."""
    valid = {v for v in versions if is_version(v)}
    return max(valid, key=_semver) if valid else None


def compat_line(version: str) -> str:
    """The semver-compatible part: 1.4.2 -> "1", 0.3.1 -> "0.3", 0.0.7 -> "0.0.7"."""
    v = _semver(version)
    if v.major:
        return str(v.major)
    if v.minor:
        return f"0.{v.minor}"
    return f"0.0.{v.patch}"


def model_schema(manifest: Any) -> str:
    """What two versions' models must share to be averaged (see the module docstring)."""
    declared = manifest.spec.federated.model_schema
    if declared:
        return str(declared)
    return f"{manifest.metadata.name}@{compat_line(manifest.metadata.version)}"


# --- rollout -------------------------------------------------------------------------------


def parse_rollout(text: str) -> list[tuple[str, int]]:
    """`1.0.0=0.8,1.1.0=0.2` -> [("1.0.0", 8000), ("1.1.0", 2000)]; ValueError naming the
    bad part. Fractions are exact multiples of 1/10,000 that sum to exactly 1."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if len(items) < 2 or len(items) > MAX_ARMS:
        raise ValueError(f"--rollout: give 2 to {MAX_ARMS} VERSION=FRACTION pairs, got {text!r}")
    out: list[tuple[str, int]] = []
    for item in items:
        version, eq, fraction = item.partition("=")
        version = version.strip()
        if not eq or not is_version(version):
            raise ValueError(f"--rollout: {item!r} is not VERSION=FRACTION (e.g. 1.1.0=0.2)")
        try:
            units = Decimal(fraction.strip()) * SHARE_UNITS
        except InvalidOperation:
            raise ValueError(f"--rollout: {fraction.strip()!r} is not a number") from None
        if units != units.to_integral_value() or not 0 < units <= SHARE_UNITS:
            raise ValueError(
                f"--rollout: {version} has fraction {fraction.strip()}; "
                "each must be in (0, 1], a multiple of 0.0001"
            )
        if any(v == version for v, _ in out):
            raise ValueError(f"--rollout: {version} is given twice")
        out.append((version, int(units)))
    total = sum(u for _, u in out)
    if total != SHARE_UNITS:
        raise ValueError(f"--rollout: fractions sum to {Decimal(total) / SHARE_UNITS}, not 1")
    return out


def rollout_arms(
    entries: Iterable[Any], name: str, shares: Sequence[tuple[str, int]], publisher: str
) -> tuple[Arm, ...]:
    """The arms of a rollout of `name` from the verified taskpack entries a node holds: for
    each (version, share), that version's archive (the one signed by `publisher` first if
    several publishers signed it, then by cid). ValueError naming a version not held."""
    verified = [e for e in entries if e.status == "verified" and e.name == name]
    arms = []
    for version, share in shares:
        found = sorted(
            (e for e in verified if e.version == version),
            key=lambda e: (e.announce.publisher != publisher, e.cid),
        )
        if not found:
            held = ", ".join(sorted({e.version for e in verified}, key=_semver)) or "none"
            raise ValueError(
                f"--rollout: {name}@{version} is not verified on this node (verified: {held})"
            )
        arms.append(Arm(version, found[0].cid, model_schema(found[0].manifest), share))
    return tuple(arms)


def bucket(task_id: str, peer: str) -> int:
    digest = hashlib.sha256(_ROLLOUT_DOMAIN + f"{task_id}|{peer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SHARE_UNITS


def assign(task_id: str, peer: str, arms: Sequence[Arm]) -> Arm:
    """The arm `peer` runs in task `task_id`: a rule every node evaluates the same way."""
    b = bucket(task_id, peer)
    upper = 0
    for arm in arms:
        upper += arm.share
        if b < upper:
            return arm
    return arms[-1]  # unreachable for shares summing to SHARE_UNITS


def offer_arms(rollout: Any) -> list[Arm]:
    """The arms of an offer's `rollout` field ([] for a single-version offer). Call only on
    an offer `arms_problem` accepted."""
    if not rollout:
        return []
    return [Arm(str(v), str(c), str(s), int(u)) for v, c, s, u in rollout]


def arms_problem(offer: Any) -> str | None:
    """Why an offer's range or rollout breaks the rules, or None (checked on receipt)."""
    rng = offer.range
    if not isinstance(rng, str) or len(rng) > MAX_RANGE:
        return f"range must be a string of at most {MAX_RANGE} characters"
    if rng:
        from p2pfl.policy.ranges import parse_range

        try:
            parse_range(rng)
        except ValueError as exc:
            return f"range {rng!r}: {exc}"
    rollout = offer.rollout
    if rollout is None:
        if rng and not satisfies(offer.version, rng):
            return f"version {offer.version} does not satisfy the offer's range {rng!r}"
        return None
    if not isinstance(rollout, list | tuple) or not 2 <= len(rollout) <= MAX_ARMS:
        return f"rollout must list 2 to {MAX_ARMS} arms"
    for arm in rollout:
        if not (
            isinstance(arm, list | tuple)
            and len(arm) == 4
            and all(isinstance(x, str) for x in arm[:3])
            and type(arm[3]) is int
        ):
            return "each rollout arm is [version, cid, model schema, share]"
        version, cid, schema, share = arm
        if not is_version(version) or not 0 < len(cid) <= 128:
            return f"rollout arm {version[:32]!r}: not a version and a cid"
        if not 0 < len(schema) <= MAX_SCHEMA:
            return f"rollout arm {version}: model schema of 1 to {MAX_SCHEMA} characters"
        if not 0 < share <= SHARE_UNITS:
            return f"rollout arm {version}: share {share} outside (0, {SHARE_UNITS}]"
        if rng and not satisfies(version, rng):
            return f"rollout version {version} does not satisfy the offer's range {rng!r}"
    arms = offer_arms(rollout)
    if sum(a.share for a in arms) != SHARE_UNITS:
        return f"rollout shares sum to {sum(a.share for a in arms)}, not {SHARE_UNITS}"
    if len({a.version for a in arms}) != len(arms) or len({a.cid for a in arms}) != len(arms):
        return "rollout arms repeat a version or a cid"
    if (arms[0].version, arms[0].cid) != (offer.version, offer.cid):
        return "the offer's version and cid must be its first rollout arm's"
    return None


def schema_problem(offer: Any, arm: Arm) -> str | None:
    """Why a participant of `arm` may not train in this task, or None: in a training task
    every arm that takes part shares the first arm's model schema."""
    first = offer_arms(offer.rollout)[0]
    if offer.type != "training" or arm.schema == first.schema:
        return None
    return (
        f"{offer.name}@{arm.version} has model schema {arm.schema!r}, the task trains "
        f"{first.version}'s {first.schema!r}: versions whose model schemas differ are "
        "never averaged together"
    )


def my_cid(offer: Any, peer: str) -> str:
    """The archive `peer` runs for this offer: its rollout arm's, or the offer's one cid."""
    arms = offer_arms(offer.rollout)
    return assign(offer.task_id, peer, arms).cid if arms else str(offer.cid)


def manifest_problem(offer: Any, peer: str, manifest: Any) -> str | None:
    """Why the verified manifest of the archive `peer` would run does not match what the
    offer says of it (name, version, type, model schema), or None. Checked by each node on
    its own archive: a requester cannot misstate a version or a schema to the nodes that
    run it."""
    arms = offer_arms(offer.rollout)
    arm = assign(offer.task_id, peer, arms) if arms else None
    version = arm.version if arm else offer.version
    name, actual = manifest.metadata.name, manifest.metadata.version
    if name != offer.name or actual != version:
        return f"the offer names {offer.name}@{version} but its archive is {name}@{actual}"
    if manifest.spec.type != offer.type:
        return f"the offer says type {offer.type} but the manifest says {manifest.spec.type}"
    if arm is not None:
        schema = model_schema(manifest)
        if schema != arm.schema:
            return (
                f"the offer says {name}@{version} has model schema {arm.schema!r}, "
                f"its manifest says {schema!r}"
            )
        return schema_problem(offer, arm)
    return None


def volunteer_problem(offer: Any, peer: str, cid: str) -> str | None:
    """Why a volunteer record naming archive `cid` is refused, or None."""
    arms = offer_arms(offer.rollout)
    if not arms:
        return (
            None if cid in ("", offer.cid) else f"{peer[-8:]} names cid {cid[:16]}, not the offer's"
        )
    arm = assign(offer.task_id, peer, arms)
    if cid != arm.cid:
        return (
            f"{peer[-8:]} names cid {cid[:16]}, but the rollout rule gives it "
            f"{offer.name}@{arm.version}"
        )
    return schema_problem(offer, arm)


@functools.lru_cache(maxsize=64)
def carried_cids(volunteers: tuple[bytes, ...]) -> dict[str, str]:
    """peer -> the cid each signed volunteer record a roster carries names (the records'
    signatures are checked by the node core before the roster reaches a task)."""
    from p2pfl.core.messages import Volunteer
    from p2pfl.wire import Signed, decode, unseal

    out: dict[str, str] = {}
    for raw in volunteers:
        vol = unseal(decode(raw, expected=Signed), expected=Volunteer)
        out[vol.peer] = vol.cid
    return out


def roster_rollout_problem(
    offer: Any, participants: Sequence[str], volunteers: tuple[bytes, ...]
) -> str | None:
    """Why a roster breaks the rollout rules, or None: each participant's signed record
    (among the roster's `volunteers`) names its arm's cid, and (training) no two model
    schemas are averaged together."""
    if not offer.rollout:
        return None  # records are decoded only for rollouts (rosters can be large)
    cids: Mapping[str, str] = carried_cids(volunteers)
    for peer in participants:
        problem = volunteer_problem(offer, peer, cids.get(peer, ""))
        if problem is not None:
            return problem
    return None


def by_version(offer: Any, partials: Iterable[Any]) -> dict[str, Any]:
    """Per-version metrics of a rollout's final partials: for each version, the number of
    nodes and samples and the sample-weighted mean of every numeric metric."""
    arms = offer_arms(offer.rollout)
    groups: dict[str, list[Any]] = {a.version: [] for a in arms}
    for p in partials:
        groups[assign(offer.task_id, p.peer, arms).version].append(p)
    out: dict[str, Any] = {}
    for version, group in groups.items():
        total = sum(int(p.num_samples) for p in group)
        row: dict[str, Any] = {"nodes": len(group), "num_samples": total}
        names = sorted(
            {
                k
                for p in group
                if isinstance(p.metrics, dict)
                for k, v in p.metrics.items()
                if _number(v) and k != "num_samples"
            }
        )[:MAX_METRICS]  # peers choose the names: a bounded amount of work per result
        for name in names:
            pairs = [
                (float(p.metrics[name]), int(p.num_samples))
                for p in group
                if isinstance(p.metrics, dict) and _number(p.metrics.get(name))
            ]
            weight = sum(n for _, n in pairs)
            if weight > 0:
                row[name] = sum(v * n for v, n in pairs) / weight
        out[version] = row
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
