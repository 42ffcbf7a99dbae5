"""`p2pfl node` processes: a port in use is one clear error line and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from p2pfl.localnet import LocalNet, node_env, p2pfl_argv

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_second_node_on_a_port_in_use_exits_with_one_line(tmp_path: Path) -> None:
    port = _free_port()
    addr = f"/ip4/127.0.0.1/tcp/{port}"
    with LocalNet(tmp_path) as net:
        first = net.spawn("a", extra=["--listen", addr])
        first.wait_ready()
        assert f"{addr}/p2p/{first.peer_id}" in first.stdout()
        second = subprocess.run(
            p2pfl_argv("node", "--data-dir", str(tmp_path / "b"), "--listen", addr),
            capture_output=True,
            text=True,
            timeout=120,
            env=node_env(),
            stdin=subprocess.DEVNULL,
        )
        assert first.alive()
    assert second.returncode != 0
    assert "listening on" not in second.stdout
    assert "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot listen on {addr}: port {port} is already in use"
        " (another node? pick a free port, or tcp/0 for any)"
    ]
