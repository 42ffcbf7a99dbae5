"""Scenario files: YAML in, a frozen dataclass tree out, every problem reported by path.

A scenario describes one simulated experiment: how many nodes, how they are wired, which
dataset is split how, which taskpack runs with which parameters, the link model, a
round-keyed fault schedule, Byzantine nodes and differential privacy. Validation collects
*all* problems before raising, so a researcher fixes a file in one pass::

    p2pfl.errors.ValidationError: invalid scenario:
      nodes: must be an integer >= 1
      faults[1].partition: groups must cover each node at most once

The raw (plain dict) form is kept public too (`load_raw`, `apply_override`, `parse`) because
experiments vary dotted paths of the raw document and re-validate each grid point.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from p2pfl.core.aggregation import MAX_GROUP_SIZE, aggregation_problem
from p2pfl.errors import ValidationError

# "hierarchical": a full mesh whose fedavg rounds aggregate in groups (core/hierarchy.py).
TOPOLOGIES = ("full", "ring", "line", "random-regular", "small-world", "hierarchical")
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
PROTOCOLS = ("fedavg", "fedprox", "gossip")
# `gossip` and `fedprox` are accepted as aggregator names too: they then pick the protocol
# and the aggregator becomes fedavg (see _parse_params), which is what
# `--vary params.aggregator=fedavg,gossip` means. The others are p2pfl.fl.aggregate's names.
AGGREGATORS = ("fedavg", "fedprox", "gossip", "median", "trimmed_mean", "krum")
ATTACKS = ("sign-flip", "gaussian-noise", "scaled")
FAULT_ACTIONS = ("crash", "partition", "heal", "restart")
EXECUTORS = ("local", "ray")  # where taskpack jobs run (p2pfl.sim.cluster.make_pool)
# Datasets we know without importing p2pfl.fl; whatever p2pfl.fl.datasets lists is added.
KNOWN_DATASETS = ("digits", "breast-cancer", "fashion-mnist", "heart-disease")
# Datasets whose rows carry a natural site, and how many (the `natural` partition puts one
# site on each node, so it needs exactly that many nodes).
NATURAL_SITES = {"heart-disease": 4}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --- the dataclass tree ----------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    kind: str = "full"
    degree: int | None = None  # random-regular, small-world
    rewire: float | None = None  # small-world
    group_size: int | None = None  # hierarchical

    def as_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "degree": self.degree, "rewire": self.rewire}
        if self.group_size is not None:
            out["group_size"] = self.group_size
        return out


@dataclass(frozen=True)
class Partition:
    kind: str = "iid"
    alpha: float | None = None  # dirichlet
    per_node: int | None = None  # shards: shards per node


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    partition: Partition = field(default_factory=Partition)
    test_fraction: float = 0.2


@dataclass(frozen=True)
class Params:
    rounds: int
    local_epochs: int = 1
    aggregator: str = "fedavg"
    protocol: str = "fedavg"
    # Every other key (mu, fanout, lr, batch_size...) goes to the task untouched, in order.
    extra: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "aggregator": self.aggregator,
            "protocol": self.protocol,
        }
        out.update(dict(self.extra))
        return out


@dataclass(frozen=True)
class Link:
    latency_ms: float = 20.0
    bandwidth_mbps: float = 100.0
    loss: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "latency_ms": self.latency_ms,
            "bandwidth_mbps": self.bandwidth_mbps,
            "loss": self.loss,
        }


@dataclass(frozen=True)
class Fault:
    """One action at the start of `round`: exactly one of crash/partition/heal/restart."""

    round: int
    action: str
    nodes: tuple[int, ...] = ()  # crash, restart
    groups: tuple[tuple[int, ...], ...] = ()  # partition

    def as_dict(self) -> dict[str, Any]:
        """The scenario-file form, which is what the cluster takes."""
        if self.action == "partition":
            return {"round": self.round, "partition": [list(g) for g in self.groups]}
        if self.action == "heal":
            return {"round": self.round, "heal": True}
        return {"round": self.round, self.action: list(self.nodes)}


@dataclass(frozen=True)
class Byzantine:
    nodes: tuple[int, ...]
    attack: str
    scale: float | None = (
        None  # `scaled`, `sign-flip`: the update's multiplier (attacks.DEFAULT_SCALE)
    )
    std: float | None = None  # `gaussian-noise`: noise standard deviation

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nodes": list(self.nodes), "attack": self.attack}
        if self.scale is not None:
            out["scale"] = self.scale
        if self.std is not None:
            out["std"] = self.std
        return out


@dataclass(frozen=True)
class DP:
    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0

    def as_dict(self) -> dict[str, float]:
        return {"epsilon": self.epsilon, "delta": self.delta, "max_grad_norm": self.max_grad_norm}


@dataclass(frozen=True)
class Executor:
    """Where the nodes' taskpack jobs run: this process, or Ray actors (address None:
    a Ray started on this machine; "auto": the cluster running here; "HOST:PORT")."""

    kind: str = "local"
    address: str | None = None
    cpus_per_job: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "address": self.address, "cpus_per_job": self.cpus_per_job}


@dataclass(frozen=True)
class Rollout:
    """A partial rollout: several versions of the taskpack's name in one task, each node
    on one of them by a rule every node checks (core/versions.py). `shares` are the
    versions' fractions in file order (the first version's parameters are the task's);
    `taskpacks` are the directories of the versions other than the scenario's own
    taskpack, published beside it."""

    shares: tuple[tuple[str, float], ...]
    taskpacks: tuple[tuple[str, Path], ...] = ()

    def spec(self) -> str:
        """The CLI's form, `1.0.0=0.8,1.1.0=0.2` (what ClusterSpec.rollout takes)."""
        return ",".join(f"{version}={share:g}" for version, share in self.shares)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shares": dict(self.shares),
            "taskpacks": {v: str(p) for v, p in self.taskpacks},
        }


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    nodes: int
    topology: Topology
    dataset: DatasetSpec
    taskpack: Path  # resolved (absolute when found)
    params: Params
    network: Link
    faults: tuple[Fault, ...] = ()
    byzantine: Byzantine | None = None
    dp: DP | None = None
    source: Path | None = None  # the YAML file it came from, if any
    flow: Path | None = None  # a flow file: the run is the whole flow (taskpack: its first step's)
    executor: Executor = Executor()
    rollout: Rollout | None = None

    @property
    def rounds(self) -> int:
        return self.params.rounds


