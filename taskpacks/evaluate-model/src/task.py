"""evaluate-model: a handed-over MLP model, measured on each site's own rows.

The model comes as weights (a flow step `model: train` hands over that step's result model
by cid; the node fetches and verifies it before this runs). It is read as a stack of
linear layers (`<i>.weight`, `<i>.bias`, ReLU between them: what fedavg-mlp-* train) and
run in numpy. With `holdout_only` the rows measured are the ones the training step held out
(the same `holdout_fraction` and `split_seed`), so the numbers are out of sample.

Released, typed (p2pfl.taskpack.sdk): the record count, mean accuracy and mean loss over
them, and the confusion counts per (true, predicted) label. The node drops anything that
stands for fewer than its k records before it leaves (a confusion cell becomes "<k").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.fl.datasets import load_table
from p2pfl.taskpack.sdk import (
    Context,
    Partial,
    Task,
    Update,
    Weights,
    count,
    groups,
    is_released,
    mean,
)

SUPPRESSED = "<k"


def holdout_mask(n: int, fraction: float, split_seed: int) -> np.ndarray:
    """As fedavg-mlp-tabular's: the same rows for the same n, fraction and seed."""
    k = int(round(n * fraction))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(split_seed).permutation(n)[:k]] = True
    return mask


def layers_of(weights: Weights) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) of each linear layer, in order, from a Sequential MLP's state dict."""
    indices = sorted({int(k.split(".")[0]) for k in weights if k.split(".")[0].isdigit()})
    out = []
    for i in indices:
        W, b = weights.get(f"{i}.weight"), weights.get(f"{i}.bias")
        if W is None or b is None or W.ndim != 2 or b.shape != (W.shape[0],):
            raise ValueError(f"layer {i}: not a linear layer (weight/bias)")
        out.append((np.asarray(W, np.float64), np.asarray(b, np.float64)))
    if not out:
        raise ValueError("the model has no linear layers")
    for (W1, _), (W2, _) in zip(out, out[1:], strict=False):
        if W2.shape[1] != W1.shape[0]:
            raise ValueError("the model's layers do not chain")
    return out


def predict(layers: list[tuple[np.ndarray, np.ndarray]], X: np.ndarray) -> np.ndarray:
    """Logits of the MLP (ReLU between layers)."""
    h = np.asarray(X, np.float64)
    for i, (W, b) in enumerate(layers):
        h = h @ W.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _only_input(inputs: dict[str, Path]) -> Path:
    if len(inputs) != 1:
        raise ValueError(f"expected exactly one input table, got {sorted(inputs)}")
    return Path(next(iter(inputs.values())))


class EvaluateModel(Task):
    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        super().validate_inputs(ctx, inputs)
        X, _y, _ = load_table(_only_input(inputs))
        if X.shape[0] < int(ctx.params["min_rows"]):
            raise ValueError(f"input has {X.shape[0]} rows, fewer than min_rows")
        if not np.all(np.isfinite(X)):
            raise ValueError("input has missing or infinite values")

    def preprocess(self, ctx: Context, inputs: dict[str, Path]) -> dict[str, Any]:
        X, y, _ = load_table(_only_input(inputs))
        if ctx.params["holdout_only"]:
            held = holdout_mask(
                len(y), float(ctx.params["holdout_fraction"]), int(ctx.params["split_seed"])
            )
            X, y = X[held], y[held]
        return {"X": X, "y": y}

    def execute(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Update:
        if weights is None:
            raise ValueError("no model to evaluate (the step names none, or it was not fetched)")
        layers = layers_of(weights)
        X, y = data["X"], data["y"]
        if X.shape[1] != layers[0][0].shape[1]:
            raise ValueError(
                f"the model reads {layers[0][0].shape[1]} features, the table has {X.shape[1]}"
            )
        classes = int(ctx.params["classes"])
        n = int(len(y))
        logits = predict(layers, X) if n else np.zeros((0, layers[-1][0].shape[0]))
        pred = logits.argmax(axis=1) if n else np.zeros(0, dtype=int)
        confusion = {
            f"{t}->{p}": int(((y == t) & (pred == p)).sum())
            for t in range(classes)
            for p in range(classes)
        }
        aggregates: dict[str, Any] = {"records": count(n), "confusion": groups(confusion)}
        if n:
            aggregates["accuracy"] = mean(float((pred == y).mean()), n, bound=1.0)
            aggregates["loss"] = mean(float(cross_entropy(logits, y).mean()), n)
        return Update(num_samples=n, aggregates=aggregates)

    def reduce(self, ctx: Context, partials: list[Partial]) -> dict[str, Any]:
        """Sums of what the nodes released: a cell suppressed at any node stays "<k"."""
        parts = [p for p in sorted(partials, key=lambda p: p.node) if p.aggregates]
        out: dict[str, Any] = {"nodes": len(parts)}
        counted = [
            p.aggregates["records"]["n"]
            for p in parts
            if is_released(p.aggregates.get("records"), "count")
        ]
        out["records"] = sum(counted) if counted else None
        for key in ("accuracy", "loss"):
            means = [p.aggregates[key] for p in parts if is_released(p.aggregates.get(key), "mean")]
            total = sum(m["n"] for m in means)
            out[key] = sum(m["value"] * m["n"] for m in means) / total if total else None
        cells: dict[str, Any] = {}
        for p in parts:
            conf = p.aggregates.get("confusion")
            if not is_released(conf, "groups"):
                continue
            for cell, value in conf["counts"].items():
                if value == SUPPRESSED or cells.get(cell) == SUPPRESSED:
                    cells[cell] = SUPPRESSED
                else:
                    cells[cell] = int(cells.get(cell, 0)) + int(value)
        out["confusion"] = cells
        if int(ctx.params.get("classes", 2)) == 2 and cells and SUPPRESSED not in cells.values():
            tp, fn = cells.get("1->1", 0), cells.get("1->0", 0)
            tn, fp = cells.get("0->0", 0), cells.get("0->1", 0)
            out["sensitivity"] = tp / (tp + fn) if tp + fn else None
            out["specificity"] = tn / (tn + fp) if tn + fp else None
        return out
