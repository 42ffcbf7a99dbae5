"""The site policy: who may use which dataset for what, and what may leave.

``load_policy`` reads ``DATA_DIR/policy.yaml`` (see docs/privacy.md for the format), checks
it completely (schema, then meaning) and returns a `SitePolicy`. ``SitePolicy.decide`` is a
pure function of an offer's facts (and the node's ledger / running counts, passed in): it
says yes or no, names the rule that decided, and says what the node must enforce.

Fail closed everywhere: an unknown field, an unknown group, a bad range or a file that
cannot be read is a `PolicyError` listing every problem by path, never a looser policy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from p2pfl.errors import ValidationError
from p2pfl.identity import public_bytes_from_peer_id
from p2pfl.policy.ranges import TaskpackPattern, parse_taskpack_pattern
from p2pfl.policy.release import ReleaseRules
from p2pfl.policy.schema import TASK_TYPES, policy_schema_problems
from p2pfl.policy.usage import UsageCounts, UsageRule, usage_refusal
from p2pfl.taskpack._schema import canonical_json, json_problems, load_yaml, parse_size

POLICY_FILE = "policy.yaml"
MAX_POLICY_BYTES = 1 << 20  # a policy is written by hand; a megabyte is already absurd
SELF = "self"  # in `allow`: this node's own peer id (its operator's tasks)
ANYONE = "*"
_EPS_SLACK = 1e-9  # float sums of epsilons: 0.1 + 0.2 must not exceed a budget of 0.3


class PolicyError(ValidationError):
    """policy.yaml is invalid; `.problems` lists every problem as ``path: message``."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        super().__init__(problems, f"policy {source}".strip())


