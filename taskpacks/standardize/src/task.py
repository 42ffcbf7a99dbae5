"""standardize: mean-impute and z-score a table on statistics every site shares.

Federated statistics in one FedAvg round. Each node sends, per column j, three numbers
normalised by its row count n: c_j / n (non-missing cells), s_j / n (their sum) and
q_j / n (their sum of squares). FedAvg weights each node by n, so the average is exactly
(sum of c_j, s_j, q_j over all nodes) / N: the global non-missing count, sum and sum of
squares, up to the common factor 1/N. From these every node derives the same mean and
standard deviation of each column over all sites' records, and the same transform:

    missing -> the global mean;  x -> (x - mean) / std  (std 0 -> 1);  clip to +-clip

`transform` returns the transformed table (a `Table`); the node registers it as the flow
step's derived dataset and it never leaves. What leaves is the per-column normalised
counts and sums above (aggregates over n >= k records: the node checks k before it takes
part) and the node's record count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.fl.datasets import load_table
from p2pfl.taskpack.sdk import Context, Partial, Table, Task, Update, Weights, count

STATS = ("count", "sum", "sumsq")


def local_statistics(X: np.ndarray) -> tuple[int, Weights]:
    """(rows, {count, sum, sumsq} per column, each divided by the row count)."""
    X = np.asarray(X, dtype=np.float64)
    n = int(X.shape[0])
    present = np.isfinite(X)
    filled = np.where(present, X, 0.0)
    scale = 1.0 / max(n, 1)
    return n, {
        "count": present.sum(axis=0) * scale,
        "sum": filled.sum(axis=0) * scale,
        "sumsq": np.square(filled).sum(axis=0) * scale,
    }


def transform_of(weights: Weights) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per column from the averaged statistics (the same on every node)."""
    cnt = np.asarray(weights["count"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, weights["sum"] / cnt, 0.0)
        var = np.where(cnt > 0, weights["sumsq"] / cnt - mean * mean, 0.0)
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    return mean, std


def apply(
    X: np.ndarray, mean: np.ndarray, std: np.ndarray, scale: bool, clip: float | None
) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    out = np.where(np.isfinite(X), X, mean)
    if scale:
        out = (out - mean) / std
        if clip is not None:
            out = np.clip(out, -clip, clip)
    return out.astype(np.float32)


def _only_input(inputs: dict[str, Path]) -> Path:
    if len(inputs) != 1:
        raise ValueError(f"expected exactly one input table, got {sorted(inputs)}")
    return Path(next(iter(inputs.values())))


class Standardize(Task):
    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        super().validate_inputs(ctx, inputs)
        X, _y, _names = load_table(_only_input(inputs))
        if X.shape[0] < int(ctx.params.get("min_rows", 10)):
            raise ValueError(f"input has {X.shape[0]} rows, fewer than min_rows")
        if np.isinf(X).any():
            raise ValueError("input has infinite values")

    def preprocess(self, ctx: Context, inputs: dict[str, Path]) -> dict[str, Any]:
        X, y, names = load_table(_only_input(inputs))
        return {"X": X, "y": y, "names": names}

    def execute(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Update:
        n, stats = local_statistics(data["X"])
        missing = float(1.0 - stats["count"].mean()) if n else 0.0
        return Update(num_samples=n, weights=stats, metrics={"missing_fraction": missing})

    def evaluate(
        self, ctx: Context, data: dict[str, Any], weights: Weights | None
    ) -> dict[str, float]:
        return {"num_samples": float(len(data["y"]))}

    def transform(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Table:
        if weights is None or any(k not in weights for k in STATS):
            raise ValueError("no federated statistics to transform with")
        mean, std = transform_of(weights)
        clip = ctx.params.get("clip")
        X = apply(
            data["X"], mean, std, bool(ctx.params.get("scale", True)), float(clip) if clip else None
        )
        return Table(X, data["y"], list(data["names"]))

    def postprocess(self, ctx: Context, partial: Partial) -> Partial:
        # Only the record count leaves (typed, so the node applies its k rule to it).
        return Partial(partial.node, partial.num_samples, {"records": count(partial.num_samples)})

    def reduce(self, ctx: Context, partials: list[Partial]) -> dict[str, Any]:
        parts = sorted(partials, key=lambda p: p.node)
        return {
            "records": sum(p.num_samples for p in parts),
            "nodes": len(parts),
            "records_by_node": {p.node: p.num_samples for p in parts},
        }
