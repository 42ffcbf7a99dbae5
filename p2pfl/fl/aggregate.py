"""Aggregation of model updates: pure numpy, no I/O, bit-for-bit deterministic.

Every function takes `updates` as a sequence of ``(weights, num_samples)`` pairs, where
``weights`` is a ``dict[str, np.ndarray]`` with the same keys, in the same order, and the same
shapes for every update. Determinism rule: the same inputs *in the same order* give
bit-identical outputs, because every reduction accumulates in float64 in the given order and
casts back to each tensor's dtype at the end (integer tensors are rounded first). Callers
that want order independence sort the updates first (e.g. by sender peer id).

Gossip averaging (push-sum) and the deterministic choice of gossip partners live in
`p2pfl.fl.pushsum`; they are re-exported here so one import serves a strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from p2pfl.fl.pushsum import (
    PushSumState,
    estimate,
    gossip_sources,
    gossip_targets,
    init_state,
    merge_shares,
    split_shares,
)

Weights = dict[str, np.ndarray]
Updates = Sequence[tuple[Weights, float]]

__all__ = [
    "AGGREGATORS",
    "aggregate_checked",
    "pushsum",
    "update_problem",
    "PushSumState",
    "Weights",
    "aggregate",
    "estimate",
    "fedavg",
    "gossip_sources",
    "gossip_targets",
    "init_state",
    "krum",
    "median",
    "scores_from_distances",
    "squared_distances",
    "merge_shares",
    "split_shares",
    "trimmed_mean",
]


def _check(updates: Updates) -> list[str]:
    """Validate shape agreement and return the key order (of the first update)."""
    if len(updates) == 0:
        raise ValueError("no updates to aggregate")
    keys = list(updates[0][0].keys())
    for i, (weights, num_samples) in enumerate(updates):
        if list(weights.keys()) != keys:
            raise ValueError(f"update {i}: keys {list(weights.keys())} differ from {keys}")
        if not float(num_samples) >= 0:
            raise ValueError(f"update {i}: negative num_samples {num_samples}")
        for key in keys:
            a, b = np.shape(weights[key]), np.shape(updates[0][0][key])
            if a != b:
                raise ValueError(f"update {i}: tensor {key!r} has shape {a}, expected {b}")
    return keys


def _cast(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Cast a float64 result back to the dtype of the input tensor `like`."""
    dtype = np.asarray(like).dtype
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        value = np.rint(value)
    return np.asarray(value).astype(dtype, copy=False)


def _stack(updates: Updates, key: str) -> np.ndarray:
    """All updates' tensor `key` stacked on a new axis 0, as float64."""
    return np.stack([np.asarray(w[key], dtype=np.float64) for w, _ in updates], axis=0)


def fedavg(updates: Updates) -> Weights:
    """Sample-weighted mean: sum_i n_i * w_i / sum_i n_i (FedAvg, McMahan et al. 2017).

    If every update reports 0 samples the plain mean is used (nothing else is defined).
    """
    keys = _check(updates)
    counts = [float(n) for _, n in updates]
    total = sum(counts)
    # Weights as float64 fractions computed once, so each tensor sees identical factors.
    factors = [n / total for n in counts] if total > 0 else [1.0 / len(updates)] * len(updates)
    out: Weights = {}
    for key in keys:
        acc = np.zeros(np.shape(updates[0][0][key]), dtype=np.float64)
        for (weights, _), factor in zip(updates, factors, strict=True):
            # Fixed left-to-right accumulation order keeps the result bit-reproducible.
            acc += np.asarray(weights[key], dtype=np.float64) * factor
        out[key] = _cast(acc, updates[0][0][key])
    return out


def median(updates: Updates) -> Weights:
    """Coordinate-wise median (Yin et al. 2018). Sample counts are ignored on purpose:
    a Byzantine peer could inflate its count, so robust rules weigh every peer equally."""
    keys = _check(updates)
    return {k: _cast(np.median(_stack(updates, k), axis=0), updates[0][0][k]) for k in keys}


def trimmed_mean(updates: Updates, beta: float = 0.1) -> Weights:
    """Coordinate-wise trimmed mean: drop the floor(beta*n) largest and smallest values of
    each coordinate, average the rest. Sample counts are ignored (see `median`)."""
    keys = _check(updates)
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    n = len(updates)
    cut = int(np.floor(beta * n))
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed_mean: beta={beta} trims all {n} updates")
    out: Weights = {}
    for key in keys:
        ordered = np.sort(_stack(updates, key), axis=0, kind="stable")
        kept = ordered[cut : n - cut]
        # Sequential sum over axis 0 (np.add.reduce on a fixed layout is deterministic).
        out[key] = _cast(kept.sum(axis=0) / kept.shape[0], updates[0][0][key])
    return out


def _flatten(weights: Weights, keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[k], dtype=np.float64).ravel() for k in keys])


def krum_scores(updates: Updates, f: int) -> np.ndarray:
    """Krum score of each update: the sum of squared distances to its n - f - 2 nearest
    other updates (Blanchard et al. 2017). Lower is more central."""
    keys = _check(updates)
    n = len(updates)
    if f < 0:
        raise ValueError(f"krum: f must be >= 0, got {f}")
    if n < 2 * f + 3:
        raise ValueError(
            f"krum: needs n >= 2f+3 updates to tolerate f={f} Byzantine peers, got n={n}"
        )
    flat = np.stack([_flatten(w, keys) for w, _ in updates], axis=0)
    return scores_from_distances(squared_distances(flat), f)


