"""What only a worker process can do: survive crashes, time out, confine the task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from runtime_helpers import spec_for

from p2pfl.runtime import (
    KIND_CLOSED,
    KIND_CPU,
    KIND_CRASHED,
    KIND_MEMORY,
    KIND_TIMEOUT,
    ChildProcessRunner,
    Evaluate,
    InitialWeights,
    JobError,
    Limits,
    Train,
)
from p2pfl.runtime.sandbox import landlock_abi
from p2pfl.wire import decode_tensors

NONE = Train(round=1, weights=None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("exit", "crashed (exit code 7)"),
        ("kill", "crashed (signal 9 SIGKILL)"),
        ("segfault", "crashed (signal 11 SIGSEGV)"),
    ],
)
async def test_crash_is_a_job_error_and_next_job_restarts(
    child: ChildProcessRunner, packs: dict, tmp_path: Path, mode: str, reason: str
):
    state_path = tmp_path / "s.json"
    ok = spec_for(packs["misc"], task_id="ok", params={"mode": "state"}, state_path=state_path)
    assert (await child.run(ok, NONE)).result.num_samples == 1
    spec = spec_for(packs["misc"], params={"mode": mode})
    with pytest.raises(JobError) as info:
        await child.run(spec, NONE)
    assert info.value.reason == reason and info.value.kind == KIND_CRASHED
    if mode == "segfault":  # faulthandler's report reached the error's logs
        assert any("Fatal Python error: Segmentation fault" in x for x in info.value.logs)
    assert ("task-1", "node-a") not in child.workers()
    assert list(child._tmp_root.iterdir()) != []  # the "ok" worker's dir only
    # The other task's worker was untouched; the crashed task gets a fresh worker.
    assert (await child.run(ok, NONE)).result.num_samples == 2
    assert (await child.run(spec, Evaluate(round=1, weights=None))).result == {}


async def test_timeout_kills_worker(child: ChildProcessRunner, packs: dict):
    # 3 s: the limit also covers the worker's start (imports, bwrap), slow on a busy machine.
    spec = spec_for(
        packs["misc"], params={"mode": "sleep", "seconds": 60}, limits=Limits(timeout_s=3)
    )
    await child.run(spec, Evaluate(round=1, weights=None))  # worker up
    pid = child.workers()[("task-1", "node-a")]
    with pytest.raises(JobError) as info:
        await child.run(spec, NONE)
    assert info.value.reason == "timeout after 3 s" and info.value.kind == KIND_TIMEOUT
    assert not _alive(pid)
    assert list(child._tmp_root.iterdir()) == []


async def test_stdout_cannot_corrupt_frames(child: ChildProcessRunner, packs: dict):
    spec = spec_for(packs["misc"], params={"mode": "stdout"})
    out = await child.run(spec, NONE)
    assert out.result.num_samples == 1
    assert out.logs == ["hello on stdout"]  # print() is captured; fd-1 bytes went to stderr
    assert (await child.run(spec, NONE)).result.num_samples == 1


async def test_environment_is_scrubbed(
    child: ChildProcessRunner, packs: dict, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("P2PFL_TEST_SECRET", "hunter2")
    spec = spec_for(packs["misc"], params={"mode": "env"})
    agg = (await child.run(spec, NONE)).result.aggregates
    env, workdir = agg["env"], agg["workdir"]
    assert "P2PFL_TEST_SECRET" not in env
    assert env["HOME"] == env["TMPDIR"] == workdir == agg["cwd"]
    assert env["OMP_NUM_THREADS"] == "1"
    allowed = {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONPATH", "LC_CTYPE", "PWD"}  # bwrap: PWD
    assert {k for k in env if not k.startswith(("PYTHON", "OMP_", "MKL_", "OPENBLAS_"))} <= allowed


@pytest.mark.skipif(landlock_abi() < 1, reason="no Landlock in this kernel")
async def test_writes_outside_workdir_denied(
    child: ChildProcessRunner, packs: dict, data_csv: Path, tmp_path: Path
):
    before = data_csv.read_bytes()
    outside = tmp_path / "outside.txt"
    spec = spec_for(
        packs["misc"],
        params={"mode": "write", "input": str(data_csv), "outside": str(outside)},
        inputs={"data": data_csv},
    )
    agg = (await child.run(spec, NONE)).result.aggregates
    # The input is a read-only bind (EROFS, an OSError); `outside` lies under /tmp, which in
    # the sandbox is a private tmpfs: the write may succeed there but never reaches the host.
    assert agg["input"] in ("OSError", "PermissionError") and agg["workdir"] == "written"
    assert data_csv.read_bytes() == before and not outside.exists()
    report = child.sandbox_report("task-1", "node-a")
    assert report["sandbox"]["fs_writes"] == "workdir only"
    assert report["rlimits"]["core"] == 0


async def test_memory_limit(child: ChildProcessRunner, packs: dict):
    spec = spec_for(
        packs["misc"],
        params={"mode": "memory", "nbytes": 4 << 30},
        limits=Limits(timeout_s=30, memory_bytes=2 << 30),
    )
    with pytest.raises(JobError) as info:
        await child.run(spec, NONE)
    assert info.value.kind == KIND_MEMORY
    assert info.value.reason.startswith("memory limit: MemoryError")


async def test_cpu_limit(child: ChildProcessRunner, tmp_path: Path):
    from runtime_helpers import make_pack

    pack = make_pack(
        tmp_path,
        "spin",
        """
        from p2pfl.taskpack.sdk import Task, Update
        class Spin(Task):
            def execute(self, ctx, data, weights):
                while True:
                    pass
        """,
    )
    spec = spec_for(pack, limits=Limits(timeout_s=30, cpu_seconds=1))
    with pytest.raises(JobError) as info:
        await child.run(spec, NONE)
    assert info.value.kind == KIND_CPU
    assert info.value.reason == "cpu limit exceeded (signal 24 SIGXCPU)"


async def test_close_task_during_job(child: ChildProcessRunner, packs: dict):
    spec = spec_for(packs["misc"], params={"mode": "sleep", "seconds": 60})
    await child.run(spec, Evaluate(round=1, weights=None))
    errors: list[JobError] = []

    async def job() -> None:
        try:
            await child.run(spec, NONE)
        except JobError as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(job)
        await trio.sleep(0.2)
        await child.close_task("task-1", "node-a")
    assert [e.kind for e in errors] == [KIND_CLOSED]
    assert child.workers() == {} and list(child._tmp_root.iterdir()) == []


async def test_cancelled_job_kills_worker(child: ChildProcessRunner, packs: dict):
    spec = spec_for(packs["misc"], params={"mode": "sleep", "seconds": 60})
    await child.run(spec, Evaluate(round=1, weights=None))
    pid = child.workers()[("task-1", "node-a")]
    with trio.move_on_after(0.2):
        await child.run(spec, NONE)
    # The worker's state was unknown, so it is gone; the next job gets a fresh one.
    assert not _alive(pid) and child.workers() == {}
    assert (await child.run(spec, Evaluate(round=1, weights=None))).result == {}


async def test_concurrent_tasks(child: ChildProcessRunner, packs: dict):
    specs = [spec_for(packs["misc"], task_id=f"t{i}", params={"mode": "state"}) for i in range(3)]
    results: list[int] = []

    async def two_jobs(spec) -> None:
        for _ in range(2):
            results.append((await child.run(spec, NONE)).result.num_samples)

    async with trio.open_nursery() as nursery:
        for spec in specs:
            nursery.start_soon(two_jobs, spec)
    assert sorted(results) == [1, 1, 1, 2, 2, 2]
    assert len(set(child.workers().values())) == 3
    await child.aclose()
    assert child.workers() == {} and list(child._tmp_root.iterdir()) == []


async def test_worker_does_not_import_libp2p_or_trio(child: ChildProcessRunner, tmp_path: Path):
    from runtime_helpers import make_pack

    pack = make_pack(
        tmp_path,
        "mods",
        """
        import sys
        from p2pfl.taskpack.sdk import Task
        class Mods(Task):
            def evaluate(self, ctx, data, weights):
                return {m: m in sys.modules for m in ("libp2p", "trio", "torch")}
        """,
    )
    out = await child.run(spec_for(pack), Evaluate(round=0, weights=None))
    assert out.result == {"libp2p": False, "trio": False, "torch": False}


async def test_unencodable_params_are_a_job_error(child: ChildProcessRunner, packs: dict):
    spec = spec_for(packs["misc"], params={"mode": "state", "bad": {1, 2}})
    with pytest.raises(JobError, match="cannot encode the task spec for the worker: TypeError"):
        await child.run(spec, NONE)
    assert child.workers() == {} and list(child._tmp_root.iterdir()) == []


TORCH_TASK = """
import torch
from p2pfl.taskpack.sdk import Task, Update

class TorchTask(Task):
    def initial_weights(self, ctx):
        torch.manual_seed(ctx.seed)
        return {k: v.numpy() for k, v in torch.nn.Linear(3, 2).state_dict().items()}

    def execute(self, ctx, data, weights):
        model = torch.nn.Linear(3, 2)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(torch.ones(4, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        return Update(num_samples=4, weights=state, metrics={"loss": loss.item()})
"""


@pytest.mark.slow
async def test_torch_task_in_sandboxed_worker(child: ChildProcessRunner, tmp_path: Path):
    from runtime_helpers import make_pack

    spec = spec_for(make_pack(tmp_path, "torch", TORCH_TASK), limits=Limits(timeout_s=120))
    init = (await child.run(spec, InitialWeights())).result
    res = (await child.run(spec, Train(round=1, weights=init))).result
    assert res.num_samples == 4 and res.metrics["loss"] > 0
    assert set(decode_tensors(res.update)) == {"weight", "bias"}
