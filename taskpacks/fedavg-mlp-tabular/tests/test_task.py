"""fedavg-mlp-tabular on synthetic sites: it learns, holds out fixed rows, infers width."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from p2pfl.fl.aggregate import fedavg
from p2pfl.fl.datasets import write_table
from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Context, Task

ROOT = Path(__file__).resolve().parents[1]


def load_task() -> tuple[Task, object]:
    spec = importlib.util.spec_from_file_location("tabular_task", ROOT / "src" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (cls,) = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, Task) and c is not Task
    ]
    return cls(), module


def table(path: Path, n: int, seed: int, width: int = 7) -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, width)) + y[:, None] * 1.5
    write_table(path, X, y, [f"f{i}" for i in range(width)])
    return path


def ctx(node: str, rnd: int = 1, **over: str) -> Context:
    params = load_params(ROOT, {"local_epochs": "2", **over})
    return Context(task_id="t", node=node, params=params, seed=5, round=rnd, rounds=5)


def test_three_sites_learn(tmp_path: Path) -> None:
    task, _ = load_task()
    inputs = [{"table": table(tmp_path / f"s{i}.npz", 120, i)} for i in range(3)]
    data = [task.preprocess(ctx(f"n{i}"), inp) for i, inp in enumerate(inputs)]
    for i, inp in enumerate(inputs):
        task.validate_inputs(ctx(f"n{i}"), inp)
    weights = None
    for rnd in range(1, 6):
        ups = [task.execute(ctx(f"n{i}", rnd), d, weights) for i, d in enumerate(data)]
        weights = fedavg([(u.weights, u.num_samples) for u in ups])
    accs = [task.evaluate(ctx(f"n{i}"), d, weights)["accuracy"] for i, d in enumerate(data)]
    assert min(accs) > 0.8, accs
    assert data[0]["X"].shape[1] == 7  # width read from the data


def test_holdout_rows_are_fixed_by_split_seed(tmp_path: Path) -> None:
    _, module = load_task()
    a = module.holdout_mask(100, 0.2, 0)
    assert a.sum() == 20 and np.array_equal(a, module.holdout_mask(100, 0.2, 0))
    assert not np.array_equal(a, module.holdout_mask(100, 0.2, 1))


def test_missing_values_are_refused(tmp_path: Path) -> None:
    task, _ = load_task()
    p = tmp_path / "bad.npz"
    X = np.ones((20, 3))
    X[0, 0] = np.nan
    write_table(p, X, np.zeros(20, dtype=int), ["a", "b", "c"])
    with pytest.raises(ValueError, match="standardize"):
        task.validate_inputs(ctx("n"), {"table": p})
