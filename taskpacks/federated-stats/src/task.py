"""federated-stats: count, mean, std, min, max and a histogram of one numeric column.

Each node returns only aggregates of its column (never rows), in the SDK's typed release
vocabulary so that the node holding the data can check each one before it leaves:
    count, sum, sum_sq (totals), min, max (extremes), histogram (counts over the shared bin
    edges), underflow / overflow (values outside the edges), missing (NaN or empty cells).
The node then drops what stands for fewer than k records (a histogram bin becomes "<k"),
keeps exact extremes only where its policy allows, and may add DP noise (which needs
`bound`: values are clipped to [-bound, bound] so one record's weight is known).
The reduce step adds up what was released: a bin suppressed at any node stays "<k", and the
mean and std come from the nodes that released their sums. The bin edges come from params
only (a list, or a count over the fixed [range_min, range_max]), so every node bins
identically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.taskpack.sdk import (
    Context,
    Partial,
    Task,
    Update,
    count,
    extreme,
    histogram,
    is_released,
    total,
)

SUPPRESSED = "<k"


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


def local_aggregates(
    values: np.ndarray, edges: np.ndarray, bound: float | None = None
) -> dict[str, Any]:
    """The node's aggregates, typed for the node's release check; nothing row-level."""
    finite = values[np.isfinite(values)]
    if bound is not None:
        finite = np.clip(finite, -bound, bound)  # one record moves a sum by at most bound
    n = int(finite.size)
    hist, _ = np.histogram(finite, bins=edges)
    out: dict[str, Any] = {
        "count": count(n),
        "sum": total(float(finite.sum()), n, bound=bound),
        "sum_sq": total(float(np.square(finite).sum()), n, bound=bound * bound if bound else None),
        "histogram": histogram(edges, hist),
        "underflow": count(int((finite < edges[0]).sum())),
        "overflow": count(int((finite > edges[-1]).sum())),
        "missing": count(int(values.size - n)),
    }
    if n:
        out["min"] = extreme("min", float(finite.min()), n)
        out["max"] = extreme("max", float(finite.max()), n)
    return out


def _released(aggs: list[dict[str, Any]], key: str, kind: str) -> list[dict[str, Any]]:
    return [a[key] for a in aggs if is_released(a.get(key), kind)]


def combine_histograms(hists: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Bin-wise sums; a bin suppressed ("<k") at any node stays suppressed."""
    if not hists:
        return None
    edges = hists[0]["edges"]
    if any(h["edges"] != edges for h in hists):
        raise ValueError("partials used different bin edges")
    cells: list[Any] = []
    for i in range(len(edges) - 1):
        column = [h["counts"][i] for h in hists]
        cells.append(SUPPRESSED if SUPPRESSED in column else int(sum(column)))
    return {"edges": edges, "counts": cells}


class FederatedStats(Task):
    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        super().validate_inputs(ctx, inputs)
        bin_edges(ctx.params)
        read_column(_pick_input(ctx, inputs), ctx.params.get("column"))

    def preprocess(self, ctx: Context, inputs: dict[str, Path]) -> dict[str, Any]:
        column, values = read_column(_pick_input(ctx, inputs), ctx.params.get("column"))
        return {"column": column, "values": values}

    def execute(self, ctx: Context, data: dict[str, Any], weights: Any) -> Update:
        bound = ctx.params.get("bound")
        aggregates = local_aggregates(
            data["values"], bin_edges(ctx.params), float(bound) if bound else None
        )
        return Update(num_samples=aggregates["count"]["n"], aggregates=aggregates)

    def reduce(self, ctx: Context, partials: list[Partial]) -> dict[str, Any]:
        """Adds up what the nodes released: counts, sums and histograms add; min/max of the
        released extremes; mean and std over the nodes that released count, sum, sum_sq."""
        parts = sorted(partials, key=lambda p: p.node)  # fixed order: reproducible sums
        aggs = [p.aggregates for p in parts if p.aggregates]
        if not aggs:
            raise ValueError("no partial carries aggregates")
        whole = [
            a
            for a in aggs
            if all(is_released(a.get(k), kd) for k, kd in _MOMENTS) and a["count"]["n"] > 0
        ]
        n = sum(int(a["count"]["n"]) for a in whole)
        total_ = math.fsum(float(a["sum"]["value"]) for a in whole)
        total_sq = math.fsum(float(a["sum_sq"]["value"]) for a in whole)
        mean = total_ / n if n else None
        var = max(total_sq / n - mean * mean, 0.0) if n and mean is not None else None
        mins = [e["value"] for e in _released(aggs, "min", "extreme")]
        maxs = [e["value"] for e in _released(aggs, "max", "extreme")]

        def added(key: str) -> int | None:
            got = _released(aggs, key, "count")
            return sum(int(c["n"]) for c in got) if got else None

        return {
            "column": ctx.params.get("column"),
            "nodes": len(aggs),
            "count": added("count"),
            "sum": total_ if whole else None,
            "mean": mean,
            "std": math.sqrt(var) if var is not None else None,  # population std
            "std_sample": math.sqrt(var * n / (n - 1)) if var is not None and n > 1 else None,
            "min": min(mins) if mins else None,
            "max": max(maxs) if maxs else None,
            "histogram": combine_histograms(_released(aggs, "histogram", "histogram")),
            "underflow": added("underflow"),
            "overflow": added("overflow"),
            "missing": added("missing"),
        }


_MOMENTS = (("count", "count"), ("sum", "total"), ("sum_sq", "total"))
