"""The preprocessing job (`Transform`): run by the runtime, carried over the worker protocol,
its table checked before it is kept."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from p2pfl.fl.aggregate import fedavg
from p2pfl.fl.datasets import write_table
from p2pfl.runtime import InProcessRunner, JobError, TaskSpec, Train, Transform, TransformResult
from p2pfl.runtime.loader import encode_table
from p2pfl.runtime.protocol import decode_job, decode_result, encode_job, encode_result
from p2pfl.taskpack.sdk import Table
from p2pfl.wire import decode_tensors, encode_tensors

ROOT = Path(__file__).resolve().parents[2]


def test_transform_runs_after_train_and_returns_the_table(tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(5.0, 2.0, size=(50, 3))
    X[0, 0] = np.nan
    path = tmp_path / "t.npz"
    write_table(path, X, np.zeros(50, dtype=int), ["a", "b", "c"])
    spec = TaskSpec(
        task_id="ab" * 16, node="n", taskpack_dir=ROOT / "taskpacks" / "standardize",
        params={"scale": True, "clip": None, "min_rows": 10}, inputs={"table": path}, seed=1,
    )  # fmt: skip
    runner = InProcessRunner()
    try:
        trained = runner.run(spec, Train(1, None)).result
        stats = fedavg([(decode_tensors(trained.update), trained.num_samples)])
        out = runner.run(spec, Transform(1, bytes(encode_tensors(stats)))).result
    finally:
        runner.close()
    assert isinstance(out, TransformResult) and out.records == 50 and out.columns == ["a", "b", "c"]
    with np.load(io.BytesIO(out.table), allow_pickle=False) as z:
        table = z["X"]
    assert not np.isnan(table).any()
    assert np.allclose(np.nanmean(np.where(np.isnan(X), np.nan, table), axis=0), 0.0, atol=0.1)


def test_the_job_and_its_result_cross_the_worker_protocol() -> None:
    job = Transform(3, b"weights")
    assert decode_job(encode_job(job)) == job
    result = encode_table(Table(np.ones((2, 2)), np.array([0, 1]), ["x", "y"]), "t")
    again = decode_result(job, encode_result(job, result))
    assert again == result
    from p2pfl.runtime.protocol import ProtocolError

    with pytest.raises(ProtocolError):
        decode_result(job, {"table": "not bytes", "records": 1, "columns": []})


def test_a_bad_table_is_refused() -> None:
    with pytest.raises(JobError, match="NaN"):
        encode_table(Table(np.array([[np.nan]]), np.array([0]), ["x"]), "t")
    with pytest.raises(JobError, match="disagree"):
        encode_table(Table(np.ones((2, 2)), np.array([0]), ["x", "y"]), "t")
    with pytest.raises(JobError, match="must return a Table"):
        encode_table({"X": 1}, "t")
