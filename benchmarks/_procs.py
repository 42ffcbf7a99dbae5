"""Real `p2pfl node` processes for benchmarks (a lean cousin of tests/e2e/cluster.py).

Each node runs in its own session (process group). `Procs` is a context manager whose exit
-- normal, exception, Ctrl-C or SIGTERM of the benchmark -- SIGTERMs every group it started,
then SIGKILLs the groups and every descendant seen (sandbox workers live in sessions of
their own, out of the group's reach). Every wait here has a deadline.

    with Procs(tmp) as procs:
        n0 = procs.start("n0")
        n1 = procs.start("n1", bootstrap=[n0.bootstrap_addr], trust=[n0.peer_id])
        procs.wait_peers([n0, n1], want=1, timeout=60)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

READY_RE = re.compile(r"^p2pfl node (\S+) listening on (.*)$", re.MULTILINE)
READY_TIMEOUT = 90.0  # importing libp2p on a loaded 2-core machine, many nodes at once
STOP_TIMEOUT = 10.0


def p2pfl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pfl.cli.main", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("P2PFL_DATA_DIR", None)  # every node names its --data-dir
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Node:
    """One `p2pfl node` process; stdout/stderr go to files next to its data dir."""

    name: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    descendants: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def bootstrap_addr(self) -> str:
        addr = self.addrs[0]
        return addr if "/p2p/" in addr else f"{addr}/p2p/{self.peer_id}"

    def stderr_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.err_path.read_text(errors="replace")[-n:]
        return ""

    def try_ready(self) -> bool:
        """True once the ready line is out (peer id and addrs parsed); raises if it died."""
        with contextlib.suppress(OSError):
            match = READY_RE.search(self.out_path.read_text(errors="replace"))
            if match:
                self.peer_id, self.addrs = match.group(1), match.group(2).split()
                return True
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"node {self.name} exited with {self.proc.returncode} before it was ready:\n"
                + self.stderr_tail()
            )
        return False

    def snapshot_descendants(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                self.descendants.setdefault(child.pid, child)

    def terminate(self) -> None:
        self.snapshot_descendants()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the group and every descendant seen; reap the leader."""
        self.snapshot_descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for p in self.descendants.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll until `predicate` returns something truthy (returned); TimeoutError past `timeout`.
    Exceptions from the predicate (a node still starting) are retried, except RuntimeError
    (a node died)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except RuntimeError:
            raise
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last})" if last is not None else ""
            raise TimeoutError(f"{what} not reached within {timeout:g} s{extra}")
        time.sleep(interval)


class Procs:
    """Starts nodes under `root` (data dirs root/<name>); kills them all on exit."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes: list[Node] = []
        self._old_handlers: dict[int, Any] = {}

    def __enter__(self) -> Procs:
        # A SIGTERM to the benchmark must still run __exit__: turn it into an exception.
        def on_term(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)

    def spawn(self, name: str, *, bootstrap: Iterable[str] = (), trust: Iterable[str] = ()) -> Node:
        """Start a node without waiting for it."""
        data_dir = self.root / name
        argv = p2pfl_argv("node", "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0")
        argv += ["--log-level", "warning"]
        for addr in bootstrap:
            argv += ["--bootstrap", addr]
        for peer in trust:
            argv += ["--trust", peer]
        out_path, err_path = self.root / f"{name}.out", self.root / f"{name}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.root,
                env=_env(),
                start_new_session=True,  # its own group: killpg reaches its children
            )
        node = Node(name, data_dir, proc, out_path, err_path)
        self.nodes.append(node)
        return node

    def wait_ready(self, nodes: list[Node], timeout: float = READY_TIMEOUT) -> None:
        wait_until(
            lambda: all(n.peer_id or n.try_ready() for n in nodes),
            timeout,
            what=f"{len(nodes)} nodes ready",
        )

    def start(self, name: str, **kwargs: Any) -> Node:
        node = self.spawn(name, **kwargs)
        self.wait_ready([node])
        return node

    def stop(self, nodes: list[Node]) -> None:
        """SIGTERM, a bounded wait, then SIGKILL for what is left."""
        for n in nodes:
            n.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for n in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for n in nodes:
            n.kill()

    def close(self) -> None:
        self.stop(self.nodes)

    def leaked(self) -> list[int]:
        """Pids this object started (nodes, their workers) still running."""
        out = []
        for n in self.nodes:
            if n.proc.poll() is None:
                out.append(n.pid)
            for pid, p in n.descendants.items():
                with contextlib.suppress(psutil.Error):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        out.append(pid)
        return out
