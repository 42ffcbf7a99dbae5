"""Real `p2pfl node` processes on 127.0.0.1 for end-to-end tests.

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

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

READY_RE = re.compile(r"^p2pfl node (\S+) listening on (.*)$", re.MULTILINE)
READY_TIMEOUT = 60.0  # starting a node imports libp2p; slow on a loaded 2-core machine
CLI_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
REPO = Path(__file__).resolve().parents[2]


def p2pfl_argv(*args: str) -> list[str]:
    """The `p2pfl` command line run by this interpreter (the test venv's p2pfl)."""
    return [sys.executable, "-m", "p2pfl.cli.main", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("P2PFL_DATA_DIR", None)  # every call names its --data-dir
    env.pop("P2PFL_DEBUG", None)  # the CLI's one-line errors are part of what we test
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a node restarting, a half-written state: retry
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc})" if last_exc is not None else ""
            raise TimeoutError(f"{what} not reached within {timeout:g} s{extra}")
        time.sleep(interval)


@dataclass
class NodeProc:
    """One running (or stopped) `p2pfl node` process."""

    name: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_dir: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    # Its descendants seen so far: sandbox workers run in their own sessions, so the
    # node's process group does not reach them; these are killed by pid at teardown.
    descendants: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.pid}.out"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.pid}.err"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def bootstrap_addr(self) -> str:
        """An address other nodes can --bootstrap to (with /p2p/PEER_ID)."""
        addr = self.addrs[0]
        return addr if "/p2p/" in addr else f"{addr}/p2p/{self.peer_id}"

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "control.sock"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            match = READY_RE.search(self.stdout())
            if match:
                self.peer_id = match.group(1)
                self.addrs = match.group(2).split()
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"node {self.name} exited with {self.proc.returncode} before it was ready:\n"
                    + self.stderr()[-4000:]
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"node {self.name} not ready within {timeout:g} s:\n" + self.stderr()[-4000:]
                )
            time.sleep(0.1)

    def snapshot_descendants(self) -> None:
        """Remember the node's current descendants (call while it is alive)."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                self.descendants.setdefault(child.pid, child)

    def live_descendants(self) -> list[int]:
        """Pids of remembered descendants still running (zombies do not count)."""
        out = []
        for pid, p in self.descendants.items():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
        return out

    def kill(self) -> None:
        """SIGKILL the node process only, as a crash would (its children are left to notice)."""
        self.snapshot_descendants()
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait for the exit; its exit code (SIGKILLs the group past `timeout`)."""
        self.snapshot_descendants()
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise

    def kill_group(self) -> None:
        """SIGKILL the node's process group and every descendant it was seen with."""
        self.snapshot_descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for p in self.descendants.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)

    def assert_clean_exit(self, code: int) -> None:
        err = self.stderr()
        assert code == 0, f"node {self.name} exited with {code}:\n{err[-4000:]}"
        assert "Traceback" not in err, f"node {self.name} printed a traceback:\n{err[-6000:]}"


