"""The SDK a taskpack author writes against: subclass `Task` in `src/task.py`.

The runtime (p2pfl.runtime) loads `src/task.py`, finds the one `Task` subclass in it,
instantiates it with no arguments and calls its hooks. The same hooks serve every task
type:

training (fedavg / fedprox / gossip), once per node per task, then per round::

    validate_inputs(ctx, inputs)              dry run before volunteering (raise to refuse)
    data = preprocess(ctx, inputs)            kept in the worker's memory for the task
    weights = initial_weights(ctx)            same on every node (seeded by ctx.seed)
    update = execute(ctx, data, weights)      one round of local training -> Update
    metrics = evaluate(ctx, data, weights)    the global model on local held-out data
    partial = postprocess(ctx, partial)       the final per-node partial that leaves the node
    result = reduce(ctx, partials)            at the elected peer only: the final step

analysis: ``validate_inputs``, ``preprocess``, ``execute`` (returns an Update whose
``aggregates`` hold the node's aggregates and no weights), ``postprocess`` and ``reduce``.

preprocessing (a flow step with an ``output``): the training hooks, where the "weights" are
the statistics of a transform (averaged over nodes like a model), then
``transform(ctx, data, weights) -> Table``: the derived dataset this node keeps.

Weights are ``dict[str, numpy.ndarray]`` (a torch state dict converted with
``p2pfl.fl.torch_utils.state_to_numpy``), in a fixed key order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]
Metrics = dict[str, float]


@dataclass
class DPConfig:
    """Differential privacy asked for by the manifest (Opacus, per node).

    `deterministic` False (real nodes, the default): DP noise and Poisson sampling draw
    from fresh secret seeds, so no other peer can regenerate and subtract the noise.
    True is for simulations only: reproducible noise from the task's public seed."""

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    deterministic: bool = False


@dataclass
class Context:
    """What a hook knows about the work it is doing. Plain data: no I/O handles."""

    task_id: str
    node: str  # this node's peer id
    params: dict[str, Any]  # validated against configs/schema.json, defaults filled in
    seed: int  # derived from the task id: equal on every node
    round: int = 0  # 1-based during training, 0 outside rounds
    rounds: int = 1
    protocol: str = "fedavg"  # fedavg | fedprox | gossip
    mu: float = 0.0  # FedProx proximal weight (0 for plain fedavg)
    dp: DPConfig | None = None
    # Per-node persistent local state: survives rounds and node restarts (JSON-able values).
    state: dict[str, Any] = field(default_factory=dict)
    workdir: Path = Path(".")  # private, wiped when the task ends
    log: Callable[[str], None] = field(default=logging.getLogger("p2pfl.task").info)


@dataclass
class Update:
    """What `execute` returns: a local model (training) or local aggregates (analysis)."""

    num_samples: int
    weights: Weights | None = None
    metrics: Metrics = field(default_factory=dict)  # e.g. {"loss": 0.31, "epsilon": 2.1}
    aggregates: dict[str, Any] = field(default_factory=dict)  # analysis: count, sum, ...


@dataclass
class Table:
    """A derived dataset (what a preprocessing task's `transform` returns): features,
    integer labels and the feature columns' names. It is kept on the node that made it."""

    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]


@dataclass
class Partial:
    """One node's final contribution to the reduce step."""

    node: str
    num_samples: int
    metrics: Metrics = field(default_factory=dict)
    aggregates: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class of every taskpack's task. Override what your task type needs."""

    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        """Raise ValueError (with a reason a person can act on) if the inputs are unusable."""
        for name, path in inputs.items():
            if not Path(path).exists():
                raise ValueError(f"input {name!r}: {path} does not exist")

    def preprocess(self, ctx: Context, inputs: dict[str, Path]) -> Any:
        """Load and prepare local data; the result is passed to execute/evaluate."""
        return inputs

    def initial_weights(self, ctx: Context) -> Weights | None:
        """The initial global model; must be deterministic for ctx.seed. None: no model."""
        return None

    def execute(self, ctx: Context, data: Any, weights: Weights | None) -> Update:
        raise NotImplementedError(f"{type(self).__name__}.execute")

    def evaluate(self, ctx: Context, data: Any, weights: Weights | None) -> Metrics:
        """Metrics of `weights` on local held-out data; include "num_samples"."""
        return {}

    def transform(self, ctx: Context, data: Any, weights: Weights | None) -> Table:
        """Preprocessing: this node's derived dataset, from its data and the statistics
        every node agreed on (`weights`: the global "model" after the last round). It is
        registered on this node under the flow step's `output` name and never leaves."""
        raise NotImplementedError(f"{type(self).__name__}.transform")

    def postprocess(self, ctx: Context, partial: Partial) -> Partial:
        """Last chance to shape what leaves this node (e.g. round or drop fields)."""
        return partial

    def reduce(self, ctx: Context, partials: list[Partial]) -> dict[str, Any]:
        """Final step at the elected peer. Default: sample-weighted mean of each metric."""
        total = sum(p.num_samples for p in partials)
        keys = sorted({k for p in partials for k in p.metrics})
        out: dict[str, Any] = {"num_samples": total, "nodes": len(partials)}
        for key in keys:
            pairs = [(p.metrics[key], p.num_samples) for p in partials if key in p.metrics]
            weight = sum(n for _, n in pairs)
            if weight > 0:
                out[key] = float(sum(v * n for v, n in pairs) / weight)
        return out


