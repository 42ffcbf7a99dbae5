"""Runs the hooks on tables made here: the federated result equals the pooled one.

cd taskpacks/federated-stats && python -m pytest tests -q
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Context, Partial, Task, is_released

ROOT = Path(__file__).resolve().parents[1]


def load_task() -> Task:
    spec = importlib.util.spec_from_file_location("stats_task", ROOT / "src" / "task.py")
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


def ctx_for(node: str, **overrides: str) -> Context:
    return Context(task_id="s", node=node, params=load_params(ROOT, overrides), seed=1)


def write_csv(path: Path, age: np.ndarray) -> Path:
    lines = ["id,age,label"] + [
        f"{i},{'' if np.isnan(a) else repr(float(a))},{i % 2}" for i, a in enumerate(age)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_federated_equals_pooled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.normal(50, 12, n) for n in (40, 75, 33)]
    chunks[1][3] = np.nan  # a missing cell is counted, not used
    task = load_task()
    params = {"column": "age", "bins": "8", "range_min": "20", "range_max": "80"}
    partials = []
    for i, chunk in enumerate(chunks):
        ctx = ctx_for(f"n{i}", **params)
        inputs = {"table": write_csv(tmp_path / f"n{i}.csv", chunk)}
        task.validate_inputs(ctx, inputs)
        update = task.execute(ctx, task.preprocess(ctx, inputs), None)
        assert update.weights is None
        assert update.num_samples == np.isfinite(chunk).sum()
        assert set(update.aggregates) >= {"count", "sum", "sum_sq", "min", "max", "histogram"}
        assert all(is_released(v) for v in update.aggregates.values())  # typed, checkable
        partial = task.postprocess(ctx, Partial(f"n{i}", update.num_samples, {}, update.aggregates))
        partials.append(partial)
    result = task.reduce(ctx_for("n0", **params), partials[::-1])
    pooled = np.concatenate(chunks)
    pooled = pooled[np.isfinite(pooled)]
    assert result["count"] == pooled.size and result["missing"] == 1 and result["nodes"] == 3
    assert result["column"] == "age"
    assert result["mean"] == pytest.approx(pooled.mean(), rel=1e-12)
    assert result["std"] == pytest.approx(pooled.std(), rel=1e-9)
    assert result["std_sample"] == pytest.approx(pooled.std(ddof=1), rel=1e-9)
    assert result["min"] == pooled.min() and result["max"] == pooled.max()
    counts, _ = np.histogram(pooled, bins=np.linspace(20, 80, 9))
    assert result["histogram"]["counts"] == counts.tolist()
    assert result["underflow"] == int((pooled < 20).sum())
    assert result["overflow"] == int((pooled > 80).sum())


def test_default_column_and_explicit_edges(tmp_path: Path) -> None:
    task = load_task()
    ctx = ctx_for("n0", bins="[0, 1, 10, 100]")
    inputs = {"table": write_csv(tmp_path / "t.csv", np.array([0.5, 5.0, 50.0, 500.0]))}
    update = task.execute(ctx, task.preprocess(ctx, inputs), None)
    # default column = first feature column: "id" (0..3)
    assert update.aggregates["histogram"]["counts"] == [1, 3, 0]  # ids 0 | 1, 2, 3 | -
    ctx = ctx_for("n0", column="age", bins="[0, 1, 10, 100]")
    update = task.execute(ctx, task.preprocess(ctx, inputs), None)
    assert update.aggregates["histogram"]["counts"] == [1, 1, 1]
    assert update.aggregates["overflow"]["n"] == 1


def test_reduce_adds_what_the_nodes_released(tmp_path: Path) -> None:
    """Through the node's release filter (k=3): small bins stay "<k" after the reduce,
    extremes that were not released are None, sums add up what was released."""
    from p2pfl.policy.release import ReleaseRules, filter_release

    task = load_task()
    params = {"column": "age", "bins": "[0, 10, 20, 30]"}
    chunks = [np.array([1.0, 2, 3, 15, 25, 26, 27]), np.array([4.0, 5, 6, 16, 17, 18, 28])]
    partials = []
    for i, chunk in enumerate(chunks):
        ctx = ctx_for(f"n{i}", **params)
        inputs = {"table": write_csv(tmp_path / f"n{i}.csv", chunk)}
        update = task.execute(ctx, task.preprocess(ctx, inputs), None)
        released, notes = filter_release(update.aggregates, ReleaseRules(k=3))
        assert any("bin(s) under k suppressed" in n for n in notes)
        partials.append(Partial(f"n{i}", update.num_samples, {}, released))
    result = task.reduce(ctx_for("n0", **params), partials)
    # bin [10, 20): 1 at n0 (suppressed there), 3 at n1 -> the sum would mislead: "<k".
    assert result["histogram"]["counts"] == [6, "<k", "<k"]
    assert result["min"] is None and result["max"] is None  # extremes denied by default
    assert result["count"] == 14 and result["mean"] == pytest.approx(
        np.mean(np.concatenate(chunks))
    )
    assert result["underflow"] is None  # 0 < k at both nodes: never released


def test_bad_params_and_inputs(tmp_path: Path) -> None:
    task = load_task()
    inputs = {"table": write_csv(tmp_path / "t.csv", np.array([1.0, 2.0]))}
    with pytest.raises(ValueError, match="no column 'height'"):
        task.validate_inputs(ctx_for("n0", column="height"), inputs)
    with pytest.raises(ValueError, match="range_max"):
        task.validate_inputs(ctx_for("n0", range_min="5", range_max="1"), inputs)
    with pytest.raises(ValueError, match="strictly increasing"):
        task.validate_inputs(ctx_for("n0", bins="[3, 1]"), inputs)
    (tmp_path / "s.csv").write_text("name\nbob\n")
    with pytest.raises(ValueError, match="non-numeric"):
        task.validate_inputs(ctx_for("n0", column="name"), {"table": tmp_path / "s.csv"})
