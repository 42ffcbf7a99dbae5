"""federated-stats: count, mean, std, min, max and a histogram of one numeric column.

Each node returns only aggregates of its column (never rows):
    count, sum, sum_sq, min, max, histogram (counts over the shared bin edges),
    underflow / overflow (values outside the edges), missing (NaN or empty cells)
and the reduce step adds them up exactly. The bin edges come from params only (a list, or a
count over the fixed [range_min, range_max]), so every node bins identically.
The k-records policy (refusing to release aggregates over fewer than k rows) is the node's;
Update.num_samples carries the record count it needs for that.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.taskpack.sdk import Context, Partial, Task, Update


def bin_edges(params: dict[str, Any]) -> np.ndarray:
    """The histogram's edges: params `bins` as edges, or a count over the fixed range."""
    bins = params.get("bins", 10)
    if isinstance(bins, list):
        edges = np.asarray(bins, dtype=np.float64)
        if edges.size < 2 or not np.all(np.diff(edges) > 0):
            raise ValueError("params.bins: edges must be at least 2 strictly increasing numbers")
        return edges
    lo, hi = float(params.get("range_min", 0.0)), float(params.get("range_max", 1.0))
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"params.bins must be a positive integer or a list of edges, got {bins!r}")
    if not hi > lo:
        raise ValueError(f"params.range_max ({hi}) must be greater than range_min ({lo})")
    return np.linspace(lo, hi, bins + 1)


def _pick_input(ctx: Context, inputs: dict[str, Path]) -> Path:
    name = ctx.params.get("input")
    if name:
        if name not in inputs:
            raise ValueError(f"params.input {name!r} is not among the inputs {sorted(inputs)}")
        return Path(inputs[name])
    if len(inputs) != 1:
        raise ValueError(f"expected exactly one input, got {sorted(inputs)}; set params.input")
    return Path(next(iter(inputs.values())))


def read_column(path: Path, column: str | None) -> tuple[str, np.ndarray]:
    """(column name, float64 values with NaN for missing) from a csv or npz table."""
    import pandas as pd

    if path.suffix.lower() == ".npz":
        from p2pfl.fl.datasets import load_table

        X, y, names = load_table(path)
        frame = pd.DataFrame(X, columns=names)
        frame["label"] = y
    elif path.suffix.lower() == ".csv":
        frame = pd.read_csv(path)
    else:
        raise ValueError(f"{path.name}: unsupported table format (use .csv or .npz)")
    if column is None:
        features = [c for c in frame.columns if c != "label"]
        if not features:
            raise ValueError(f"{path.name}: no feature column")
        column = str(features[0])
    if column not in frame.columns:
        raise ValueError(
            f"{path.name}: no column {column!r} (columns: {', '.join(map(str, frame.columns[:8]))})"
        )
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = int(values.isna().sum() - frame[column].isna().sum())
    if bad:
        raise ValueError(f"{path.name}: column {column!r} has {bad} non-numeric value(s)")
    return column, values.to_numpy(dtype=np.float64)


def local_aggregates(values: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    """The node's aggregates: JSON-able numbers and lists, nothing row-level."""
    finite = values[np.isfinite(values)]
    hist, _ = np.histogram(finite, bins=edges)
    return {
        "count": int(finite.size),
        "sum": float(finite.sum()),
        "sum_sq": float(np.square(finite).sum()),
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "histogram": [int(c) for c in hist],
        "underflow": int((finite < edges[0]).sum()),
        "overflow": int((finite > edges[-1]).sum()),
        "missing": int(values.size - finite.size),
        "edges": [float(e) for e in edges],
    }


class FederatedStats(Task):
    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        super().validate_inputs(ctx, inputs)
        bin_edges(ctx.params)
        read_column(_pick_input(ctx, inputs), ctx.params.get("column"))

    def preprocess(self, ctx: Context, inputs: dict[str, Path]) -> dict[str, Any]:
        column, values = read_column(_pick_input(ctx, inputs), ctx.params.get("column"))
        return {"column": column, "values": values}

    def execute(self, ctx: Context, data: dict[str, Any], weights: Any) -> Update:
        aggregates = local_aggregates(data["values"], bin_edges(ctx.params))
        aggregates["column"] = data["column"]
        return Update(num_samples=aggregates["count"], aggregates=aggregates)

    def reduce(self, ctx: Context, partials: list[Partial]) -> dict[str, Any]:
        """Exact combination: counts, sums and histograms add; min/max of the extremes."""
        parts = sorted(partials, key=lambda p: p.node)  # fixed order: reproducible sums
        aggs = [p.aggregates for p in parts if p.aggregates]
        if not aggs:
            raise ValueError("no partial carries aggregates")
        edges = aggs[0].get("edges")
        for i, a in enumerate(aggs):
            if a.get("edges") != edges:
                raise ValueError(f"partial {i} ({parts[i].node}) used different bin edges")
        count = sum(int(a["count"]) for a in aggs)
        total = math.fsum(float(a["sum"]) for a in aggs)
        total_sq = math.fsum(float(a["sum_sq"]) for a in aggs)
        mins = [a["min"] for a in aggs if a.get("min") is not None]
        maxs = [a["max"] for a in aggs if a.get("max") is not None]
        hist = np.sum([np.asarray(a["histogram"], dtype=np.int64) for a in aggs], axis=0)
        mean = total / count if count else None
        var = max(total_sq / count - mean * mean, 0.0) if count else None  # type: ignore[operator]
        return {
            "column": aggs[0].get("column"),
            "nodes": len(aggs),
            "count": count,
            "sum": total,
            "mean": mean,
            "std": math.sqrt(var) if var is not None else None,  # population std
            "std_sample": (
                math.sqrt(var * count / (count - 1)) if var is not None and count > 1 else None
            ),
            "min": min(mins) if mins else None,
            "max": max(maxs) if maxs else None,
            "histogram": {"edges": edges, "counts": [int(c) for c in hist]},
            "underflow": sum(int(a.get("underflow", 0)) for a in aggs),
            "overflow": sum(int(a.get("overflow", 0)) for a in aggs),
            "missing": sum(int(a.get("missing", 0)) for a in aggs),
        }