# --- analysis outputs the node can check -----------------------------------------------------
#
# An analysis task returns its aggregates in this vocabulary (in Update.aggregates /
# Partial.aggregates): plain msgpack-able dicts tagged "_release" that say how many records
# stand behind each number. The node holding the data filters them before they leave
# (p2pfl.policy.release.filter_release): anything under its k is dropped or shown as "<k",
# extremes leave only if its policy allows, DP noise is added where its policy asks, and
# untagged values are refused. `bound` is the largest |value| one record can contribute
# (the clipping range): without it a total or mean cannot be noised, so under DP it is dropped.

RELEASE_TAG = "_release"


def _n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"a record count must be an integer >= 0, got {n!r}")
    return int(n)


def _finite(v: float, what: str) -> float:
    f = float(v)
    if not np.isfinite(f):
        raise ValueError(f"{what} must be finite, got {v!r}")
    return f


def count(n: int) -> dict[str, Any]:
    """The number of records `n`."""
    return {RELEASE_TAG: "count", "n": _n(n)}


def _with_bound(d: dict[str, Any], bound: float | None) -> dict[str, Any]:
    if bound is not None:
        d["bound"] = _finite(bound, "bound")
        if d["bound"] <= 0:
            raise ValueError("bound must be > 0")
    return d


def total(value: float, n: int, *, bound: float | None = None) -> dict[str, Any]:
    """A sum `value` over `n` records, each contributing at most `bound` in absolute value."""
    return _with_bound({RELEASE_TAG: "total", "value": _finite(value, "total"), "n": _n(n)}, bound)


def mean(value: float, n: int, *, bound: float | None = None) -> dict[str, Any]:
    """A mean `value` over `n` records (|each| <= `bound`)."""
    return _with_bound({RELEASE_TAG: "mean", "value": _finite(value, "mean"), "n": _n(n)}, bound)


def histogram(edges: Any, counts: Any) -> dict[str, Any]:
    """Record counts per bin; `edges` has one more entry than `counts`."""
    e = [_finite(x, "edge") for x in edges]
    c = [_n(int(x)) if isinstance(x, np.integer) else _n(x) for x in counts]
    if len(e) != len(c) + 1:
        raise ValueError(f"{len(e)} edges for {len(c)} bins (need bins + 1)")
    return {RELEASE_TAG: "histogram", "edges": e, "counts": c}


def groups(counts: dict[str, int]) -> dict[str, Any]:
    """Record counts per category (group name -> count)."""
    return {RELEASE_TAG: "groups", "counts": {str(g): _n(c) for g, c in counts.items()}}


def extreme(which: str, value: float, n: int) -> dict[str, Any]:
    """The exact minimum or maximum over `n` records (leaves only where a site allows it)."""
    if which not in ("min", "max"):
        raise ValueError(f"which must be 'min' or 'max', got {which!r}")
    return {RELEASE_TAG: "extreme", "which": which, "value": _finite(value, which), "n": _n(n)}


def is_released(value: Any, kind: str | None = None) -> bool:
    """Whether `value` is a typed aggregate (of `kind`, if given)."""
    return (
        isinstance(value, dict)
        and RELEASE_TAG in value
        and (kind is None or value[RELEASE_TAG] == kind)
    )
