"""Push-sum gossip averaging (Kempe, Dobra, Gehrke 2003) and deterministic partner choice.

The math. Every node i holds a pair (x_i, w_i): a numerator x_i (a tensor dict) and a scalar
mass w_i. To start, a node with model m_i and weight a_i (1 for a plain mean, its sample
count for a sample-weighted mean) sets x_i = a_i * m_i and w_i = a_i (`init_state`).
Each round it splits its pair into k+1 equal shares (x_i/(k+1), w_i/(k+1)), keeps one and
sends one to each of k peers (`split_shares`); then it adds up the shares it kept and
received (`merge_shares`). Two invariants follow:

* mass conservation: sum_i w_i and sum_i x_i never change (shares only move), as long as
  no message is lost;
* the estimate x_i / w_i (`estimate`) converges to sum_i x_i / sum_i w_i =
  sum_i a_i m_i / sum_i a_i, the weighted mean, at a geometric rate on a connected graph.

Numerators are held in float64 so that repeated halving and summing does not drift;
`estimate` casts back to the dtypes of the original model. A lost share loses its mass
with its numerator, so the estimate stays a (slightly re-weighted) average, never biased
towards zero: this is why push-sum rather than plain averaging suits a churny network.

`gossip_targets` chooses partners pseudo-randomly but deterministically from
sha256(task_id|round|peer), so that a receiver can compute who will send to it
(`gossip_sources`) and knows when a round's inputs are complete, given the same `live` view.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass
class PushSumState:
    """One node's push-sum pair: `weights` is the numerator x (float64), `mass` is w."""

    weights: Weights
    mass: float
    # The model's original dtypes (key -> dtype string), so `estimate` can cast back.
    dtypes: dict[str, str] | None = None


def init_state(model: Weights, mass: float = 1.0) -> PushSumState:
    """Start push-sum from a model: x = mass * model, w = mass."""
    if not mass > 0:
        raise ValueError(f"push-sum mass must be > 0, got {mass}")
    return PushSumState(
        weights={k: np.asarray(v, dtype=np.float64) * mass for k, v in model.items()},
        mass=float(mass),
        dtypes={k: np.asarray(v).dtype.str for k, v in model.items()},
    )


def split_shares(state: PushSumState, k: int) -> list[PushSumState]:
    """k+1 equal shares of (x, w): element 0 is kept, elements 1..k are sent."""
    if k < 0:
        raise ValueError(f"split_shares: k must be >= 0, got {k}")
    parts = k + 1
    share_w = {key: np.asarray(v, dtype=np.float64) / parts for key, v in state.weights.items()}
    # Every share references its own copy so a receiver may mutate what it got.
    return [
        PushSumState(
            weights={key: v.copy() for key, v in share_w.items()},
            mass=state.mass / parts,
            dtypes=state.dtypes,
        )
        for _ in range(parts)
    ]


def merge_shares(states: Sequence[PushSumState]) -> PushSumState:
    """Sum of shares (x and w add). Order matters for bit-identity: sort by sender first."""
    if not states:
        raise ValueError("merge_shares: no shares to merge")
    keys = list(states[0].weights.keys())
    out: Weights = {}
    for key in keys:
        acc = np.zeros(np.shape(states[0].weights[key]), dtype=np.float64)
        for i, s in enumerate(states):
            if key not in s.weights:
                raise ValueError(f"merge_shares: share {i} lacks tensor {key!r}")
            acc += np.asarray(s.weights[key], dtype=np.float64)
        out[key] = acc
    mass = 0.0
    for s in states:
        mass += float(s.mass)
    dtypes = next((s.dtypes for s in states if s.dtypes is not None), None)
    return PushSumState(weights=out, mass=mass, dtypes=dtypes)


def estimate(state: PushSumState) -> Weights:
    """The node's current estimate of the average: x / w, cast to the model's dtypes."""
    if not state.mass > 0:
        raise ValueError(f"push-sum estimate needs mass > 0, got {state.mass}")
    out: Weights = {}
    for key, x in state.weights.items():
        value = np.asarray(x, dtype=np.float64) / state.mass
        dtype = np.dtype(state.dtypes[key]) if state.dtypes and key in state.dtypes else None
        if dtype is not None and np.issubdtype(dtype, np.integer):
            value = np.rint(value)
        out[key] = value.astype(dtype) if dtype is not None else value
    return out


def _rank_key(task_id: str, round: int, peer: str, candidate: str) -> bytes:
    seed = hashlib.sha256(f"{task_id}|{round}|{peer}".encode()).digest()
    return hashlib.sha256(seed + candidate.encode()).digest()


def gossip_targets(
    task_id: str, round: int, peer: str, live: Sequence[str], fanout: int
) -> list[str]:
    """The up-to-`fanout` live peers (never `peer` itself) that `peer` sends to in `round`.

    A pseudo-random permutation of the sorted live set, keyed by sha256(task_id|round|peer):
    the same on every node that has the same `live` view. Returned in rank order.
    """
    if fanout < 0:
        raise ValueError(f"gossip fanout must be >= 0, got {fanout}")
    candidates = sorted({p for p in live if p != peer})
    candidates.sort(key=lambda c: _rank_key(task_id, round, peer, c))
    return candidates[:fanout]


def gossip_sources(
    task_id: str, round: int, peer: str, live: Sequence[str], fanout: int
) -> list[str]:
    """The live peers that will send to `peer` in `round` (sorted by peer id)."""
    return [
        src
        for src in sorted(set(live))
        if src != peer and peer in gossip_targets(task_id, round, src, live, fanout)
    ]
