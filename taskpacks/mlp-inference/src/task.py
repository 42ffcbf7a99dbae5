"""mlp-inference: apply an MLP classifier to each node's table, one batch at a time.

The model is a dict of arrays as fedavg-mlp-digits trains it (a torch Sequential of Linear
and ReLU layers: "0.weight", "0.bias", "2.weight", ...): the result of an earlier training
task (params.model_cid; the node hands it over) or src/model.npz bundled in the pack. The
forward pass is plain numpy: no torch import, so a batch costs milliseconds.

Each record is one row of the input CSV; its prediction is the arg-max class and its score
the softmax probability of that class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.taskpack.batch import InferenceTask
from p2pfl.taskpack.sdk import Context, Weights

BUNDLED = Path(__file__).resolve().parent / "model.npz"


def layers_of(weights: Weights) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each Linear layer, in order of its index in the Sequential."""
    index = sorted({int(k.split(".")[0]) for k in weights if k.endswith(".weight")})
    if not index:
        raise ValueError("the model has no '<i>.weight' arrays")
    out = []
    for i in index:
        w, b = weights[f"{i}.weight"], weights.get(f"{i}.bias")
        if w.ndim != 2 or b is None or b.shape != (w.shape[0],):
            raise ValueError(f"layer {i}: weight {w.shape} and bias do not fit")
        out.append((np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64)))
    for (w1, _), (w2, _) in zip(out, out[1:], strict=False):
        if w2.shape[1] != w1.shape[0]:
            raise ValueError(f"layers do not chain: {w1.shape} then {w2.shape}")
    return out


def forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Class probabilities (softmax) for rows x."""
    h = x
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    h = h - h.max(axis=1, keepdims=True)
    p = np.exp(h)
    return p / p.sum(axis=1, keepdims=True)


class MLPInference(InferenceTask):
    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        super().validate_inputs(ctx, inputs)
        if not ctx.params.get("model_cid") and not BUNDLED.exists():
            raise ValueError("no model: set params.model_cid or bundle src/model.npz")

    def load_model(self, ctx: Context, weights: Weights | None) -> Any:
        if weights is None:
            with np.load(BUNDLED, allow_pickle=False) as z:
                weights = {k: z[k] for k in z.files}
        return layers_of(weights)

    def features(self, ctx: Context, row: dict[str, str]) -> list[float]:
        skip = {ctx.params.get("key_column"), ctx.params.get("label_column")}
        values = [v for k, v in row.items() if k not in skip]
        try:
            x = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError("a feature is not a number") from None
        if not np.all(np.isfinite(x)):
            raise ValueError("a feature is missing or infinite")
        return x

    def predict(
        self, ctx: Context, model: Any, items: list[tuple[str, Any]]
    ) -> list[tuple[Any, float]]:
        x = np.array([self.features(ctx, row) for _, row in items], dtype=np.float64)
        width = model[0][0].shape[1]
        if x.shape[1] != width:
            raise ValueError(f"records have {x.shape[1]} features, the model takes {width}")
        p = forward(model, x)
        best = p.argmax(axis=1)
        return [(int(c), float(p[i, c])) for i, c in enumerate(best)]
