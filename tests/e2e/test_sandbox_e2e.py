"""A real `p2pfl node` runs the hostile taskpack (tests/runtime/hostile_pack): it says at
start which sandbox it uses, and every escape fails from inside its worker."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from tests.e2e.cluster import REPO, Cluster
from tests.e2e.test_tasks import run_task, wait_ok

HOSTILE = REPO / "tests" / "runtime" / "hostile_pack"


def _listener(family: int, kind: int, addr: object) -> socket.socket:
    s = socket.socket(family, kind)
    s.bind(addr)
    if kind == socket.SOCK_STREAM:
        s.listen()
    s.setblocking(False)
    return s


def _nothing_arrived(s: socket.socket) -> bool:
    try:
        if s.type == socket.SOCK_STREAM:
            s.accept()[0].close()
        else:
            s.recv(100)
    except BlockingIOError:
        return True
    return False


@pytest.mark.slow
def test_real_node_confines_a_hostile_taskpack(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = uuid.uuid4().hex
    monkeypatch.setenv("P2PFL_TEST_SECRET", secret)  # reaches the node's environment
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    mine = datasets / "mine.csv"
    mine.write_text("x,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    other = datasets / "other.csv"
    other.write_text("x,label\n" + "".join(f"{i},1\n" for i in range(20)))
    home_file = Path.home() / f".p2pfl-sandbox-canary-{secret[:8]}"
    home_file.write_text(secret)
    udp = _listener(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))
    tcp = _listener(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
    peer = _listener(socket.AF_UNIX, socket.SOCK_STREAM, str(tmp_path / "peer.sock"))
    try:
        (node,) = cluster.start(1, datasets=lambda i: {"table": mine, "other": other})
        assert "sandbox: bubblewrap" in node.stderr(), node.stderr_tail()
        task_id = run_task(
            cluster,
            node,
            HOSTILE,
            f"data_dir={node.data_dir}",
            f"other_dataset={other}",
            f"home_file={home_file}",
            f"node_pid={node.pid}",
            f"victim_pid={os.getpid()}",  # the test itself: it must survive
            f"secret={secret}",
            f"udp_port={udp.getsockname()[1]}",
            f"tcp_port={tcp.getsockname()[1]}",
            f"other_socket={tmp_path / 'peer.sock'}",
            f"abstract_socket=p2pfl-none-{secret[:8]}",
            f"leftover=p2pfl-hostile-{secret[:8]}",
        )
        wait_ok(cluster, node, task_id)
        # The node's release filter keeps free-form aggregates home (as it should); the
        # task's log lines, one per attempt, come through its trace.
        code, events = cluster.cli_json_lines("trace", task_id, node=node, timeout=120)
        assert code == 0, events[-3:]
        lines = [e["message"] for e in events if e["kind"] == "log"]
        attempts = dict(
            line.split("attempt ", 1)[1].split(": ", 1) for line in lines if "attempt " in line
        )
        escaped = {k: v for k, v in attempts.items() if v.startswith(("SUCCEEDED", "skipped"))}
        assert escaped == {} and len(attempts) == 18, attempts
        assert attempts["memory"].startswith("blocked: MemoryError"), attempts
        assert attempts["control_socket"].startswith("blocked:"), attempts
        for s in (udp, tcp, peer):
            assert _nothing_arrived(s)
        assert not Path("/dev/shm", f"p2pfl-hostile-{secret[:8]}").exists()
        assert node.alive()
    finally:
        for s in (udp, tcp, peer):
            s.close()
        home_file.unlink(missing_ok=True)
