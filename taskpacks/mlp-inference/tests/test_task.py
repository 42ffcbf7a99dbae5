"""mlp-inference's own tests: the numpy forward pass equals torch's, batches predict every
row, and a row with a bad value fails alone. Run with: python -m pytest tests -q"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Context, Task

ROOT = Path(__file__).resolve().parents[1]


def load_task() -> Task:
    spec = importlib.util.spec_from_file_location("mlp_inference_task", ROOT / "src" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    found = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, Task) and c.__module__ == module.__name__
    ]
    assert len(found) == 1, found
    return found[0]()


def ctx(**params: object) -> Context:
    return Context(task_id="t", node="n", params=load_params(ROOT, {}) | params, seed=3)


def model(n_in: int = 4, hidden: int = 5, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "0.weight": rng.normal(size=(hidden, n_in)),
        "0.bias": rng.normal(size=hidden),
        "2.weight": rng.normal(size=(classes, hidden)),
        "2.bias": rng.normal(size=classes),
    }


def write(path: Path, rows: list[list[object]]) -> Path:
    lines = ["f0,f1,f2,f3,label"] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_matches_the_torch_model() -> None:
    torch = pytest.importorskip("torch")
    weights = model()
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    net.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()})
    x = np.random.default_rng(1).normal(size=(7, 4))
    want = torch.softmax(net(torch.tensor(x, dtype=torch.float32)), dim=1).detach().numpy()
    task = load_task()
    layers = task.load_model(ctx(), weights)
    forward = sys.modules[type(task).__module__].forward
    assert np.allclose(forward(layers, x), want, atol=1e-5)


def test_every_row_gets_a_prediction_and_a_bad_row_fails_alone(tmp_path: Path) -> None:
    task = load_task()
    rows = np.random.default_rng(2).normal(size=(6, 4)).round(3).tolist()
    rows = [r + [0] for r in rows]
    rows[4][2] = "broken"
    inputs = {"digits": write(tmp_path / "t.csv", rows)}
    keys = [r.key for r in task.records(ctx(), inputs)]
    assert keys == [f"row-{i}" for i in range(1, 7)]
    out = task.run_batch(ctx(), inputs, keys, model())
    assert [r["key"] for r in out.rows] == ["row-1", "row-2", "row-3", "row-4", "row-6"]
    assert all(r["prediction"] in ("0", "1", "2") and 0 < r["score"] <= 1 for r in out.rows)
    assert out.failed == [("row-5", "ValueError: a feature is not a number")]


def test_refuses_a_model_that_does_not_fit(tmp_path: Path) -> None:
    task = load_task()
    inputs = {"digits": write(tmp_path / "t.csv", [[1, 2, 3, 4, 0]])}
    out = task.run_batch(ctx(), inputs, ["row-1"], model(n_in=9))
    assert "the model takes 9" in out.failed[0][1]
    with pytest.raises(ValueError, match="no model"):
        task.validate_inputs(ctx(), inputs)


def test_a_bundled_model_when_no_model_cid(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    np.savez(copy / "src" / "model.npz", **model())
    spec = importlib.util.spec_from_file_location("bundled_task", copy / "src" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    task = module.MLPInference()
    inputs = {"digits": write(tmp_path / "t.csv", [[1, 2, 3, 4, 0], [0, 0, 0, 1, 1]])}
    task.validate_inputs(ctx(), inputs)  # no model_cid, but a bundled model: fine
    out = task.run_batch(ctx(), inputs, ["row-1", "row-2"], None)
    assert not out.failed and len(out.rows) == 2
