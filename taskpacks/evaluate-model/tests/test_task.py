"""evaluate-model: the numpy forward pass matches torch, and only typed aggregates leave."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from p2pfl.fl.datasets import write_table
from p2pfl.policy.release import ReleaseRules, filter_release
from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Context, Partial, Task

ROOT = Path(__file__).resolve().parents[1]


def load() -> tuple[Task, object]:
    spec = importlib.util.spec_from_file_location("evaluate_task", ROOT / "src" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (cls,) = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, Task) and c is not Task
    ]
    return cls(), module


def ctx(**over: str) -> Context:
    return Context(task_id="t", node="n", params=load_params(ROOT, over), seed=1)


def model(width: int = 4) -> tuple[object, dict[str, np.ndarray]]:
    import torch

    from p2pfl.fl.torch_utils import state_to_numpy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(width, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return net, state_to_numpy(net)


def test_numpy_forward_matches_torch_and_metrics_are_right(tmp_path: Path) -> None:
    import torch

    task, module = load()
    net, weights = model()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 4)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(X)).numpy()
    got = module.predict(module.layers_of(weights), X)
    assert np.allclose(got, want, atol=1e-5)
    y = want.argmax(axis=1)
    y[:6] = 1 - y[:6]  # six wrong labels
    path = tmp_path / "t.npz"
    write_table(path, X, y, ["a", "b", "c", "d"])
    c = ctx(holdout_only="false")
    task.validate_inputs(c, {"table": path})
    upd = task.execute(c, task.preprocess(c, {"table": path}), weights)
    assert upd.weights is None and upd.num_samples == 60
    assert upd.aggregates["accuracy"]["value"] == pytest.approx(54 / 60)
    out = task.reduce(c, [Partial("n", 60, {}, upd.aggregates)])
    assert out["records"] == 60 and out["accuracy"] == pytest.approx(0.9)
    assert sum(out["confusion"].values()) == 60


def test_the_node_rule_suppresses_small_cells(tmp_path: Path) -> None:
    task, _ = load()
    _, weights = model()
    X = np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32)
    path = tmp_path / "t.npz"
    write_table(path, X, np.zeros(30, dtype=int), ["a", "b", "c", "d"])
    c = ctx(holdout_only="false")
    upd = task.execute(c, task.preprocess(c, {"table": path}), weights)
    released, _notes = filter_release(upd.aggregates, ReleaseRules(k=10))
    cells = released["confusion"]["counts"]
    assert "<k" in cells.values()  # label 1 never occurs: those cells stand for < 10 records
    merged = task.reduce(c, [Partial("a", 30, {}, released), Partial("b", 30, {}, released)])
    assert "<k" in merged["confusion"].values() and "sensitivity" not in merged


def test_holdout_rows_are_the_training_packs(tmp_path: Path) -> None:
    _, module = load()
    spec = importlib.util.spec_from_file_location(
        "tab", ROOT.parent / "fedavg-mlp-tabular" / "src" / "task.py"
    )
    assert spec is not None and spec.loader is not None
    tab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tab)
    assert np.array_equal(module.holdout_mask(97, 0.2, 3), tab.holdout_mask(97, 0.2, 3))


def test_a_model_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    task, module = load()
    _, weights = model(width=5)
    path = tmp_path / "t.npz"
    write_table(path, np.zeros((10, 4)), np.zeros(10, dtype=int), ["a", "b", "c", "d"])
    c = ctx(holdout_only="false")
    with pytest.raises(ValueError, match="features"):
        task.execute(c, task.preprocess(c, {"table": path}), weights)
    with pytest.raises(ValueError, match="no model"):
        task.execute(c, task.preprocess(c, {"table": path}), None)
    with pytest.raises(ValueError, match="linear"):
        module.layers_of({"0.weight": np.zeros((2, 2))})
