"""Real `p2pfl node` processes on 127.0.0.1 for end-to-end tests.

A thin layer over `p2pfl.localnet` (which spawns, waits for and reaps the processes): adds
the CLI helpers (`Cluster.cli*`), the tests' exit check and the dataset/trust helpers.
Every node runs in its own session (process group), so a test can SIGKILL one node as a
crash would, and teardown can kill a node together with the sandboxed children it spawned.
`Cluster.close()` (called by the `cluster` fixture even when a test fails) terminates every
group it started, then kills what is left: no test leaks processes.

Usage::

    cluster = Cluster(tmp_path)
    n0, n1, n2 = cluster.start(3, datasets=lambda i: {"digits": split / f"node-{i}/digits.csv"})
    peers = cluster.cli_json("peers", node=n0)
    n1.kill()                       # SIGKILL, like a crash
    code = n2.stop()                # SIGTERM, waits for exit, returns the exit code
    cluster.close()
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfl.localnet import LocalNet, LocalNode, node_env, p2pfl_argv, wait_until

__all__ = [
    "CLI_TIMEOUT",
    "REPO",
    "Cluster",
    "NodeProc",
    "p2pfl_argv",
    "shard_datasets",
    "split_digits",
    "trust_first",
    "wait_until",
]

CLI_TIMEOUT = 120.0
REPO = Path(__file__).resolve().parents[2]


class NodeProc(LocalNode):
    """A LocalNode with the tests' exit check."""

    def assert_clean_exit(self, code: int) -> None:
        err = self.stderr()
        assert code == 0, f"node {self.name} exited with {code}:\n{err[-4000:]}"
        assert "Traceback" not in err, f"node {self.name} printed a traceback:\n{err[-6000:]}"


class Cluster(LocalNet):
    """A LocalNet of NodeProcs (data dirs root/<name>, logs root/logs) plus the CLI."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, node_class=NodeProc)

    # -- the CLI -------------------------------------------------------------------------------

    def cli(
        self,
        *args: str,
        node: NodeProc | None = None,
        timeout: float = CLI_TIMEOUT,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run `p2pfl ARGS [--data-dir node.data_dir]`; stdout/stderr captured as text."""
        argv = p2pfl_argv(*args)
        if node is not None:
            argv += ["--data-dir", str(node.data_dir)]
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env=node_env(),
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"p2pfl {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout[-2000:]}"
                f"\nstderr: {proc.stderr[-2000:]}"
            )
        return proc

    def cli_json(
        self, *args: str, node: NodeProc | None = None, timeout: float = CLI_TIMEOUT
    ) -> Any:
        """`p2pfl ARGS --json`, which must exit 0; its stdout parsed."""
        proc = self.cli(*args, "--json", node=node, timeout=timeout, check=True)
        return json.loads(proc.stdout)

    def try_json(self, *args: str, node: NodeProc | None = None) -> Any:
        """`p2pfl ARGS --json` parsed, or None when it exits non-zero (e.g. not finished)."""
        proc = self.cli(*args, "--json", node=node)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def cli_json_lines(
        self, *args: str, node: NodeProc | None = None, timeout: float = CLI_TIMEOUT
    ) -> tuple[int, list[dict[str, Any]]]:
        """(exit code, one JSON object per stdout line) of `p2pfl ARGS --json`."""
        proc = self.cli(*args, "--json", node=node, timeout=timeout)
        return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line]


def split_digits(out: Path, nodes: int = 3) -> Path:
    """`p2pfl datasets split digits --nodes N --out OUT` (once per OUT); returns OUT."""
    if not (out / "test.csv").exists():
        subprocess.run(
            p2pfl_argv("datasets", "split", "digits", "--nodes", str(nodes), "--out", str(out)),
            check=True,
            capture_output=True,
            timeout=CLI_TIMEOUT,
            env=node_env(),
        )
    return out


def shard_datasets(split: Path) -> Callable[[int], dict[str, Path]]:
    """datasets(i) for Cluster.start: node i's digits shard, as input `digits` (for
    fedavg-mlp-digits) and as input `table` (for federated-stats)."""

    def datasets(i: int) -> dict[str, Path]:
        shard = split / f"node-{i}" / "digits.csv"
        return {"digits": shard, "table": shard}

    return datasets


def trust_first(i: int, first_peer_id: str) -> list[str]:
    """trust(i, first) for Cluster.start: every node but the first trusts the first."""
    return [first_peer_id] if i > 0 else []
