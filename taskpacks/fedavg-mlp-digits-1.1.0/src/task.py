"""fedavg-mlp-digits: an MLP classifier trained federatedly (FedAvg / FedProx / gossip).

Input: one table (csv with a header row, or npz as written by `p2pfl datasets split`) of
numeric features plus an integer `label` column in 0..classes-1. Features are used as they
are: `p2pfl datasets split` has already scaled them (digits / 16, tabular standardised on
training statistics).

Each round a node loads the global weights, trains `local_epochs` epochs with SGD (or
Adam), FedProx's proximal term when ctx.mu > 0, and DP-SGD (Opacus) when ctx.dp is set;
the DP accountant's history lives in ctx.state["dp"] so the budget holds across rounds and
restarts. When the budget would be exceeded, execute raises
`p2pfl.fl.torch_utils.BudgetExhausted` and the node stops contributing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.fl.datasets import load_table
from p2pfl.fl.partition import split_train_test
from p2pfl.fl.torch_utils import evaluate_model, load_numpy_into, state_to_numpy, train_local
from p2pfl.taskpack.sdk import Context, Metrics, Task, Update, Weights


def _pick_input(ctx: Context, inputs: dict[str, Path]) -> tuple[str, Path]:
    """The one input table (or the one named by params `input`)."""
    name = ctx.params.get("input")
    if name:
        if name not in inputs:
            raise ValueError(f"params.input {name!r} is not among the inputs {sorted(inputs)}")
        return name, Path(inputs[name])
    if len(inputs) != 1:
        raise ValueError(f"expected exactly one input, got {sorted(inputs)}; set params.input")
    ((name, path),) = inputs.items()
    return name, Path(path)


def build_model(n_features: int, hidden: list[int], classes: int, seed: int) -> Any:
    """The MLP, initialised deterministically from `seed` (same on every node)."""
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


def _round_seed(ctx: Context) -> int:
    """Different per node and round (shuffles, DP noise), reproducible for a task."""
    digest = hashlib.sha256(f"{ctx.seed}|{ctx.node}|{ctx.round}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class MLPClassifier(Task):
    def _read(self, ctx: Context, inputs: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
        name, path = _pick_input(ctx, inputs)
        try:
            X, y, _ = load_table(path)
        except (ValueError, OSError) as exc:
            raise ValueError(f"input {name!r}: {exc}") from None
        return X, y

    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        super().validate_inputs(ctx, inputs)
        X, y = self._read(ctx, inputs)
        min_rows = int(ctx.params.get("min_rows", 10))
        if X.shape[0] < min_rows:
            raise ValueError(f"input has {X.shape[0]} rows, fewer than min_rows={min_rows}")
        if not np.all(np.isfinite(X)):
            raise ValueError("input has missing or infinite feature values")
        n_features = ctx.params.get("n_features")
        if n_features is not None and X.shape[1] != int(n_features):
            raise ValueError(f"input has {X.shape[1]} features, params.n_features={n_features}")
        classes = int(ctx.params.get("classes", 10))
        if y.min() < 0 or y.max() >= classes:
            raise ValueError(f"labels must be in 0..{classes - 1}, found {y.min()}..{y.max()}")

    def preprocess(self, ctx: Context, inputs: dict[str, Path]) -> dict[str, Any]:
        X, y = self._read(ctx, inputs)
        frac = float(ctx.params.get("validation_fraction", 0.2))
        # Seeded by the task, so every run of this node holds out the same rows.
        tr, va = split_train_test(y, frac, np.random.default_rng(ctx.seed), stratify=True)
        if tr.size == 0:
            raise ValueError("no training rows left after the validation hold-out")
        return {"X": X[tr], "y": y[tr], "X_val": X[va], "y_val": y[va]}

    def _model(self, ctx: Context, n_features: int | None) -> Any:
        n = ctx.params.get("n_features") or n_features
        if n is None:
            raise ValueError("params.n_features is null and no data to infer it from")
        hidden = [int(h) for h in ctx.params.get("hidden", [64])]
        return build_model(int(n), hidden, int(ctx.params.get("classes", 10)), ctx.seed)

    def initial_weights(self, ctx: Context) -> Weights | None:
        if ctx.params.get("n_features") is None:
            return None  # inferred from the data in the first round (same seed everywhere)
        return state_to_numpy(self._model(ctx, None))

    def _loaded(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Any:
        model = self._model(ctx, int(data["X"].shape[1]))
        if weights is not None:
            load_numpy_into(model, weights)
        return model

    def execute(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Update:
        model = self._loaded(ctx, data, weights)
        dp_state = ctx.state.setdefault("dp", {}) if ctx.dp is not None else None
        stats = train_local(
            model,
            data["X"],
            data["y"],
            epochs=int(ctx.params.get("local_epochs", 2)),
            batch_size=int(ctx.params.get("batch_size", 16)),
            lr=float(ctx.params.get("lr", 0.1)),
            seed=_round_seed(ctx),
            global_weights=weights,
            mu=float(ctx.mu),
            dp=ctx.dp,
            dp_state=dp_state,
            rounds=int(ctx.rounds),
            optimizer=str(ctx.params.get("optimizer", "sgd")),
            momentum=float(ctx.params.get("momentum", 0.9)),
        )
        metrics = {"loss": stats.loss}
        if stats.epsilon is not None:
            metrics["epsilon"] = stats.epsilon
        return Update(num_samples=stats.num_samples, weights=state_to_numpy(model), metrics=metrics)

    def evaluate(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Metrics:
        model = self._loaded(ctx, data, weights)
        X, y = data["X_val"], data["y_val"]
        if len(y) == 0:  # no hold-out: report on the training rows rather than nothing
            X, y = data["X"], data["y"]
        out = evaluate_model(model, X, y)
        out["top2_accuracy"] = _top2(model, X, y)  # new in 1.1.0
        if "epsilon" in ctx.state.get("dp", {}):
            out["epsilon"] = float(ctx.state["dp"]["epsilon"])
        return out


def _top2(model: Any, X: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose label is among the model's two highest scores (1.1.0)."""
    import torch

    if len(y) == 0:
        return float("nan")
    model.eval()
    with torch.no_grad():
        top = model(torch.as_tensor(X, dtype=torch.float32)).topk(2, dim=1).indices
    hits = (top == torch.as_tensor(y, dtype=torch.long).unsqueeze(1)).any(dim=1)
    return float(hits.float().mean())
