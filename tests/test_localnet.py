"""p2pfl.localnet without libp2p: wait_until, the ready line, exits and teardown, driven by
tiny stand-in processes (real `p2pfl node` runs are covered by tests/e2e)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.localnet import LocalNode, NodeExited, wait_until


def _fake_node(tmp_path: Path, code: str, name: str = "n0") -> LocalNode:
    """A python process standing in for `p2pfl node`, logging like LocalNet.spawn does."""
    out_path, err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    return LocalNode(name, tmp_path / name, proc, out_path, err_path)


def test_wait_until_returns_value_and_retries_errors() -> None:
    calls = []

    def pred() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("not yet")
        return 42

    assert wait_until(pred, 5.0, interval=0.0) == 42
    assert len(calls) == 3


def test_wait_until_timeout_names_what_and_last_error() -> None:
    def pred() -> bool:
        raise ValueError("still starting")

    with pytest.raises(TimeoutError, match="the thing not reached.*still starting"):
        wait_until(pred, 0.0, what="the thing", interval=0.0)


def test_wait_until_does_not_retry_node_exited() -> None:
    calls = []

    def pred() -> bool:
        calls.append(1)
        raise NodeExited("gone")

    with pytest.raises(NodeExited):
        wait_until(pred, 5.0, interval=0.0)
    assert len(calls) == 1


def test_ready_line_parsed_then_stop_returns_exit_code(tmp_path: Path) -> None:
    node = _fake_node(
        tmp_path,
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n"
        "print('p2pfl node 12D3KooWabc listening on /ip4/127.0.0.1/tcp/4001 /ip4/x')\n"
        "time.sleep(60)\n",
    )
    try:
        node.wait_ready(timeout=30.0)
        assert node.peer_id == "12D3KooWabc"
        assert node.addrs == ["/ip4/127.0.0.1/tcp/4001", "/ip4/x"]
        assert node.bootstrap_addr == "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc"
        assert node.alive()
        assert node.stop(timeout=30.0) == 3
        assert node.leaked() == []
    finally:
        node.kill_group()


def test_exit_before_ready_raises_with_stderr_tail(tmp_path: Path) -> None:
    node = _fake_node(tmp_path, "import sys; sys.stderr.write('error: port taken\\n'); sys.exit(2)")
    try:
        with pytest.raises(NodeExited, match="(?s)exited with 2.*port taken"):
            node.wait_ready(timeout=30.0)
    finally:
        node.kill_group()


def test_kill_group_reaches_descendants_in_other_sessions(tmp_path: Path) -> None:
    # The child starts a session of its own, as sandbox workers do: killpg cannot reach it.
    node = _fake_node(
        tmp_path,
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "print('p2pfl node P listening on /ip4/127.0.0.1/tcp/1')\n"
        "time.sleep(60)\n",
    )
    try:
        node.wait_ready(timeout=30.0)
        wait_until(lambda: (node.snapshot_descendants(), node.descendants)[1], 30.0, interval=0.05)
        assert node.live_descendants()
        node.kill_group()
        wait_until(lambda: not node.leaked(), 10.0, what="all gone", interval=0.05)
    finally:
        node.kill_group()