def squared_distances(flat: np.ndarray) -> np.ndarray:
    """Pairwise squared distances of the rows of `flat` (float64), row by row: exact,
    deterministic, O(n^2 * d). Reduce-scatter sums these over slices (fl/slices.py)."""
    n = flat.shape[0]
    dist = np.empty((n, n), dtype=np.float64)
    for i in range(n):
        diff = flat - flat[i]
        dist[i] = np.einsum("ij,ij->i", diff, diff)
    return dist


def scores_from_distances(dist: np.ndarray, f: int) -> np.ndarray:
    """Krum scores from an n x n matrix of squared distances."""
    n = dist.shape[0]
    if f < 0 or n < 2 * f + 3:
        raise ValueError(f"krum: needs n >= 2f+3 updates and f >= 0 (n={n}, f={f})")
    closest = n - f - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i), kind="stable")
        scores[i] = others[:closest].sum()
    return scores


def krum(updates: Updates, f: int, m: int = 1) -> Weights:
    """Krum (m=1): the single update with the lowest score. Multi-Krum (m>1): the plain
    (unweighted, see `median`) mean of the m lowest-scored updates. Ties go to the earlier
    update. Requires n >= 2f + 3 and 1 <= m <= n - f."""
    n = len(updates)
    scores = krum_scores(updates, f)
    if not 1 <= m <= n - f:
        raise ValueError(f"krum: m must be in [1, n-f] = [1, {n - f}], got {m}")
    best = np.argsort(scores, kind="stable")[:m]
    chosen = [updates[int(i)] for i in sorted(best)]
    if m == 1:
        return {k: np.array(v, copy=True) for k, v in chosen[0][0].items()}
    return fedavg([(w, 1) for w, _ in chosen])


def pushsum(updates: Updates) -> Weights:
    """Push-sum merge of (estimate, mass) shares: sum_i w_i m_i / sum_i w_i, masses as
    floats (fl/pushsum.py: init_state / merge_shares / estimate, the one implementation)."""
    _check(updates)
    states = [init_state(weights, float(mass)) for weights, mass in updates]
    return estimate(merge_shares(states))


AGGREGATORS: dict[str, Callable[..., Weights]] = {
    "fedavg": fedavg,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "pushsum": pushsum,
}


def aggregate(name: str, updates: Updates, **kw: Any) -> Weights:
    """Dispatch by name: fedavg | median | trimmed_mean (beta=) | krum (f=, m=)."""
    try:
        fn = AGGREGATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}"
        ) from None
    return fn(updates, **kw)


def update_problem(update: Weights, reference: Weights, max_norm: float = 0.0) -> str | None:
    """Why `update` cannot be averaged into a model shaped like `reference`, or None:
    other tensor names, shapes or dtypes; non-finite values; or farther than `max_norm`
    (L2 over every tensor) from the reference when max_norm > 0."""
    if list(update) != list(reference):
        return f"tensors {sorted(update)[:4]} differ from the model's {sorted(reference)[:4]}"
    sq = 0.0
    for key, ref in reference.items():
        value = np.asarray(update[key])
        ref = np.asarray(ref)
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return f"tensor {key!r} is {value.dtype}{list(value.shape)}, the model's {ref.dtype}{list(ref.shape)}"
        # NaN/Inf: refused by decode_tensors already (aggregate_checked reports it).
        if max_norm > 0:
            diff = value.astype(np.float64) - ref.astype(np.float64)
            sq += float(np.dot(diff.ravel(), diff.ravel()))
    if max_norm > 0 and sq**0.5 > max_norm:
        return f"update norm {sq**0.5:.4g} exceeds max_update_norm {max_norm:g}"
    return None


def aggregate_checked(
    method: str,
    blobs: Sequence[tuple[str, Any, float]],
    *,
    reference: Any = None,
    max_norm: float = 0.0,
    options: dict[str, Any] | None = None,
) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """Decode, check and combine update blobs ``(cid, bytes, weight)``: the round's step
    on every node. Updates failing `update_problem` against `reference` (the model the
    round started from) are left out and reported as ``(cid, why)``; the checks are pure
    functions of the bytes, so every honest node leaves out the same ones."""
    from p2pfl.errors import RemoteProtocolError
    from p2pfl.wire import decode_tensors, encode_tensors

    ref = decode_tensors(reference) if reference is not None else None
    kept: list[tuple[Weights, float]] = []
    dropped: list[tuple[str, str]] = []
    for cid, data, weight in blobs:
        try:
            weights = decode_tensors(data)
        except RemoteProtocolError as exc:
            dropped.append((cid, str(exc)))
            continue
        problem = update_problem(
            weights, ref if ref is not None else (kept[0][0] if kept else weights), max_norm
        )
        if problem is not None:
            dropped.append((cid, problem))
            continue
        kept.append((weights, weight))
    if not kept:
        why = "; ".join(f"{cid[:16]}: {reason}" for cid, reason in dropped[:3])
        raise ValueError(f"every update was left out ({why})")
    opts = dict(options or {})
    if method == "krum":  # fewer updates than announced: tolerate what they can
        opts["f"] = min(int(opts.get("f", 0)), max(0, (len(kept) - 3) // 2))
    return bytes(encode_tensors(aggregate(method, kept, **opts))), tuple(dropped)
