"""The bubblewrap sandbox (issue 10): a hostile taskpack escapes nowhere, a legitimate torch
taskpack still trains, nothing of a task outlives close_task, and no sandbox means refusal.

The fake node's data dir lives under /var/tmp, not /tmp: the sandbox's /tmp is a private
tmpfs anyway, so a data dir beneath /tmp would prove nothing about the mount namespace.
Run once more in CI with the system's bwrap: P2PFL_BWRAP=/usr/bin/bwrap pytest tests/runtime.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio
from runtime_helpers import spec_for

from p2pfl.runtime import (
    KIND_SANDBOX,
    ChildProcessRunner,
    JobError,
    Limits,
    ResourcePolicy,
    Train,
)
from p2pfl.runtime.bwrap import SandboxUnavailable, probe

HERE = Path(__file__).resolve().parent
HOSTILE = HERE / "hostile_pack"
DIGITS = HERE.parents[1] / "taskpacks" / "fedavg-mlp-digits"
NONE = Train(round=1, weights=None)

try:
    probe()
    NO_BWRAP = ""
except SandboxUnavailable as e:
    NO_BWRAP = e.reason
needs_bwrap = pytest.mark.skipif(bool(NO_BWRAP), reason=f"no usable bwrap: {NO_BWRAP}")


@dataclass
class FakeNode:
    """What a real node holds that a task must never reach."""

    data_dir: Path
    other_dataset: Path
    home_file: Path
    control: socket.socket
    other: socket.socket
    abstract: socket.socket
    abstract_name: str
    udp: socket.socket
    tcp: socket.socket
    victim: subprocess.Popen[bytes]
    secret: str


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNode]:
    secret = uuid.uuid4().hex
    monkeypatch.setenv("P2PFL_TEST_SECRET", secret)  # the node's environment
    root = Path(tempfile.mkdtemp(prefix="p2pfl-sandbox-test-", dir="/var/tmp"))
    data_dir = root / "node"
    data_dir.mkdir(mode=0o700)
    (data_dir / "identity.key").write_text(secret)
    (data_dir / "tmp").mkdir()
    datasets = root / "datasets"
    datasets.mkdir()
    (datasets / "mine.csv").write_text("x,label\n1,0\n")
    other_dataset = datasets / "other.csv"
    other_dataset.write_text(f"patient,{secret}\n")
    home_file = Path.home() / f".p2pfl-sandbox-canary-{secret[:8]}"
    home_file.write_text(secret)
    socks = []

    def unix(path: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen()
        s.setblocking(False)
        socks.append(s)
        return s

    def inet(kind: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, kind)
        s.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            s.listen()
        s.setblocking(False)
        socks.append(s)
        return s

    abstract_name = f"p2pfl-sandbox-test-{secret[:8]}"
    victim = subprocess.Popen(["sleep", "120"])
    try:
        yield FakeNode(
            data_dir=data_dir,
            other_dataset=other_dataset,
            home_file=home_file,
            control=unix(str(data_dir / "control.sock")),
            other=unix(str(root / "peer.sock")),
            abstract=unix("\0" + abstract_name),
            abstract_name=abstract_name,
            udp=inet(socket.SOCK_DGRAM),
            tcp=inet(socket.SOCK_STREAM),
            victim=victim,
            secret=secret,
        )
    finally:
        victim.kill()
        victim.wait()
        for s in socks:
            s.close()
        home_file.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def _nothing_arrived(s: socket.socket) -> bool:
    try:
        if s.type == socket.SOCK_STREAM:
            s.accept()[0].close()
        else:
            s.recv(100)
    except BlockingIOError:
        return True
    return False


@needs_bwrap
async def test_hostile_taskpack_escapes_nowhere(node: FakeNode):
    runner = ChildProcessRunner(tmp_root=node.data_dir / "tmp", private_paths=[node.data_dir])
    leftover = f"p2pfl-hostile-{node.secret[:8]}"
    params = {
        "data_dir": str(node.data_dir),
        "other_dataset": str(node.other_dataset),
        "home_file": str(node.home_file),
        "node_pid": os.getpid(),
        "victim_pid": node.victim.pid,
        "secret": node.secret,
        "udp_port": node.udp.getsockname()[1],
        "tcp_port": node.tcp.getsockname()[1],
        "other_socket": node.other.getsockname(),
        "abstract_socket": node.abstract_name,
        "leftover": leftover,
    }
    mine = node.other_dataset.parent / "mine.csv"
    spec = spec_for(HOSTILE, params=params, inputs={"table": mine}, limits=Limits(timeout_s=60))
    async with runner:
        out = await runner.run(spec, NONE)
        attempts = out.result.aggregates["attempts"]
        workdir = runner._workers[("task-1", "node-a")].workdir
        report = runner.sandbox_report("task-1", "node-a")
        assert report["bwrap"] and report["rlimits"]["as"] == 2 << 30  # the policy's default
        # While the task is still open: nothing reached the host.
        assert not Path("/dev/shm", leftover).exists() and not Path("/tmp", leftover).exists()
        await trio.sleep(0.2)
        assert (workdir / "linger.txt").exists()  # the lingering child is really running
        await runner.close_task("task-1", "node-a")
    expected = {
        "key", "other_dataset", "home", "proc_node_cmdline", "proc_node_environ",
        "proc_parent", "udp", "tcp", "control_socket", "other_socket", "abstract_socket",
        "fork", "dev_shm", "tmp", "linger", "memory", "signal_node", "kill_victim",
    }  # fmt: skip
    print("\n".join(f"{k}: {v}" for k, v in attempts.items()))
    assert set(attempts) == expected, attempts
    escaped = {k: v for k, v in attempts.items() if v.startswith(("SUCCEEDED", "skipped"))}
    assert escaped == {}, attempts
    assert attempts["memory"].startswith("blocked: MemoryError"), attempts["memory"]
    assert attempts["fork"].startswith("blocked after"), attempts["fork"]
    for s in (node.udp, node.tcp, node.control, node.other, node.abstract):
        assert _nothing_arrived(s), s
    assert node.victim.poll() is None  # still alive
    # Cleanup: the scratch dir is gone and stays gone (the lingering writer died with the
    # namespace); the private /tmp and /dev/shm never touched the host's.
    await trio.sleep(0.3)
    assert not workdir.exists() and list((node.data_dir / "tmp").iterdir()) == []
    assert not Path("/dev/shm", leftover).exists() and not Path("/tmp", leftover).exists()
    assert node.home_file.read_text() == node.secret  # untouched


@needs_bwrap
async def test_policy_caps_what_a_manifest_asks(node: FakeNode, tmp_path: Path):
    policy = ResourcePolicy(memory_bytes=1 << 30, max_memory_bytes=3 << 30, cpu_seconds=60)
    runner = ChildProcessRunner(tmp_root=node.data_dir / "tmp", policy=policy)
    from runtime_helpers import MISC_TASK, make_pack

    pack = make_pack(tmp_path, "misc", MISC_TASK)
    async with runner:
        asks = Limits(timeout_s=30, memory_bytes=64 << 30, cpu_seconds=10)
        await runner.run(spec_for(pack, params={"mode": "state"}, limits=asks), NONE)
        capped = runner.sandbox_report("task-1", "node-a")["rlimits"]
        await runner.run(spec_for(pack, task_id="t2", params={"mode": "state"}), NONE)
        default = runner.sandbox_report("t2", "node-a")["rlimits"]
    assert capped["as"] == 3 << 30 and capped["cpu"] == 10
    assert default["as"] == 1 << 30 and default["cpu"] == 60


@needs_bwrap
@pytest.mark.slow
async def test_digits_taskpack_trains_confined(tmp_path: Path):
    from sklearn.datasets import load_digits

    from p2pfl.fl.datasets import write_table
    from p2pfl.taskpack.params import load_params

    digits = load_digits()
    table = tmp_path / "digits.csv"
    write_table(table, digits.data[:400], digits.target[:400], [f"p{i}" for i in range(64)])
    params = load_params(DIGITS, {"local_epochs": "1"})
    spec = spec_for(DIGITS, params=params, inputs={"digits": table}, limits=Limits(timeout_s=120))
    async with ChildProcessRunner(tmp_root=tmp_path) as runner:
        res = (await runner.run(spec, NONE)).result
        assert runner.sandbox_report("task-1", "node-a")["bwrap"]
    assert res.num_samples > 0 and res.update
    assert np.isfinite(res.metrics.get("loss", res.metrics.get("train_loss", 0.0)))


@pytest.mark.parametrize("bad", ["/bin/false", "/nonexistent/bwrap"])
async def test_fail_closed_without_a_usable_bwrap(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from runtime_helpers import MISC_TASK, make_pack

    monkeypatch.setenv("P2PFL_BWRAP", bad)
    pack = make_pack(tmp_path, "misc", MISC_TASK)
    spec = spec_for(pack, params={"mode": "state"})
    async with ChildProcessRunner(tmp_root=tmp_path) as runner:
        assert runner.bwrap is None and bad in (runner.sandbox_error or "")
        assert runner.sandbox.startswith("unavailable")
        with pytest.raises(JobError) as info:
            await runner.run(spec, NONE)
    assert info.value.kind == KIND_SANDBOX
    assert info.value.reason.startswith("sandbox unavailable: ") and bad in info.value.reason
    assert "--unsafe-no-sandbox" in info.value.reason
    # The operator's explicit override runs it, loudly.
    async with ChildProcessRunner(tmp_root=tmp_path, unsafe_no_sandbox=True) as runner:
        assert runner.sandbox.startswith("NONE")
        assert (await runner.run(spec, NONE)).result.num_samples == 1
        assert runner.sandbox_report("task-1", "node-a")["bwrap"] is None
    assert "WITHOUT the bubblewrap sandbox" in caplog.text


def test_resource_policy_bounds():
    p = ResourcePolicy()
    eff = p.effective(Limits())
    assert eff.memory_bytes == 2 << 30 and eff.cpu_seconds == 3600 and eff.nproc == 64
    assert p.effective(Limits(memory_bytes=100 << 30)).memory_bytes == 8 << 30
    assert p.effective(Limits(memory_bytes=1 << 30)).memory_bytes == 1 << 30
    assert p.effective(Limits(timeout_s=10**9)).timeout_s == p.max_timeout_s
    with pytest.raises(ValueError):
        ResourcePolicy(memory_bytes=10 << 30)  # above its own maximum