# --- loading -------------------------------------------------------------------------


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a scenario file into a plain dict (YAML safe_load). Errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError([f"{p}: no such file"], "scenario") from None
    except OSError as exc:
        raise ValidationError([f"{p}: cannot read ({exc.strerror})"], "scenario") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise ValidationError([f"{p}: not valid YAML ({msg})"], "scenario") from None
    if not isinstance(doc, dict):
        raise ValidationError([f"{p}: the document must be a mapping"], "scenario")
    return doc


def load_scenario(
    path: str | Path, *, seed: int | None = None, check_files: bool = True
) -> Scenario:
    """Load and validate a scenario file. `seed` overrides the file's seed."""
    p = Path(path)
    return parse(
        load_raw(p), base_dir=p.resolve().parent, source=p, seed=seed, check_files=check_files
    )


def apply_override(raw: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of `raw` with `dotted` (e.g. ``params.aggregator``) set to `value`.

    Intermediate mappings are created when missing; walking through a non-mapping is an
    error by path. Whether the key is *allowed* is decided by `parse` afterwards.
    """
    out = copy.deepcopy(dict(raw))
    parts = dotted.split(".")
    if not dotted or any(not part for part in parts):
        raise ValidationError([f"{dotted or '(empty)'}: not a dotted path"], "override")
    node: dict[str, Any] = out
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise ValidationError([f"{dotted}: {where} is not a mapping"], "override")
        node = nxt
    node[parts[-1]] = value
    return out


def resolve_taskpack(ref: str, base_dir: Path | None) -> Path:
    """Find a taskpack directory: next to the scenario, in its ancestors (the repo root),
    in the working directory, then beside the installed package. The first that exists
    wins; if none does, the repo root's candidate is returned (and reported as missing)."""
    ref_path = Path(ref).expanduser()
    if ref_path.is_absolute():
        return ref_path
    candidates: list[Path] = []
    if base_dir is not None:
        base = base_dir.resolve()
        candidates += [base / ref_path, *(anc / ref_path for anc in base.parents)]
    candidates.append(Path.cwd() / ref_path)
    candidates.append(Path(__file__).resolve().parents[2] / ref_path)
    for cand in candidates:
        if cand.is_dir():
            return cand
    # Missing: name the repo root's candidate (the documented place), not the first tried.
    if base_dir is not None:
        for anc in (base_dir.resolve(), *base_dir.resolve().parents):
            if (anc / "pyproject.toml").is_file() or (anc / ".git").exists():
                return anc / ref_path
    return candidates[0]


def parse(
    raw: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    source: Path | None = None,
    seed: int | None = None,
    check_files: bool = True,
) -> Scenario:
    """Validate a raw scenario dict. Raises ValidationError listing every problem."""
    scenario, problems = _parse_scenario(raw, base_dir=base_dir, source=source, seed=seed)
    if check_files:
        # The taskpack decides which `params` keys it takes, and their values.
        from p2pfl.sim import checks

        if scenario is not None and not scenario.taskpack.is_dir():
            problems.append(f"taskpack: no such directory: {scenario.taskpack}")
        elif scenario is not None and scenario.flow is not None:
            problems += checks.flow_param_problems(scenario)
        elif scenario is not None:
            problems += checks.taskpack_problems(scenario)
            problems += checks.rollout_problems(scenario)
        elif isinstance(raw.get("taskpack"), str) and isinstance(raw.get("params"), dict):
            # Other parts are broken: still name the params keys the taskpack would refuse.
            taskpack = resolve_taskpack(raw["taskpack"], base_dir)
            problems += checks.unknown_param_problems(taskpack, raw["params"])
    if problems or scenario is None:
        what = "scenario" if source is None else f"scenario {source}"
        raise ValidationError(problems or ["(root): invalid"], what)
    return scenario


def scenario_problems(raw: Mapping[str, Any], *, check_files: bool = False) -> list[str]:
    """Every problem of a raw scenario as `path: message` (empty when valid)."""
    try:
        parse(raw, check_files=check_files)
    except ValidationError as exc:
        return exc.problems
    return []


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def valid_name(name: str) -> bool:
    """Names become directory names (runs/<name>-<seed>/): keep them path-safe."""
    return bool(_NAME_RE.match(name))


# --- validation ----------------------------------------------------------------------

_MISSING: Any = object()

# Every key a scenario may hold, in one place: section path -> (allowed keys, required
# keys). A key not listed is an error by path (`network.jitter: unknown key`). A new section
# is one entry here plus its parser; `params` keys beyond the simulator's own
# (`PARAM_KEYS`) are checked against the taskpack's configs/schema.json (p2pfl.sim.checks).
KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "": (
        ("name", "seed", "nodes", "topology", "dataset", "taskpack", "params", "network",
         "faults", "byzantine", "dp", "flow", "executor", "rollout"),
        ("name", "nodes", "dataset", "params"),  # and a taskpack or a flow
    ),
    "topology": (("kind", "degree", "rewire", "group_size"), ("kind",)),
    "dataset": (("name", "partition", "test_fraction"), ("name",)),
    "dataset.partition": (("kind", "alpha", "per_node"), ("kind",)),
    "network": (("latency_ms", "bandwidth_mbps", "loss"), ()),
    "faults[]": (("round", *FAULT_ACTIONS), ("round",)),
    "byzantine": (("nodes", "attack", "scale", "std"), ("nodes", "attack")),
    "dp": (("epsilon", "delta", "max_grad_norm"), ("epsilon",)),
    "rollout": (("shares", "taskpacks"), ("shares", "taskpacks")),
}  # fmt: skip
# `params` keys the simulator itself reads (typed fields of Params); `rounds` is required.
PARAM_KEYS = ("rounds", "local_epochs", "aggregator", "protocol")