@dataclass(frozen=True)
class OfferFacts:
    """What a node knows about an offer when it decides, taken from the signed offer and
    the verified manifest (the core builds it; nothing here trusts the offer alone)."""

    requester: str  # peer id that signed the offer
    datasets: tuple[str, ...]  # this node's dataset names the task binds
    taskpack_publisher: str
    taskpack_name: str
    taskpack_version: str
    type: str  # training | analysis | inference | preprocessing (as the offer declares)
    rounds: int
    protocol: str
    aggregator: str
    dp_epsilon: float | None  # None: DP off
    dp_delta: float | None
    manifest_dp_required: bool
    manifest_type: str
    manifest_aggregator: str
    manifest_protocol: str
    params: dict[str, Any] = field(default_factory=dict)
    # Records the task would process per dataset (a test run's N, else the dataset's rows):
    # what usage caps count.
    records: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """Yes or no, the rule that decided and why; if yes, what the node enforces.

    Several bound datasets: the strictest value of each field wins."""

    allowed: bool
    rule: str  # e.g. "datasets.wages.allow"; "policy" when allowed
    reason: str  # one line a person can act on
    datasets: tuple[str, ...] = ()
    k: int = 1  # min records behind any released number
    dp_required: bool = False
    max_epsilon: float | None = None  # epsilon cap per task
    dp_epsilon: float | None = None  # the task's epsilon (as offered), None: DP off
    dp_delta: float | None = None
    mechanism: str = "laplace"  # analysis noise: laplace | gaussian
    max_rounds: int | None = None
    max_wall_s: float | None = None
    memory_bytes: int | None = None
    concurrent_tasks: int | None = None
    extremes: bool = False  # exact min / max may leave
    metrics: str = "release"  # per-round loss / local metrics: release | withhold
    task_type: str = ""

    def release_rules(self, plain_metrics: frozenset[str] = frozenset()) -> ReleaseRules:
        """The rules `filter_release` applies to this task's analysis outputs."""
        noisy = self.dp_epsilon is not None and self.task_type == "analysis"
        return ReleaseRules(
            k=self.k,
            extremes=self.extremes,
            epsilon=self.dp_epsilon if noisy else None,
            delta=self.dp_delta if noisy and self.mechanism == "gaussian" else None,
            plain_metrics=plain_metrics,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Rules:
    """The effective rules of one dataset (or of the defaults), defaults filled in."""

    where: str  # "datasets.wages" or "defaults": the prefix of every rule it decides
    listed: bool  # named in the policy file (False: an unlisted dataset under defaults)
    allow: tuple[str, ...]  # as written: group names, peer ids, "self", "*"
    peers: frozenset[str] | None  # resolved; None: anyone
    taskpacks: tuple[TaskpackPattern, ...] | None  # None: any (the trust policy still applies)
    types: tuple[str, ...] | None
    k: int
    dp_required: bool = False
    max_epsilon: float | None = None
    budget: float | None = None
    delta: float | None = None
    mechanism: str = "laplace"
    max_rounds: int | None = None
    max_wall_s: float | None = None
    memory: str | None = None
    concurrent_tasks: int | None = None
    advertise: str = "coarse"
    extremes: bool = False
    metrics: str | None = None  # None: withhold under DP, release otherwise
    usage: tuple[UsageRule, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The rules in the policy file's own shape (None: no limit / anything)."""
        return {
            "allow": list(self.allow),
            "taskpacks": None if self.taskpacks is None else [t.text for t in self.taskpacks],
            "types": None if self.types is None else list(self.types),
            "k": self.k,
            "dp": {
                "required": self.dp_required,
                "max_epsilon_per_task": self.max_epsilon,
                "budget": self.budget,
                "delta": self.delta,
                "mechanism": self.mechanism,
            },
            "limits": {
                "max_rounds": self.max_rounds,
                "max_wall_s": self.max_wall_s,
                "memory": self.memory,
                "concurrent_tasks": self.concurrent_tasks,
            },
            "advertise": {"count": self.advertise},
            "extremes": "allow" if self.extremes else "deny",
            "metrics": self.metrics or "withhold if DP is on, else release",
            "usage": [u.as_dict() for u in self.usage],
        }


class SitePolicy:
    """A validated policy. Build it with `load_policy` or `parse_policy`."""

    def __init__(
        self,
        *,
        own_peer: str,
        requesters: Mapping[str, tuple[str, ...]],
        defaults: Rules,
        datasets: Mapping[str, Rules],
        allow_any_requester: bool,
        source: str | None,
    ) -> None:
        self.own_peer = own_peer
        self.requesters = dict(requesters)
        self.defaults = defaults
        self.datasets = dict(datasets)
        self.allow_any_requester = allow_any_requester
        self.source = source
        self.digest = hashlib.sha256(canonical_json(self._body())).hexdigest()

    # --- queries ----------------------------------------------------------------------

    def rules_for(self, dataset: str) -> Rules:
        return self.datasets.get(dataset, self.defaults)

    def advertised_rows(self, dataset: str, rows: int) -> int | None:
        """The row count a capability record may show: exact, coarse (rounded down to tens,
        None below k) or hidden (None)."""
        rules = self.rules_for(dataset)
        if rules.advertise == "exact":
            return int(rows)
        if rules.advertise == "coarse" and rows >= rules.k:
            return int(rows) // 10 * 10
        return None

    def as_dict(self) -> dict[str, Any]:
        """The effective policy (defaults filled in), for `p2pfl policy show`."""
        return {"source": self.source, "digest": self.digest, **self._body()}

    def _body(self) -> dict[str, Any]:
        return {
            "own_peer": self.own_peer,
            "allow_any_requester": self.allow_any_requester,
            "requesters": {g: list(m) for g, m in sorted(self.requesters.items())},
            "defaults": self.defaults.as_dict(),
            "datasets": {n: r.as_dict() for n, r in sorted(self.datasets.items())},
        }

    # --- the decision -------------------------------------------------------------------

    def decide(
        self,
        facts: OfferFacts,
        *,
        spent: Mapping[str, float] | None = None,
        running: Mapping[str, int] | None = None,
        usage: UsageCounts | None = None,
    ) -> Decision:
        """Whether this node may take part in the offer, and on what terms. Pure.

        `spent`: lifetime epsilon already spent per dataset (the PrivacyLedger, without this
        task); `running`: tasks running now per dataset (without this task); `usage`: runs
        and records used in the current period (the UsageLedger, without this task)."""
        refusal = _offer_refusal(facts)
        if refusal is not None:
            return refusal
        spent = spent or {}
        running = running or {}
        names = sorted(set(facts.datasets))
        picked = [(n, self.rules_for(n)) for n in names] or [("(none)", self.defaults)]
        for name, rules in picked:
            refusal = _dataset_refusal(name, rules, facts, spent, running)
            if refusal is not None:
                return refusal
            over = usage_refusal(
                rules.usage,
                dataset=name,
                requester=facts.requester,
                taskpack=facts.taskpack_name,
                records=int(facts.records.get(name, 0)),
                counts=usage,
            )
            if over is not None:
                return _no(*over)
        return _allowed(facts, [r for _, r in picked], tuple(names))


def _no(rule: str, reason: str) -> Decision:
    return Decision(False, rule, reason)


def _offer_refusal(f: OfferFacts) -> Decision | None:
    """What the offer itself may not do: loosen its manifest, or carry nonsense DP."""
    if f.type not in TASK_TYPES:
        return _no("offer.type", f"unknown task type {f.type!r}")
    loosen = "an offer may only tighten its manifest"
    for what, offered, manifest in (
        ("type", f.type, f.manifest_type),
        ("aggregator", f.aggregator, f.manifest_aggregator),
        ("protocol", f.protocol, f.manifest_protocol),
    ):
        if offered != manifest:
            return _no(
                f"offer.{what}",
                f"the offer declares {what} {offered} but the manifest says {manifest} ({loosen})",
            )
    if f.manifest_dp_required and f.dp_epsilon is None:
        return _no("offer.dp", f"the manifest requires DP but the offer turns it off ({loosen})")
    if f.dp_epsilon is not None and not (math.isfinite(f.dp_epsilon) and f.dp_epsilon > 0):
        return _no("offer.dp", f"DP epsilon {f.dp_epsilon} is not a positive number")
    if f.dp_epsilon is not None and f.dp_delta is not None and not 0 < f.dp_delta < 1:
        return _no("offer.dp", f"DP delta {f.dp_delta} is not in (0, 1)")
    if f.rounds < 1:
        return _no("offer.rounds", f"{f.rounds} rounds")
    return None


def _dataset_refusal(
    name: str,
    r: Rules,
    f: OfferFacts,
    spent: Mapping[str, float],
    running: Mapping[str, int],
) -> Decision | None:
    w, head = r.where, f"dataset {name}"
    if r.peers is not None and f.requester not in r.peers:
        unlisted = "" if r.listed else " (not in the policy: only this node's own tasks)"
        return _no(
            f"{w}.allow",
            f"{head}: requester {f.requester} is not in allow [{', '.join(r.allow)}]{unlisted}",
        )
    pack = f"{f.taskpack_publisher}/{f.taskpack_name}@{f.taskpack_version}"
    if r.taskpacks is not None and not any(
        t.matches(f.taskpack_publisher, f.taskpack_name, f.taskpack_version) for t in r.taskpacks
    ):
        listed = ", ".join(t.text for t in r.taskpacks)
        return _no(f"{w}.taskpacks", f"{head}: taskpack {pack} matches none of [{listed}]")
    if r.types is not None and f.type not in r.types:
        return _no(f"{w}.types", f"{head}: type {f.type} is not in types [{', '.join(r.types)}]")
    eps = f.dp_epsilon
    if r.dp_required and eps is None:
        return _no(f"{w}.dp.required", f"{head}: DP is required but the offer turns it off")
    if eps is not None and r.max_epsilon is not None and eps > r.max_epsilon + _EPS_SLACK:
        return _no(
            f"{w}.dp.max_epsilon_per_task",
            f"{head}: epsilon {eps:g} > max_epsilon_per_task {r.max_epsilon:g}",
        )
    if eps is not None and r.delta is not None and (f.dp_delta or 0.0) > r.delta:
        return _no(f"{w}.dp.delta", f"{head}: delta {f.dp_delta:g} > {r.delta:g}")
    if eps is not None and r.budget is not None:
        used = float(spent.get(name, 0.0))
        if used + eps > r.budget + _EPS_SLACK:
            left = max(r.budget - used, 0.0)
            return _no(
                f"{w}.dp.budget",
                f"{head}: epsilon {eps:g} would exceed the lifetime budget {r.budget:g} "
                f"(spent {used:g}, remaining {left:g})",
            )
    if r.max_rounds is not None and f.rounds > r.max_rounds:
        return _no(
            f"{w}.limits.max_rounds", f"{head}: {f.rounds} rounds > max_rounds {r.max_rounds}"
        )
    busy = int(running.get(name, 0))
    if r.concurrent_tasks is not None and busy >= r.concurrent_tasks:
        return _no(
            f"{w}.limits.concurrent_tasks",
            f"{head}: {busy} task(s) already running (concurrent_tasks {r.concurrent_tasks})",
        )
    return None


def _least(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _allowed(f: OfferFacts, rules: list[Rules], names: tuple[str, ...]) -> Decision:
    memories = [parse_size(r.memory) for r in rules if r.memory is not None]
    dp_on = f.dp_epsilon is not None
    if any(r.metrics == "withhold" for r in rules):
        metrics = "withhold"
    elif all(r.metrics == "release" for r in rules):
        metrics = "release"
    else:
        metrics = "withhold" if dp_on else "release"  # unaccounted numbers stay home
    mechanism = "laplace" if any(r.mechanism == "laplace" for r in rules) else "gaussian"
    on = ", ".join(names) if names else "no dataset"
    return Decision(
        allowed=True,
        rule="policy",
        reason=(
            f"allowed: requester {f.requester} may run {f.taskpack_name}@{f.taskpack_version} "
            f"({f.type}) on {on}"
        ),
        datasets=names,
        k=max(r.k for r in rules),
        dp_required=any(r.dp_required for r in rules),
        max_epsilon=_least([r.max_epsilon for r in rules]),
        dp_epsilon=f.dp_epsilon,
        dp_delta=f.dp_delta if dp_on else None,
        mechanism=mechanism,
        max_rounds=_least([r.max_rounds for r in rules]),
        max_wall_s=_least([r.max_wall_s for r in rules]),
        memory_bytes=min(memories) if memories else None,
        concurrent_tasks=_least([r.concurrent_tasks for r in rules]),
        extremes=all(r.extremes for r in rules),
        metrics=metrics,
        task_type=f.type,
    )


# --- building a policy ---------------------------------------------------------------------


def _semantic_problems(doc: dict[str, Any]) -> list[str]:
    """What the schema cannot check: peer ids, group names, taskpack patterns, budgets."""
    problems: list[str] = []
    groups = _dict(doc.get("requesters"))
    for group, members in groups.items():
        if group == SELF:
            problems.append(f"requesters.{group}: {SELF!r} is reserved (it means this node)")
        for i, peer in enumerate(members if isinstance(members, list) else []):
            if not isinstance(peer, str) or public_bytes_from_peer_id(peer) is None:
                problems.append(
                    f"requesters.{group}[{i}]: {peer!r} is not an Ed25519 peer id (12D3KooW...)"
                )
    blocks = [("defaults", doc.get("defaults"))]
    blocks += [(f"datasets.{n}", b) for n, b in _dict(doc.get("datasets")).items()]
    for where, block in blocks:
        if not isinstance(block, dict):
            continue
        for i, who in enumerate(_list(block.get("allow"))):
            if not isinstance(who, str) or who in (SELF, ANYONE) or who in groups:
                continue
            if public_bytes_from_peer_id(who) is None:
                known = ", ".join(sorted(groups)) or "none defined"
                problems.append(
                    f"{where}.allow[{i}]: unknown requester group {who!r} (groups: {known})"
                )
        for i, text in enumerate(_list(block.get("taskpacks"))):
            if isinstance(text, str):
                try:
                    parse_taskpack_pattern(text)
                except ValueError as exc:
                    problems.append(f"{where}.taskpacks[{i}]: {exc}")
        for i, u in enumerate(_list(block.get("usage"))):
            who = u.get("requester") if isinstance(u, dict) else None
            if isinstance(who, str) and who not in (SELF, ANYONE) and who not in groups:
                if public_bytes_from_peer_id(who) is None:
                    problems.append(
                        f"{where}.usage[{i}].requester: unknown requester group {who!r}"
                    )
            if isinstance(u, dict) and "max_runs" not in u and "max_records" not in u:
                problems.append(f"{where}.usage[{i}]: give max_runs, max_records or both")
        dp = _dict(block.get("dp"))
        cap: Any = dp.get("max_epsilon_per_task")
        budget: Any = dp.get("budget")
        if _num(cap) and _num(budget) and budget < cap:
            problems.append(f"{where}.dp.budget: {budget} is below max_epsilon_per_task {cap}")
    return problems


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _rules(
    where: str,
    block: dict[str, Any],
    base: dict[str, Any],
    groups: Mapping[str, tuple[str, ...]],
    own_peer: str,
    listed: bool,
) -> Rules:
    """Effective rules: the block's fields over `base` (the defaults block, then built-ins)."""
    merged = {**base, **block}
    dp = {**base.get("dp", {}), **block.get("dp", {})}
    limits = {**base.get("limits", {}), **block.get("limits", {})}
    allow = tuple(merged["allow"])
    peers: set[str] | None = set()
    for who in allow:
        if who == ANYONE:
            peers = None
            break
        assert peers is not None
        peers |= {own_peer} if who == SELF else set(groups.get(who, (who,)))
    packs = merged.get("taskpacks")
    types = merged.get("types")
    return Rules(
        where=where,
        listed=listed,
        allow=allow,
        peers=None if peers is None else frozenset(peers),
        taskpacks=None if packs is None else tuple(parse_taskpack_pattern(t) for t in packs),
        types=None if types is None else tuple(types),
        k=int(merged["k"]),
        dp_required=bool(dp.get("required", False)),
        max_epsilon=_float(dp.get("max_epsilon_per_task")),
        budget=_float(dp.get("budget")),
        delta=_float(dp.get("delta")),
        mechanism=str(dp.get("mechanism", "laplace")),
        max_rounds=limits.get("max_rounds"),
        max_wall_s=_float(limits.get("max_wall_s")),
        memory=limits.get("memory"),
        concurrent_tasks=limits.get("concurrent_tasks"),
        advertise=str((merged.get("advertise") or {}).get("count", "coarse")),
        extremes=merged.get("extremes", "deny") == "allow",
        metrics=merged.get("metrics"),
        usage=tuple(
            _usage_rule(f"{where}.usage[{i}]", u, groups, own_peer)
            for i, u in enumerate(merged.get("usage") or [])
        ),
    )


def _usage_rule(
    where: str, u: dict[str, Any], groups: Mapping[str, tuple[str, ...]], own_peer: str
) -> UsageRule:
    who = str(u["requester"])
    if who == ANYONE:
        peers = None
    elif who == SELF:
        peers = frozenset({own_peer})
    else:
        peers = frozenset(groups.get(who, (who,)))
    return UsageRule(
        where=where,
        requesters=peers,
        requester_text=who,
        taskpack=str(u["taskpack"]),
        period=str(u["period"]),
        max_runs=u.get("max_runs"),
        max_records=u.get("max_records"),
    )


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def parse_policy(
    doc: Any,
    *,
    own_peer: str,
    allow_any_requester: bool = False,
    min_records: int = 10,
    source: str | None = None,
) -> SitePolicy:
    """A SitePolicy from a parsed document (None or {} = the safe default policy).

    `min_records` is the node's k (``--min-records``) where the policy sets none."""
    doc = {} if doc is None else doc
    # Every problem at once: the schema's, then what only meaning can tell (both are
    # written to cope with a document of the wrong shape).
    problems = policy_schema_problems(doc) + json_problems(doc)
    if isinstance(doc, dict):
        problems += _semantic_problems(doc)
    problems = sorted(set(problems))
    if problems:
        raise PolicyError(problems, source or "")
    builtin: dict[str, Any] = {
        # Safe default: only this node's own operator may use a dataset the policy does not
        # name; --allow-any-requester (development) opens it to anyone.
        "allow": [ANYONE] if allow_any_requester else [SELF],
        "k": int(min_records),
    }
    groups = {g: tuple(m) for g, m in (doc.get("requesters") or {}).items()}
    base = {**builtin, **(doc.get("defaults") or {})}
    defaults = _rules("defaults", {}, base, groups, own_peer, listed=False)
    datasets = {
        name: _rules(f"datasets.{name}", block, base, groups, own_peer, listed=True)
        for name, block in (doc.get("datasets") or {}).items()
    }
    return SitePolicy(
        own_peer=own_peer,
        requesters=groups,
        defaults=defaults,
        datasets=datasets,
        allow_any_requester=allow_any_requester,
        source=source,
    )


def load_policy(
    path: Path | None,
    *,
    own_peer: str,
    allow_any_requester: bool = False,
    min_records: int = 10,
) -> SitePolicy:
    """The policy in `path` (normally DATA_DIR/policy.yaml); a missing file (or None) gives
    the safe default policy. Raises PolicyError listing every problem."""
    kw: dict[str, Any] = {
        "own_peer": own_peer,
        "allow_any_requester": allow_any_requester,
        "min_records": min_records,
    }
    if path is None or not Path(path).exists():
        return parse_policy(None, **kw)
    where = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError([f"{where}: cannot read: {exc.strerror or exc}"], where) from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError([f"{where}: larger than {MAX_POLICY_BYTES} bytes"], where)
    try:
        doc = load_yaml(data)
    except yaml.YAMLError as exc:
        problem = f"{where}: not valid YAML: {' '.join(str(exc).split())}"
        raise PolicyError([problem], where) from None
    return parse_policy(doc, source=where, **kw)
