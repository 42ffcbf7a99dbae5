"""What an analysis task's outputs may carry off a node: `filter_release`.

Analysis taskpacks describe their outputs with the typed vocabulary of the SDK
(`p2pfl.taskpack.sdk.count`, `total`, `mean`, `histogram`, `groups`, `extreme`): plain
dicts tagged ``"_release"`` that say how many records stand behind each number. The node,
not the taskpack, then decides what leaves:

* every released number stands for at least k records: a count, total or mean over fewer
  is dropped; a histogram bin or group under k is replaced by the string ``"<k"``;
* exact extremes (min / max) leave only when the policy allows them, never under DP;
* with DP on for the task (``rules.epsilon``), counts and sums get Laplace noise (or
  Gaussian with ``rules.delta``) from a fresh, secret seed; the epsilon is split evenly over
  the noised queries and reported in ``"_dp"``. A total or mean without a declared
  ``bound`` (the clipping range of one record) has unknown sensitivity and is dropped;
* anything untagged is refused (fail closed), except finite numbers whose key is in
  ``rules.plain_metrics`` (numbers the site agreed to release as they are).

k-suppression looks at the true counts before noise is added: the promise "at least k
records" is about records, and noise is added to what survives.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

TAG = "_release"
DP_KEY = "_dp"
SUPPRESSED = "<k"


@dataclass(frozen=True)
class ReleaseRules:
    k: int  # min records behind any released number
    extremes: bool = False  # exact min / max may leave (never under DP)
    epsilon: float | None = None  # DP for this release; None: no noise
    delta: float | None = None  # with epsilon: Gaussian noise at this delta; None: Laplace
    plain_metrics: frozenset[str] = frozenset()  # untagged numeric keys allowed as they are


def _count_ok(v: Any) -> bool:
    return type(v) is int and v >= 0


def _real(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


class _Noise:
    """Calibrated noise from a secret, fresh seed (never a value another peer can know)."""

    def __init__(self, epsilon: float, delta: float | None) -> None:
        self.epsilon, self.delta = epsilon, delta
        self.rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
        self.mechanism = "laplace"

    def add(self, value: float, sensitivity: float, eps: float) -> float:
        # The classic Gaussian calibration holds for eps < 1; above it, Laplace (pure DP,
        # so at least as strong) is used instead.
        if self.delta is not None and eps < 1.0:
            self.mechanism = "gaussian"
            sigma = sensitivity * math.sqrt(2.0 * math.log(1.25 / self.delta)) / eps
            return float(value + self.rng.normal(0.0, sigma))
        return float(value + self.rng.laplace(0.0, sensitivity / eps))


def _queries(kind: str) -> int:
    """How many noised queries a released item costs (bins are disjoint: one)."""
    return {"count": 1, "total": 2, "mean": 2, "histogram": 1, "groups": 1}.get(kind, 0)


def filter_release(
    aggregates: Mapping[str, Any], rules: ReleaseRules
) -> tuple[dict[str, Any], list[str]]:
    """(what may leave, notes on what was suppressed, dropped or noised, one per line)."""
    k = int(rules.k)
    notes: list[str] = []
    kept: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    dp = rules.epsilon is not None
    for key in sorted(aggregates):
        value = aggregates[key]
        if key == DP_KEY:
            continue  # ours, from an earlier pass; recomputed below
        if not (isinstance(value, dict) and TAG in value):
            if key in rules.plain_metrics and _real(value) and not isinstance(value, bool):
                out[key] = value
            else:
                notes.append(f"{key}: refused (not a typed aggregate)")
            continue
        item, why = _screen(value, k, rules.extremes, dp)
        if item is None:
            notes.append(f"{key}: {why}")
            continue
        if why:
            notes.append(f"{key}: {why}")
        kept[key] = item
    spent_on = sum(_queries(v[TAG]) for v in kept.values()) if dp else 0
    noise = None
    if spent_on:
        assert rules.epsilon is not None
        noise = _Noise(float(rules.epsilon), rules.delta)
        each = float(rules.epsilon) / spent_on
        kept = {key: _noised(v, noise, each) for key, v in kept.items()}
    out.update(kept)
    if noise is not None:
        out[DP_KEY] = {
            "epsilon": float(rules.epsilon or 0.0),
            "delta": rules.delta if noise.mechanism == "gaussian" else None,
            "mechanism": noise.mechanism,
            "queries": spent_on,
        }
        notes.append(
            f"dp: epsilon {rules.epsilon:g} spent over {spent_on} noised queries "
            f"({noise.mechanism})"
        )
    return out, notes


def released_epsilon(released: Mapping[str, Any]) -> float:
    """The epsilon a filtered release spent (0 when nothing was noised)."""
    dp = released.get(DP_KEY)
    return float(dp["epsilon"]) if isinstance(dp, dict) else 0.0


def _screen(v: dict[str, Any], k: int, extremes: bool, dp: bool) -> tuple[dict | None, str]:
    """(the item as it may leave before noise, a note) or (None, why it may not leave)."""
    kind: Any = v.get(TAG)
    n: Any = v.get("n")
    if kind in ("count", "total", "mean", "extreme") and not _count_ok(n):
        return None, f"refused (malformed {kind}: n must be a count)"
    if kind == "count":
        return (None, f"dropped (count of {n} < k)") if n < k else ({TAG: kind, "n": n}, "")
    if kind in ("total", "mean"):
        value: Any = v.get("value")
        bound: Any = v.get("bound")
        if not _real(value) or (bound is not None and not (_real(bound) and bound > 0)):
            return None, f"refused (malformed {kind})"
        if n < k:
            return None, f"dropped ({kind} over {n} < k records)"
        if dp and bound is None:
            return None, f"dropped ({kind} has no bound, so it cannot be noised)"
        item = {TAG: kind, "value": float(value), "n": n}
        return ({**item, "bound": float(bound)} if bound is not None else item), ""
    if kind == "extreme":
        value = v.get("value")
        which: Any = v.get("which")
        if which not in ("min", "max") or not _real(value):
            return None, "refused (malformed extreme)"
        if not extremes:
            return None, "dropped (exact extremes are denied by the site policy)"
        if dp:
            return None, "dropped (an exact extreme cannot be released under DP)"
        if n < k:
            return None, f"dropped (extreme over {n} < k records)"
        return {TAG: kind, "which": which, "value": float(value), "n": n}, ""
    if kind == "histogram":
        edges, counts = v.get("edges"), v.get("counts")
        if (
            not isinstance(edges, list)
            or not isinstance(counts, list)
            or len(edges) != len(counts) + 1
            or not all(_real(e) for e in edges)
            or not all(_count_ok(c) or c == SUPPRESSED for c in counts)
        ):
            return None, "refused (malformed histogram)"
        cells, hidden = _suppress(counts, k)
        note = f"{hidden} bin(s) under k suppressed" if hidden else ""
        return {TAG: kind, "edges": [float(e) for e in edges], "counts": cells, "k": k}, note
    if kind == "groups":
        counts = v.get("counts")
        if not isinstance(counts, dict) or not all(
            isinstance(g, str) and (_count_ok(c) or c == SUPPRESSED) for g, c in counts.items()
        ):
            return None, "refused (malformed groups)"
        names = sorted(counts)
        cells, hidden = _suppress([counts[g] for g in names], k)
        note = f"{hidden} group(s) under k suppressed" if hidden else ""
        return {TAG: kind, "counts": dict(zip(names, cells, strict=True)), "k": k}, note
    return None, f"refused (unknown release kind {kind!r})"


def _suppress(counts: list[Any], k: int) -> tuple[list[Any], int]:
    cells: list[Any] = []
    hidden = 0
    for c in counts:
        if c == SUPPRESSED or c < k:
            cells.append(SUPPRESSED)
            hidden += 1
        else:
            cells.append(c)
    return cells, hidden


def _noisy_count(noise: _Noise, c: int, eps: float) -> int:
    # Rounded and clamped: post-processing, free under DP, and no float bits to mine.
    return max(0, round(noise.add(c, 1.0, eps)))


def _noised(v: dict[str, Any], noise: _Noise, eps: float) -> dict[str, Any]:
    kind = v[TAG]
    if kind == "count":
        return {**v, "n": _noisy_count(noise, v["n"], eps)}
    if kind in ("total", "mean"):
        n, bound = v["n"], v["bound"]
        total = v["value"] if kind == "total" else v["value"] * n
        noisy_total = noise.add(total, bound, eps)
        noisy_n = _noisy_count(noise, n, eps)
        if kind == "total":
            return {**v, "value": noisy_total, "n": noisy_n}
        return {**v, "value": noisy_total / max(noisy_n, 1), "n": noisy_n}
    if kind == "histogram":
        cells = [c if c == SUPPRESSED else _noisy_count(noise, c, eps) for c in v["counts"]]
        return {**v, "counts": cells}
    if kind == "groups":
        return {
            **v,
            "counts": {
                g: c if c == SUPPRESSED else _noisy_count(noise, c, eps)
                for g, c in v["counts"].items()
            },
        }
    return v