def _dataset_names() -> tuple[str, ...]:
    """Our static list plus whatever p2pfl.fl.datasets offers (if it says)."""
    names = set(KNOWN_DATASETS)
    try:
        from p2pfl.fl import datasets as fl_datasets  # written by another helper
    except ImportError:
        return tuple(sorted(names))
    for attr in ("DATASETS", "LOADERS", "NAMES", "available"):
        found = getattr(fl_datasets, attr, None)
        if callable(found):
            try:
                found = found()
            except Exception:  # noqa: BLE001 - a listing helper must not break validation
                found = None
        if isinstance(found, Mapping | list | tuple | set | frozenset):
            names.update(str(n) for n in found)
    return tuple(sorted(names))


def _aggregator_names() -> tuple[str, ...]:
    names = set(AGGREGATORS)
    try:
        from p2pfl.fl import aggregate as fl_aggregate
    except ImportError:
        return tuple(sorted(names))
    found = getattr(fl_aggregate, "AGGREGATORS", None)
    if isinstance(found, Mapping | list | tuple | set | frozenset):
        names.update(str(n) for n in found)
    return tuple(sorted(names))


class _Checker:
    """Collects `path: message` problems while reading typed values out of a raw doc."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def mapping(
        self, value: Any, path: str, keys: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.err(path, "must be a mapping")
            return None
        prefix = f"{path}." if path else ""
        for key in value:
            if key not in keys:
                self.err(f"{prefix}{key}", f"unknown key (known: {', '.join(keys)})")
        for key in required:
            if key not in value:
                self.err(f"{prefix}{key}", "required")
        return value

    def section(self, value: Any, path: str, schema: str | None = None) -> dict[str, Any] | None:
        """`value` as the mapping at `path`, its keys checked against KEYS[schema or path]."""
        keys, required = KEYS[path if schema is None else schema]
        return self.mapping(value, path, keys, required)

    def integer(
        self, m: Mapping[str, Any], key: str, path: str, *, default: Any = _MISSING,
        lo: int | None = None, hi: int | None = None,
    ) -> int | None:  # fmt: skip
        value = m.get(key, default)
        if value is _MISSING:
            return None  # `required` was already reported by mapping()
        if value is None and default is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            self.err(path, f"must be an integer, got {value!r}")
            return None
        if lo is not None and value < lo or hi is not None and value > hi:
            bounds = (
                f">= {lo}" if hi is None else f"in {lo}..{hi}" if lo is not None else f"<= {hi}"
            )
            self.err(path, f"must be {bounds}, got {value}")
            return None
        return value

    def number(
        self, m: Mapping[str, Any], key: str, path: str, *, default: Any = _MISSING,
        lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, hi_open: bool = False,
    ) -> float | None:  # fmt: skip
        value = m.get(key, default)
        if value is _MISSING or (value is None and default is None):
            return None
        if not is_finite_number(value):
            self.err(path, f"must be a finite number, got {value!r}")
            return None
        v = float(value)
        too_low = lo is not None and (v <= lo if lo_open else v < lo)
        too_high = hi is not None and (v >= hi if hi_open else v > hi)
        if too_low or too_high:
            left = "" if lo is None else ("> " if lo_open else ">= ") + f"{lo:g}"
            right = "" if hi is None else ("< " if hi_open else "<= ") + f"{hi:g}"
            self.err(path, f"must be {' and '.join(x for x in (left, right) if x)}, got {value}")
            return None
        return v

    def choice(
        self, m: Mapping[str, Any], key: str, path: str, choices: tuple[str, ...],
        *, default: Any = _MISSING,
    ) -> str | None:  # fmt: skip
        value = m.get(key, default)
        if value is _MISSING:
            return None
        if value not in choices:
            self.err(path, f"unknown {key} {value!r} (one of: {', '.join(choices)})")
            return None
        return str(value)

    def node_list(self, value: Any, path: str, nodes: int | None) -> tuple[int, ...] | None:
        if not isinstance(value, list) or not value:
            self.err(path, "must be a non-empty list of node indices")
            return None
        ok = True
        for i, v in enumerate(value):
            if not isinstance(v, int) or isinstance(v, bool):
                self.err(f"{path}[{i}]", f"must be a node index, got {v!r}")
                ok = False
            elif nodes is not None and not 0 <= v < nodes:
                self.err(f"{path}[{i}]", f"node {v} out of range 0..{nodes - 1}")
                ok = False
        if ok and len(set(value)) != len(value):
            self.err(path, "lists a node more than once")
            ok = False
        return tuple(value) if ok else None


def _parse_scenario(
    raw: Mapping[str, Any], *, base_dir: Path | None, source: Path | None, seed: int | None
) -> tuple[Scenario | None, list[str]]:
    c = _Checker()
    doc = c.section(dict(raw), "")
    if doc is None:
        return None, c.problems

    name = doc.get("name")
    if "name" in doc and not (isinstance(name, str) and valid_name(name)):
        c.err("name", "must be 1-64 characters of letters, digits, '.', '_' or '-'")
    if seed is None:
        seed = c.integer(doc, "seed", "seed", default=0, lo=0)
    elif not isinstance(seed, int) or seed < 0:
        c.err("seed", f"must be an integer >= 0, got {seed!r}")
    nodes = c.integer(doc, "nodes", "nodes", lo=1)

    topology = _parse_topology(c, doc.get("topology", {"kind": "full"}), nodes)
    dataset = _parse_dataset(c, doc.get("dataset"), nodes) if "dataset" in doc else None
    taskpack: Path | None = None
    flow = _parse_flow(c, doc, base_dir)
    if flow is not None:
        taskpack = flow[1]
    elif "taskpack" not in doc and "flow" not in doc:
        c.err("taskpack", "required (or a flow)")
    if "taskpack" in doc and "flow" in doc:
        c.err("flow", "a scenario runs a taskpack or a flow, not both")
    elif "taskpack" in doc:
        ref = doc["taskpack"]
        if isinstance(ref, str) and ref.strip():
            taskpack = resolve_taskpack(ref, base_dir)
        else:
            c.err("taskpack", "must be a directory path (string)")
    params = _parse_params(c, doc.get("params"), nodes) if "params" in doc else None
    link = _parse_link(c, doc.get("network", {}))
    # Fault rounds are bounded by params.rounds even when another params key is broken.
    raw_params = doc.get("params")
    rounds = raw_params.get("rounds") if isinstance(raw_params, dict) else None
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        rounds = None
    faults = _parse_faults(c, doc.get("faults", []), nodes, rounds)
    byz = _parse_byzantine(c, doc.get("byzantine"), nodes)
    dp = _parse_dp(c, doc.get("dp"))
    executor = _parse_executor(c, doc.get("executor"))
    rollout = _parse_rollout(c, doc.get("rollout"), base_dir)
    if rollout is not None and "flow" in doc:
        c.err("rollout", "a flow's steps name their own taskpacks; a rollout is for a taskpack")

    if c.problems:
        return None, c.problems
    assert nodes is not None and dataset is not None and params is not None  # by `required`
    assert taskpack is not None and topology is not None and link is not None and seed is not None
    scenario = Scenario(
        name=str(name), seed=seed, nodes=nodes, topology=topology, dataset=dataset,
        taskpack=taskpack, params=params, network=link, faults=faults or (),
        byzantine=byz, dp=dp, source=source, flow=flow[0] if flow else None,
        executor=executor or Executor(), rollout=rollout,
    )  # fmt: skip
    return scenario, c.problems


def _parse_flow(
    c: _Checker, doc: Mapping[str, Any], base_dir: Path | None
) -> tuple[Path, Path] | None:
    """(the flow file, its first step's taskpack) for `flow: flows/x.yaml`; its own problems
    are listed under `flow`."""
    ref = doc.get("flow")
    if ref is None:
        return None
    if not (isinstance(ref, str) and ref.strip()):
        c.err("flow", "must be a flow file path (string)")
        return None
    from p2pfl.flow.spec import load_flow, taskpack_dir

    candidates = [Path(ref).expanduser()]
    if base_dir is not None:
        base = base_dir.resolve()
        candidates = [base / ref, *(anc / ref for anc in base.parents), Path.cwd() / ref]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        c.err("flow", f"no such flow file: {ref}")
        return None
    try:
        spec = load_flow(path)
    except ValidationError as exc:
        for problem in exc.problems:
            c.problems.append(f"flow ({ref}): {problem}")
        return None
    return path, taskpack_dir(spec, spec.steps[0])


def _parse_topology(c: _Checker, value: Any, nodes: int | None) -> Topology | None:
    m = c.section(value, "topology")
    if m is None:
        return None
    kind = c.choice(m, "kind", "topology.kind", TOPOLOGIES)
    needs_degree = kind in ("random-regular", "small-world")
    degree = None
    if needs_degree and "degree" not in m:
        c.err("topology.degree", f"required for {kind}")
    elif "degree" in m:
        if not needs_degree:
            c.err("topology.degree", f"only for random-regular and small-world, not {kind}")
        hi = nodes - 1 if nodes is not None and nodes >= 2 else None
        degree = c.integer(m, "degree", "topology.degree", lo=1, hi=hi)
        if kind == "random-regular" and degree is not None and nodes is not None:
            if nodes * degree % 2:
                c.err("topology.degree", f"nodes x degree must be even ({nodes} x {degree})")
    rewire = None
    if "rewire" in m:
        if kind != "small-world":
            c.err("topology.rewire", f"only for small-world, not {kind}")
        rewire = c.number(m, "rewire", "topology.rewire", lo=0.0, hi=1.0)
    elif kind == "small-world":
        rewire = 0.1
    group_size = None
    if kind == "hierarchical":
        group_size = c.integer(
            m, "group_size", "topology.group_size", default=8, lo=2, hi=MAX_GROUP_SIZE
        )
    elif "group_size" in m:
        c.err("topology.group_size", f"only for hierarchical, not {kind}")
    if kind is None:
        return None
    return Topology(kind=kind, degree=degree, rewire=rewire, group_size=group_size)


def _parse_dataset(c: _Checker, value: Any, nodes: int | None) -> DatasetSpec | None:
    m = c.section(value, "dataset")
    if m is None:
        return None
    name = c.choice(m, "name", "dataset.name", _dataset_names())
    test_fraction = c.number(
        m, "test_fraction", "dataset.test_fraction", default=0.2, lo=0.0, hi=1.0,
        lo_open=True, hi_open=True,
    )  # fmt: skip
    part = _parse_partition(c, m.get("partition", {"kind": "iid"}), name, nodes)
    if name is None or part is None or test_fraction is None:
        return None
    return DatasetSpec(name=name, partition=part, test_fraction=test_fraction)


def _parse_partition(
    c: _Checker, value: Any, dataset: str | None, nodes: int | None
) -> Partition | None:
    p = "dataset.partition"
    m = c.section(value, p)
    if m is None:
        return None
    kind = c.choice(m, "kind", f"{p}.kind", PARTITIONS)
    alpha = per_node = None
    if kind == "dirichlet":
        if "alpha" not in m:
            c.err(f"{p}.alpha", "required for dirichlet")
        alpha = c.number(m, "alpha", f"{p}.alpha", lo=0.0, lo_open=True)
    elif "alpha" in m:
        c.err(f"{p}.alpha", f"only for dirichlet, not {kind}")
    if kind == "shards":
        per_node = c.integer(m, "per_node", f"{p}.per_node", default=2, lo=1)
    elif "per_node" in m:
        c.err(f"{p}.per_node", f"only for shards, not {kind}")
    if kind == "natural" and dataset is not None and dataset in KNOWN_DATASETS:
        sites = NATURAL_SITES.get(dataset)
        if sites is None:
            c.err(f"{p}.kind", f"dataset {dataset!r} has no natural split (sites)")
        elif nodes is not None and nodes != sites:
            c.err(f"{p}.kind", f"natural split of {dataset} needs nodes == {sites} (one site each)")
    if kind is None:
        return None
    return Partition(kind=kind, alpha=alpha, per_node=per_node)


def _parse_params(c: _Checker, value: Any, nodes: int | None) -> Params | None:
    if not isinstance(value, dict):
        c.err("params", "must be a mapping")
        return None
    if "rounds" not in value:
        c.err("params.rounds", "required")
    rounds = c.integer(value, "rounds", "params.rounds", lo=1)
    epochs = c.integer(value, "local_epochs", "params.local_epochs", default=1, lo=1)
    aggregator = c.choice(
        value, "aggregator", "params.aggregator", _aggregator_names(), default="fedavg"
    )
    implied = aggregator if aggregator in ("gossip", "fedprox") else "fedavg"
    protocol = c.choice(value, "protocol", "params.protocol", PROTOCOLS, default=implied)
    if implied != "fedavg" and protocol is not None:
        # `aggregator: gossip` names a protocol whose combine step is a plain mean.
        if protocol != implied:
            c.err("params.protocol", f"{protocol!r} contradicts aggregator {aggregator!r}")
        aggregator = "fedavg"
    mu: Any = value.get("mu")
    consistent = implied in ("fedavg", protocol)
    if protocol == "fedprox" and consistent and not (is_finite_number(mu) and mu > 0):
        # FedProx with mu 0 is plain FedAvg: never run one under the other's name.
        c.err("params.mu", "required (> 0) with fedprox; mu 0 would silently run plain FedAvg")
    extra: list[tuple[str, Any]] = []
    for key, v in value.items():
        if key in PARAM_KEYS:
            continue
        path = f"params.{key}"
        if not isinstance(key, str):
            c.err(path, "keys must be strings")
        elif key == "mu":
            if c.number(value, "mu", path, lo=0.0) is not None:
                extra.append((key, v))
        elif key == "fanout":
            hi = nodes - 1 if nodes is not None and nodes >= 2 else None
            if c.integer(value, "fanout", path, lo=1, hi=hi) is not None:
                extra.append((key, v))
        elif key == "lr":
            if c.number(value, "lr", path, lo=0.0, lo_open=True) is not None:
                extra.append((key, v))
        elif key == "aggregation":
            problem = aggregation_problem({key: v})
            if problem is not None:
                c.err(path, problem)
            else:
                extra.append((key, v))
        elif not _plain(v):
            c.err(path, "must be a number, string, boolean or a list of them")
        else:
            extra.append((key, v))
    if rounds is None or epochs is None or aggregator is None or protocol is None:
        return None
    return Params(rounds, epochs, aggregator, protocol, tuple(extra))


def _plain(v: Any) -> bool:
    if isinstance(v, list):
        return all(_plain(x) and not isinstance(x, list) for x in v)
    return v is None or isinstance(v, str | bool | int) or is_finite_number(v)


def _parse_link(c: _Checker, value: Any) -> Link | None:
    m = c.section(value, "network")
    if m is None:
        return None
    lat = c.number(m, "latency_ms", "network.latency_ms", default=20.0, lo=0.0)
    bw = c.number(
        m, "bandwidth_mbps", "network.bandwidth_mbps", default=100.0, lo=0.0, lo_open=True
    )
    loss = c.number(m, "loss", "network.loss", default=0.0, lo=0.0, hi=1.0, hi_open=True)
    if lat is None or bw is None or loss is None:
        return None
    return Link(lat, bw, loss)


def _parse_faults(
    c: _Checker, value: Any, nodes: int | None, rounds: int | None
) -> tuple[Fault, ...] | None:
    if value is None:
        return ()
    if not isinstance(value, list):
        c.err("faults", "must be a list")
        return None
    faults: list[Fault] = []
    for i, item in enumerate(value):
        path = f"faults[{i}]"
        m = c.section(item, path, "faults[]")
        if m is None:
            continue
        rnd = c.integer(m, "round", f"{path}.round", lo=1, hi=rounds)
        actions = [a for a in FAULT_ACTIONS if a in m]
        if len(actions) != 1:
            c.err(path, f"needs exactly one of {', '.join(FAULT_ACTIONS)} (got {len(actions)})")
            continue
        action = actions[0]
        ap = f"{path}.{action}"
        fault: Fault | None = None
        if action in ("crash", "restart"):
            ns = c.node_list(m[action], ap, nodes)
            if ns is not None:
                fault = Fault(rnd or 0, action, nodes=ns)
        elif action == "heal":
            if m["heal"] is not True:
                c.err(ap, "must be true")
            else:
                fault = Fault(rnd or 0, "heal")
        else:
            groups = _parse_groups(c, m["partition"], ap, nodes)
            if groups is not None:
                fault = Fault(rnd or 0, "partition", groups=groups)
        if fault is not None and rnd is not None:
            faults.append(fault)
    if len(faults) == len(value):
        _check_fault_order(c, faults)
    # Stable sort: several actions in one round keep their file order.
    return tuple(sorted(faults, key=lambda f: f.round))


def _parse_groups(
    c: _Checker, value: Any, path: str, nodes: int | None
) -> tuple[tuple[int, ...], ...] | None:
    if not isinstance(value, list) or len(value) < 2:
        c.err(path, "must be a list of at least two groups (lists of node indices)")
        return None
    groups = []
    for j, g in enumerate(value):
        ns = c.node_list(g, f"{path}[{j}]", nodes)
        if ns is None:
            return None
        groups.append(ns)
    flat = [n for g in groups for n in g]
    if len(set(flat)) != len(flat):
        c.err(path, "groups must cover each node at most once")
        return None
    return tuple(groups)


def _check_fault_order(c: _Checker, faults: list[Fault]) -> None:
    """Crash only live nodes, restart only crashed ones (walked in round order)."""
    down: set[int] = set()
    order = sorted(range(len(faults)), key=lambda i: faults[i].round)
    for i in order:
        f = faults[i]
        for n in f.nodes:
            if f.action == "crash" and n in down:
                c.err(f"faults[{i}].crash", f"node {n} is already down at round {f.round}")
            elif f.action == "restart" and n not in down:
                c.err(f"faults[{i}].restart", f"node {n} is not down at round {f.round}")
        if f.action == "crash":
            down.update(f.nodes)
        elif f.action == "restart":
            down.difference_update(f.nodes)


def _parse_byzantine(c: _Checker, value: Any, nodes: int | None) -> Byzantine | None:
    if value is None:
        return None
    m = c.section(value, "byzantine")
    if m is None or "nodes" not in m:
        return None
    ns = c.node_list(m["nodes"], "byzantine.nodes", nodes)
    if ns is not None and nodes is not None and len(ns) >= nodes:
        c.err("byzantine.nodes", "at least one node must stay honest")
    attack = c.choice(m, "attack", "byzantine.attack", ATTACKS)
    scale = c.number(m, "scale", "byzantine.scale", default=None)
    std = c.number(m, "std", "byzantine.std", default=None, lo=0.0, lo_open=True)
    if "scale" in m and attack not in ("scaled", "sign-flip"):
        c.err("byzantine.scale", "only for the scaled and sign-flip attacks")
    if "std" in m and attack != "gaussian-noise":
        c.err("byzantine.std", "only for the gaussian-noise attack")
    if ns is None or attack is None:
        return None
    return Byzantine(ns, attack, scale, std)


def _parse_dp(c: _Checker, value: Any) -> DP | None:
    if value is None:
        return None
    m = c.section(value, "dp")
    if m is None:
        return None
    eps = c.number(m, "epsilon", "dp.epsilon", lo=0.0, lo_open=True)
    delta = c.number(
        m, "delta", "dp.delta", default=1e-5, lo=0.0, hi=1.0, lo_open=True, hi_open=True
    )
    norm = c.number(m, "max_grad_norm", "dp.max_grad_norm", default=1.0, lo=0.0, lo_open=True)
    if eps is None or delta is None or norm is None:
        return None
    return DP(eps, delta, norm)


def _parse_executor(c: _Checker, value: Any) -> Executor | None:
    if value is None:
        return Executor()
    m = c.mapping(value, "executor", ("kind", "address", "cpus_per_job"), required=("kind",))
    if m is None:
        return None
    kind = c.choice(m, "kind", "executor.kind", EXECUTORS)
    address = m.get("address")
    if address is not None and not (isinstance(address, str) and address.strip()):
        c.err("executor.address", f"must be a Ray address (auto, HOST:PORT), got {address!r}")
        address = None
    cpus = c.number(m, "cpus_per_job", "executor.cpus_per_job", default=1.0, lo=0.0, lo_open=True)
    if kind == "local" and ("address" in m or "cpus_per_job" in m):
        c.err("executor", "address and cpus_per_job are for kind: ray")
    if kind is None or cpus is None:
        return None
    return Executor(kind, address, cpus)


def _parse_rollout(c: _Checker, value: Any, base_dir: Path | None) -> Rollout | None:
    """`rollout: {shares: {"1.0.0": 0.8, "1.1.0": 0.2}, taskpacks: {"1.1.0": DIR}}`: the
    fractions (checked as the CLI's --rollout is), and a directory for every version but
    one, the scenario's own taskpack (whose manifest version checks.rollout_problems
    matches against the shares, with the other directories' names and versions)."""
    if value is None:
        return None
    m = c.section(value, "rollout")
    if m is None:
        return None
    shares_raw, dirs_raw = m.get("shares"), m.get("taskpacks")
    shares: list[tuple[str, float]] = []
    if "shares" in m and not isinstance(shares_raw, dict):
        c.err("rollout.shares", 'must be a mapping of version to fraction, e.g. {"1.0.0": 0.8}')
    elif isinstance(shares_raw, dict):
        from p2pfl.core.versions import parse_rollout

        for version, share in shares_raw.items():
            path = f"rollout.shares.{version}"
            if not isinstance(version, str):
                c.err(path, f'versions must be quoted strings ("1.0.0"), got {version!r}')
            elif not is_finite_number(share):
                c.err(path, f"must be a fraction in (0, 1], got {share!r}")
            else:
                shares.append((version, float(share)))
        if len(shares) == len(shares_raw):
            try:
                parse_rollout(",".join(f"{v}={share!r}" for v, share in shares))
            except ValueError as exc:
                c.err("rollout.shares", str(exc).removeprefix("--rollout: "))
                shares = []
        else:
            shares = []
    dirs: list[tuple[str, Path]] = []
    if "taskpacks" in m and not isinstance(dirs_raw, dict):
        c.err("rollout.taskpacks", "must be a mapping of version to taskpack directory")
    elif isinstance(dirs_raw, dict):
        known = {v for v, _ in shares}
        for version, ref in dirs_raw.items():
            path = f"rollout.taskpacks.{version}"
            if shares and version not in known:
                c.err(path, f"version not in rollout.shares ({', '.join(sorted(known))})")
            elif not (isinstance(ref, str) and ref.strip()):
                c.err(path, "must be a taskpack directory path (string)")
            else:
                dirs.append((str(version), resolve_taskpack(ref, base_dir)))
        if shares and len(dirs_raw) != len(shares) - 1:
            c.err(
                "rollout.taskpacks",
                f"name a directory for each version but the scenario's taskpack: "
                f"{len(shares) - 1} for {len(shares)} shares, got {len(dirs_raw)}",
            )
    if not shares or len(dirs) != len(shares) - 1:
        return None
    return Rollout(tuple(shares), tuple(dirs))
