"""fedavg-mlp-tabular: an MLP classifier over any numeric table, trained federatedly.

Input: one table (csv or npz) of numeric features (finite: run `standardize` first when
cells are missing) and an integer `label` in 0..classes-1. The width comes from the data:
the first round builds the model from the task seed, so every node starts from the same
weights. `holdout_fraction` of each site's rows, picked by `split_seed` (not by the task),
are never trained on; `evaluate` reports on them, and `evaluate-model` with the same
`split_seed` measures the final model on exactly those rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.fl.datasets import load_table
from p2pfl.fl.torch_utils import evaluate_model, load_numpy_into, state_to_numpy, train_local
from p2pfl.taskpack.sdk import Context, Metrics, Task, Update, Weights


def holdout_mask(n: int, fraction: float, split_seed: int) -> np.ndarray:
    """True for the rows held out (the same rows for the same n, fraction and seed)."""
    k = int(round(n * fraction))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(split_seed).permutation(n)[:k]] = True
    return mask


def build_mlp(n_features: int, hidden: list[int], classes: int, seed: int) -> Any:
    import torch

    from p2pfl.fl.torch_utils import seed_cpu

    seed_cpu(seed)
    layers: list[torch.nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [torch.nn.Linear(width, int(h)), torch.nn.ReLU()]
        width = int(h)
    layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def _only_input(inputs: dict[str, Path]) -> Path:
    if len(inputs) != 1:
        raise ValueError(f"expected exactly one input table, got {sorted(inputs)}")
    return Path(next(iter(inputs.values())))


class TabularMLP(Task):
    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        super().validate_inputs(ctx, inputs)
        X, y, _ = load_table(_only_input(inputs))
        if X.shape[0] < int(ctx.params["min_rows"]):
            raise ValueError(f"input has {X.shape[0]} rows, fewer than min_rows")
        if not np.all(np.isfinite(X)):
            raise ValueError("input has missing or infinite values (standardize it first)")
        classes = int(ctx.params["classes"])
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"labels must be in 0..{classes - 1}, found {y.min()}..{y.max()}")

    def preprocess(self, ctx: Context, inputs: dict[str, Path]) -> dict[str, Any]:
        X, y, _ = load_table(_only_input(inputs))
        held = holdout_mask(
            len(y), float(ctx.params["holdout_fraction"]), int(ctx.params["split_seed"])
        )
        if held.all():
            raise ValueError("no training rows left after the hold-out")
        return {"X": X[~held], "y": y[~held], "X_val": X[held], "y_val": y[held]}

    def _model(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Any:
        hidden = [int(h) for h in ctx.params["hidden"]]
        model = build_mlp(int(data["X"].shape[1]), hidden, int(ctx.params["classes"]), ctx.seed)
        if weights is not None:
            load_numpy_into(model, weights)
        return model

    def execute(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Update:
        model = self._model(ctx, data, weights)
        digest = hashlib.sha256(f"{ctx.seed}|{ctx.node}|{ctx.round}".encode()).digest()
        stats = train_local(
            model,
            data["X"],
            data["y"],
            epochs=int(ctx.params.get("local_epochs", 2)),
            batch_size=int(ctx.params["batch_size"]),
            lr=float(ctx.params["lr"]),
            seed=int.from_bytes(digest[:4], "big"),
            global_weights=weights,
            mu=float(ctx.mu),
            dp=ctx.dp,
            dp_state=ctx.state.setdefault("dp", {}) if ctx.dp is not None else None,
            rounds=int(ctx.rounds),
            optimizer=str(ctx.params["optimizer"]),
            momentum=float(ctx.params["momentum"]),
        )
        metrics = {"loss": stats.loss}
        if stats.epsilon is not None:
            metrics["epsilon"] = stats.epsilon
        return Update(num_samples=stats.num_samples, weights=state_to_numpy(model), metrics=metrics)

    def evaluate(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Metrics:
        model = self._model(ctx, data, weights)
        X, y = (data["X_val"], data["y_val"]) if len(data["y_val"]) else (data["X"], data["y"])
        return evaluate_model(model, X, y)
