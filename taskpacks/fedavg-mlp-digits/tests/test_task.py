"""Runs the task's hooks on synthetic data, as nodes would (no network needed).

cd taskpacks/fedavg-mlp-digits && python -m pytest tests -q
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from p2pfl.fl.aggregate import fedavg
from p2pfl.fl.datasets import write_table
from p2pfl.fl.torch_utils import BudgetExhausted
from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Context, DPConfig, Partial, Task

ROOT = Path(__file__).resolve().parents[1]


def load_task() -> Task:
    """Load src/task.py the way the runtime does: by file, finding its one Task subclass."""
    spec = importlib.util.spec_from_file_location("mlp_task", ROOT / "src" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, Task) and c is not Task
    ]
    assert len(found) == 1, found
    return found[0]()


def blobs(path: Path, n: int, seed: int) -> Path:
    """Three well separated Gaussian classes in 5 dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = np.eye(3, 5) * 4.0
    X = centers[y] + rng.standard_normal((n, 5))
    write_table(path, X, y, [f"f{i}" for i in range(5)])
    return path


def ctx_for(node: str, **kw) -> Context:
    params = load_params(ROOT, {"n_features": "5", "classes": "3", "local_epochs": "1"})
    return Context(task_id="t1", node=node, params=params, seed=7, rounds=3, **kw)


def test_two_nodes_learn_with_fedavg(tmp_path: Path) -> None:
    task = load_task()
    inputs = [{"digits": blobs(tmp_path / f"n{i}.csv", 150, i)} for i in range(2)]
    ctxs = [ctx_for(f"node{i}") for i in range(2)]
    for c, inp in zip(ctxs, inputs, strict=True):
        task.validate_inputs(c, inp)
    data = [task.preprocess(c, inp) for c, inp in zip(ctxs, inputs, strict=True)]
    w = task.initial_weights(ctxs[0])
    again = task.initial_weights(ctxs[1])
    assert w is not None and again is not None
    assert all(np.array_equal(w[k], again[k]) for k in w)  # same on every node
    before = task.evaluate(ctxs[0], data[0], w)["accuracy"]
    for r in (1, 2, 3):
        ups = []
        for c, d in zip(ctxs, data, strict=True):
            c.round = r
            u = task.execute(c, d, w)
            assert u.num_samples == 120 and "loss" in u.metrics
            ups.append((u.weights, u.num_samples))
        w = fedavg(ups)
    metrics = [task.evaluate(c, d, w) for c, d in zip(ctxs, data, strict=True)]
    assert all(m["accuracy"] >= 0.9 and m["num_samples"] == 30 for m in metrics), metrics
    assert metrics[0]["accuracy"] > before
    result = task.reduce(ctxs[0], [Partial(f"node{i}", 30, m) for i, m in enumerate(metrics)])
    assert result["nodes"] == 2 and result["accuracy"] >= 0.9


def test_dp_reports_epsilon_and_stops_at_budget(tmp_path: Path) -> None:
    task = load_task()
    inp = {"digits": blobs(tmp_path / "n.csv", 150, 0)}
    c = ctx_for("node0", dp=DPConfig(epsilon=3.0))
    data = task.preprocess(c, inp)
    w = task.initial_weights(c)
    eps = []
    for r in (1, 2, 3):
        c.round = r
        u = task.execute(c, data, w)
        eps.append(u.metrics["epsilon"])
        json.dumps(c.state)  # the DP accounting state must be JSON-able
        w = u.weights
    assert eps[0] < eps[1] < eps[2] <= 3.0
    c.round = 4
    with pytest.raises(BudgetExhausted):
        task.execute(c, data, w)


def test_validate_inputs_refuses_bad_tables(tmp_path: Path) -> None:
    task = load_task()
    c = ctx_for("node0")
    (tmp_path / "nolabel.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="label"):
        task.validate_inputs(c, {"digits": tmp_path / "nolabel.csv"})
    with pytest.raises(ValueError, match="min_rows"):
        task.validate_inputs(c, {"digits": blobs(tmp_path / "tiny.csv", 5, 0)})
    write_table(tmp_path / "wide.csv", np.zeros((20, 4)), np.zeros(20, int), list("abcd"))
    with pytest.raises(ValueError, match="n_features"):
        task.validate_inputs(c, {"digits": tmp_path / "wide.csv"})
    with pytest.raises(ValueError, match="does not exist"):
        task.validate_inputs(c, {"digits": tmp_path / "missing.csv"})
