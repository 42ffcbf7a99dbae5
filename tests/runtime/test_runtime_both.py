"""Every job type through both runners, with identical results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import Harness, spec_for

from p2pfl.runtime import (
    KIND_BUDGET,
    KIND_ERROR,
    KIND_LOAD,
    DPConfig,
    Evaluate,
    Finalize,
    InitialWeights,
    InProcessRunner,
    JobError,
    Partial,
    Reduce,
    Train,
    TrainResult,
    Validate,
)
from p2pfl.wire import decode_tensors, encode_tensors


async def test_training_lifecycle(runner: Harness, packs: dict, data_csv: Path, tmp_path: Path):
    state_path = tmp_path / "state" / "task-1.json"
    spec = spec_for(
        packs["train"],
        params={"lr": 0.1},
        inputs={"data": data_csv},
        rounds=3,
        state_path=state_path,
    )
    assert (await runner.run(spec, Validate())).result is None

    init = (await runner.run(spec, InitialWeights())).result
    assert isinstance(init, bytes)
    w0 = decode_tensors(init)
    expected = np.random.default_rng(42).normal(size=2).astype(np.float32)
    assert np.array_equal(w0["w"], expected) and list(w0) == ["w", "b"]

    weights, losses = init, []
    for rnd in (1, 2, 3):
        out = await runner.run(spec, Train(round=rnd, weights=weights))
        res = out.result
        assert isinstance(res, TrainResult) and res.num_samples == 40
        assert isinstance(res.update, bytes)
        assert res.update == bytes(encode_tensors(decode_tensors(res.update)))  # canonical
        assert isinstance(res.metrics["loss"], float)
        assert out.logs == [f"round {rnd} of 3 lr=0.1", "printed by the task"]
        losses.append(res.metrics["loss"])
        weights = res.update
    assert losses[0] > losses[1] > losses[2]

    metrics = (await runner.run(spec, Evaluate(round=3, weights=weights))).result
    assert metrics["num_samples"] == 40 and isinstance(metrics["num_samples"], int)
    assert metrics["mse"] == pytest.approx(losses[-1], rel=1e-5)

    # preprocess ran once for the three Train jobs and the Evaluate; state was persisted.
    assert json.loads(state_path.read_text()) == {"preprocessed": 1, "rounds_done": 3}

    partial = (await runner.run(spec, Finalize(40, {"mse": 0.5}, {}))).result
    assert partial == Partial(node="node-a", num_samples=40, metrics={"mse": 0.5}, aggregates={})
    parts = [partial, Partial(node="node-b", num_samples=10, metrics={"mse": 1.0})]
    reduced = (await runner.run(spec, Reduce(parts))).result
    assert reduced == {"num_samples": 50, "nodes": 2, "mse": pytest.approx(0.6)}


async def test_analysis_task(runner: Harness, packs: dict, data_csv: Path):
    x = np.loadtxt(data_csv, delimiter=",")[:, 0]
    spec = spec_for(packs["analysis"], inputs={"data": data_csv})
    assert (await runner.run(spec, InitialWeights())).result is None
    res = (await runner.run(spec, Train(round=1, weights=None))).result
    assert res.update is None and res.num_samples == 40
    assert res.aggregates["count"] == 40
    assert res.aggregates["sum"] == pytest.approx(x.sum())
    assert res.aggregates["hist"] == np.histogram(x, bins=3)[0].tolist()
    partial = (await runner.run(spec, Finalize(40, {}, res.aggregates))).result
    assert partial.node == "node-a"  # the task's attempt to rename it was overridden
    assert partial.aggregates["sum"] == round(x.sum(), 3)
    other = Partial(node="node-b", num_samples=10, aggregates={"count": 10, "sum": 5.0})
    out = (await runner.run(spec, Reduce([partial, other]))).result
    assert out["count"] == 50 and out["nodes"] == ["node-a", "node-b"]
    assert out["mean"] == pytest.approx((round(x.sum(), 3) + 5.0) / 50)


async def test_validate_refuses(runner: Harness, packs: dict):
    spec = spec_for(packs["train"], inputs={"data": Path("/nonexistent/x.csv")})
    with pytest.raises(JobError) as info:
        await runner.run(spec, Validate())
    assert info.value.kind == KIND_ERROR
    assert info.value.reason.startswith("ValueError: input 'data': /nonexistent/x.csv")


@pytest.mark.parametrize(
    ("pack", "reason"),
    [
        ("none", "src/task.py defines no Task subclass; exactly one is needed"),
        ("two", "src/task.py defines 2 Task subclasses (A, B); exactly one is needed"),
        ("importerror", "cannot load src/task.py: ModuleNotFoundError: No module named"),
    ],
)
async def test_load_errors(runner: Harness, packs: dict, pack: str, reason: str):
    for _ in range(2):  # not cached: the second job fails the same way
        with pytest.raises(JobError) as info:
            await runner.run(spec_for(packs[pack]), Validate())
        assert info.value.kind == KIND_LOAD
        assert info.value.reason.startswith(reason)


async def test_missing_task_py(runner: Harness, tmp_path: Path):
    with pytest.raises(JobError, match="taskpack has no src/task.py") as info:
        await runner.run(spec_for(tmp_path), Validate())
    assert info.value.kind == KIND_LOAD


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("raise", "ValueError: column 'age' missing"),
        ("sysexit", "SystemExit: 5"),
        ("nan", "Misc.execute: RemoteProtocolError: tensor blob: tensor 'w': contains NaN"),
        ("bad-return", "Misc.execute must return an Update, got dict"),
        ("unplain", "Misc.execute: aggregates['x']: object is not plain data"),
    ],
)
async def test_task_errors_become_job_errors(runner: Harness, packs: dict, mode: str, reason):
    spec = spec_for(packs["misc"], params={"mode": mode})
    with pytest.raises(JobError) as info:
        await runner.run(spec, Train(round=1, weights=None))
    assert info.value.reason.startswith(reason), info.value.reason
    # The same session keeps serving: the failure did not poison it.
    assert (await runner.run(spec, Evaluate(round=1, weights=None))).result == {}


async def test_traceback_in_logs(runner: Harness, packs: dict):
    spec = spec_for(packs["misc"], params={"mode": "raise"})
    with pytest.raises(JobError) as info:
        await runner.run(spec, Train(round=1, weights=None))
    assert info.value.logs[0].startswith("Traceback")
    assert info.value.logs[-1] == "ValueError: column 'age' missing"


async def test_budget_exhausted(runner: Harness, packs: dict):
    dp = DPConfig(epsilon=2.0)
    within = spec_for(packs["misc"], params={"mode": "epsilon", "epsilon": 1.9}, dp=dp)
    res = (await runner.run(within, Train(round=1, weights=None))).result
    assert res.metrics == {"epsilon": 1.9}
    over = spec_for(packs["misc"], task_id="t2", params={"mode": "epsilon", "epsilon": 2.5}, dp=dp)
    with pytest.raises(JobError) as info:
        await runner.run(over, Train(round=1, weights=None))
    assert info.value.kind == KIND_BUDGET
    assert info.value.reason == "budget-exhausted: epsilon 2.5 > budget 2"


async def test_state_survives_restart(runner: Harness, packs: dict, tmp_path: Path):
    state_path = tmp_path / "s.json"
    spec = spec_for(packs["misc"], params={"mode": "state"}, state_path=state_path)
    for n in (1, 2):
        assert (await runner.run(spec, Train(round=n, weights=None))).result.num_samples == n
    await runner.close_task("task-1", "node-a")
    # Same runner, new session: state comes back from the file.
    assert (await runner.run(spec, Train(round=3, weights=None))).result.num_samples == 3
    # A fresh runner (node restart).
    fresh = runner.restarted()
    try:
        assert (await fresh.run(spec, Train(round=4, weights=None))).result.num_samples == 4
    finally:
        await fresh.aclose()
    assert json.loads(state_path.read_text()) == {"n": 4}
    assert not list(tmp_path.glob(".s.json.*"))  # no temp files left behind


async def test_corrupt_state_is_an_error(runner: Harness, packs: dict, tmp_path: Path):
    state_path = tmp_path / "s.json"
    state_path.write_text("{not json")
    spec = spec_for(packs["misc"], params={"mode": "state"}, state_path=state_path)
    with pytest.raises(JobError, match="cannot read task state"):
        await runner.run(spec, Train(round=1, weights=None))


async def test_nodes_are_separate(runner: Harness, packs: dict):
    """Two nodes of one task: separate instances, state and temp dirs."""
    a = spec_for(packs["misc"], node="a", params={"mode": "state"})
    b = spec_for(packs["misc"], node="b", params={"mode": "state"})
    for expected in (1, 2):
        assert (await runner.run(a, Train(round=1, weights=None))).result.num_samples == expected
    assert (await runner.run(b, Train(round=1, weights=None))).result.num_samples == 1


async def test_workdir_wiped_on_close(runner: Harness, packs: dict):
    spec = spec_for(packs["misc"], params={"mode": "env"})
    res = (await runner.run(spec, Train(round=1, weights=None))).result
    workdir = Path(res.aggregates["workdir"])
    assert workdir.is_dir() and workdir.parent == runner.tmp_root
    await runner.close_task("task-1", "node-a")
    assert not workdir.exists()
    assert list(runner.tmp_root.iterdir()) == []


async def test_bad_weights_are_a_job_error(runner: Harness, packs: dict, data_csv: Path):
    spec = spec_for(packs["train"], params={"lr": 0.1}, inputs={"data": data_csv})
    with pytest.raises(JobError) as info:
        await runner.run(spec, Train(round=1, weights=b"not a tensor blob"))
    assert info.value.reason.startswith("weights given to the task are invalid:")


def test_inprocess_pool_shares_one_module(packs: dict, tmp_path: Path):
    """1,000 simulated nodes: one import, one Task instance and one temp dir per node."""
    tmp_root = tmp_path / "pool"
    tmp_root.mkdir()
    with InProcessRunner(tmp_root=tmp_root) as pool:
        specs = [spec_for(packs["misc"], node=f"n{i}", params={"mode": "state"}) for i in range(50)]
        for spec in specs:
            assert pool.run(spec, Train(round=1, weights=None)).result.num_samples == 1
        sessions = [pool._sessions[("task-1", f"n{i}")] for i in range(50)]
        assert len({type(s.task) for s in sessions}) == 1
        assert len({id(s.task) for s in sessions}) == 50
        assert len(list(tmp_root.iterdir())) == 50
        pool.close_task("task-1", "n0")
        assert len(pool.sessions()) == 49
    assert list(tmp_root.iterdir()) == []
