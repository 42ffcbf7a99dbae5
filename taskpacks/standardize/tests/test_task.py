"""standardize on synthetic sites: the federated transform equals the pooled one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from p2pfl.fl.aggregate import fedavg
from p2pfl.fl.datasets import write_table
from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Context, Partial, Table, Task

ROOT = Path(__file__).resolve().parents[1]


def load_task() -> Task:
    spec = importlib.util.spec_from_file_location("standardize_task", ROOT / "src" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (cls,) = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, Task) and c is not Task
    ]
    return cls()


def site(path: Path, n: int, shift: float, seed: int, missing: float = 0.2) -> Path:
    rng = np.random.default_rng(seed)
    X = rng.normal(shift, 1.0 + shift, size=(n, 4))
    X[rng.random(X.shape) < missing] = np.nan
    y = rng.integers(0, 2, n)
    write_table(path, X, y, ["a", "b", "c", "d"])
    return path


def ctx(node: str, **over: str) -> Context:
    return Context(task_id="t", node=node, params=load_params(ROOT, over), seed=1)


def test_every_site_applies_the_pooled_transform(tmp_path: Path) -> None:
    task = load_task()
    paths = [
        site(tmp_path / f"s{i}.csv", n, shift, i)
        for i, (n, shift) in enumerate([(200, 0.0), (50, 3.0), (120, -1.0)])
    ]
    contexts = [ctx(f"n{i}", clip="null") for i in range(3)]
    data = []
    updates = []
    for c, p in zip(contexts, paths, strict=True):
        task.validate_inputs(c, {"table": p})
        d = task.preprocess(c, {"table": p})
        data.append(d)
        updates.append(task.execute(c, d, None))
    stats = fedavg([(u.weights, u.num_samples) for u in updates])
    tables = [task.transform(c, d, stats) for c, d in zip(contexts, data, strict=True)]
    assert all(isinstance(t, Table) for t in tables)
    # The pooled reference: mean/std over every site's non-missing values.
    pooled = np.concatenate([d["X"] for d in data]).astype(np.float64)
    mean = np.nanmean(pooled, axis=0)
    std = np.nanstd(pooled, axis=0)
    for d, t in zip(data, tables, strict=True):
        want = (np.where(np.isnan(d["X"]), mean, d["X"]) - mean) / std
        assert np.allclose(t.X, want, atol=1e-4)
        assert not np.isnan(t.X).any()
        assert np.array_equal(t.y, d["y"]) and t.feature_names == ["a", "b", "c", "d"]
    # The transformed whole is centred and unit-variance on the observed cells.
    stacked = np.concatenate([t.X for t in tables])
    observed = ~np.isnan(pooled)
    assert np.allclose(stacked[observed].reshape(-1).mean(), 0.0, atol=0.2)


def test_only_a_record_count_leaves(tmp_path: Path) -> None:
    task = load_task()
    c = ctx("n0")
    partial = task.postprocess(c, Partial("n0", 42, {"num_samples": 42.0, "secret": 1.5}, {"x": 1}))
    assert partial.metrics == {"records": {"_release": "count", "n": 42}}
    assert partial.aggregates == {}
    out = task.reduce(c, [Partial("b", 10), Partial("a", 32)])
    assert out == {"records": 42, "nodes": 2, "records_by_node": {"a": 32, "b": 10}}


def test_clip_and_impute_only(tmp_path: Path) -> None:
    task = load_task()
    p = site(tmp_path / "s.csv", 100, 0.0, 3)
    d = task.preprocess(ctx("n"), {"table": p})
    u = task.execute(ctx("n"), d, None)
    t = task.transform(ctx("n", clip="0.5"), d, u.weights)
    assert np.abs(t.X).max() <= 0.5 + 1e-6
    raw = task.transform(ctx("n", scale="false"), d, u.weights)
    finite = ~np.isnan(d["X"])
    assert np.allclose(raw.X[finite], d["X"][finite], atol=1e-5)
    with pytest.raises(ValueError, match="statistics"):
        task.transform(ctx("n"), d, None)


def test_too_small_a_table_is_refused(tmp_path: Path) -> None:
    task = load_task()
    p = site(tmp_path / "s.csv", 5, 0.0, 1)
    with pytest.raises(ValueError, match="min_rows"):
        task.validate_inputs(ctx("n"), {"table": p})