class Cluster:
    """Nodes under `root`: data dirs root/<name>, logs root/logs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.nodes: list[NodeProc] = []  # every process ever started (restarts included)

    # -- nodes ---------------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        *,
        bootstrap: Iterable[str] = (),
        datasets: dict[str, Path] | None = None,
        trust: Iterable[str] = (),
        trust_any: bool = False,
        extra: Iterable[str] = (),
        data_dir: Path | None = None,
    ) -> NodeProc:
        """Start `p2pfl node` (not waiting for it); data dir root/<name> unless given."""
        data_dir = Path(data_dir) if data_dir is not None else self.root / name
        argv = p2pfl_argv("node", "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0")
        for addr in bootstrap:
            argv += ["--bootstrap", addr]
        for ds_name, path in (datasets or {}).items():
            argv += ["--dataset", f"{ds_name}={path}"]
        for peer in trust:
            argv += ["--trust", peer]
        if trust_any:
            argv.append("--trust-any")
        argv += list(extra)
        # Open the log files first, named after the pid once known: rename after spawn.
        out_tmp = self.log_dir / f"{name}.starting.out"
        err_tmp = self.log_dir / f"{name}.starting.err"
        with open(out_tmp, "wb") as out, open(err_tmp, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.root,
                env=_env(),
                start_new_session=True,  # its own process group: killpg reaches its children
            )
        node = NodeProc(name, data_dir, proc, self.log_dir)
        self.nodes.append(node)
        os.replace(out_tmp, node.stdout_path)
        os.replace(err_tmp, node.stderr_path)
        return node

    def start_node(self, name: str, **kwargs: Any) -> NodeProc:
        node = self.spawn(name, **kwargs)
        node.wait_ready()
        return node

    def start(
        self,
        n: int,
        *,
        datasets: Callable[[int], dict[str, Path]] | None = None,
        trust: Callable[[int, str], Iterable[str]] | None = None,
        trust_any: bool = False,
        connect_timeout: float = 60.0,
    ) -> list[NodeProc]:
        """n0 alone, then n1..n{n-1} bootstrapping to n0; waits until each sees all others.

        `trust(i, first_peer_id)` gives node i's --trust list (node 0 usually trusts itself
        implicitly as the publisher).
        """
        first = self.start_node(
            "n0",
            datasets=datasets(0) if datasets else None,
            trust=trust(0, "") if trust else (),
            trust_any=trust_any,
        )
        others = [
            self.spawn(
                f"n{i}",
                bootstrap=[first.bootstrap_addr],
                datasets=datasets(i) if datasets else None,
                trust=trust(i, first.peer_id) if trust else (),
                trust_any=trust_any,
            )
            for i in range(1, n)
        ]
        for node in others:
            node.wait_ready()
        nodes = [first, *others]
        self.wait_connected(nodes, timeout=connect_timeout)
        return nodes

    def restart(self, node: NodeProc, **kwargs: Any) -> NodeProc:
        """Start a node again on the same data dir (the old process must have exited)."""
        assert not node.alive(), "restart needs the old process gone"
        return self.start_node(node.name, data_dir=node.data_dir, **kwargs)

    def wait_connected(self, nodes: list[NodeProc], timeout: float = 60.0) -> None:
        """Until every node lists every other one in `p2pfl peers --json`."""
        for node in nodes:
            want = {n.peer_id for n in nodes if n is not node}
            wait_until(
                lambda node=node, want=want: want <= self.peer_ids(node),
                timeout,
                what=f"{node.name} connected to {len(want)} peers",
            )

    def peer_ids(self, node: NodeProc) -> set[str]:
        return {p["peer_id"] for p in self.cli_json("peers", node=node)["peers"]}

    def close(self) -> None:
        """Stop everything: SIGTERM each live group, then SIGKILL whatever remains."""
        for node in self.nodes:
            node.snapshot_descendants()
            if node.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in self.nodes:
            # The group may outlive its leader (sandbox children): kill it either way.
            node.kill_group()

    def leaked(self) -> dict[str, list[int]]:
        """Processes this cluster started (nodes, their workers) that are still running."""
        out = {}
        for n in self.nodes:
            pids = n.live_descendants() + ([n.pid] if n.alive() else [])
            if pids:
                out[f"{n.name}:{n.pid}"] = pids
        return out

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
            env=_env(),
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

    def diagnostics(self) -> str:
        """The tail of every node's stderr, for assertion messages."""
        parts = []
        for n in self.nodes:
            parts.append(f"--- {n.name} pid {n.pid} rc {n.proc.poll()} ---\n{n.stderr()[-3000:]}")
        return "\n".join(parts)


def split_digits(out: Path, nodes: int = 3) -> Path:
    """`p2pfl datasets split digits --nodes N --out OUT` (once per OUT); returns OUT."""
    if not (out / "test.csv").exists():
        subprocess.run(
            p2pfl_argv("datasets", "split", "digits", "--nodes", str(nodes), "--out", str(out)),
            check=True,
            capture_output=True,
            timeout=CLI_TIMEOUT,
            env=_env(),
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
