"""A local network of real `p2pfl node` processes on 127.0.0.1 (for tests and benchmarks).

Why processes and not in-process nodes: end-to-end tests and benchmarks must see what a user
sees -- the CLI's start-up, its ready line, its exit codes, a SIGKILLed node -- and each node
gets its own interpreter (its own GIL), as on a real network.

Every node runs in its own session (process group), so one can be SIGKILLed as a crash
would be, and teardown can reach the helpers it spawned. Sandbox workers start sessions of
their own, out of the group's reach, so each node also remembers the descendants it has
been seen with and teardown kills those by pid. `LocalNet.close()` (also run on leaving a
`with LocalNet(...)` block, on an exception, Ctrl-C or SIGTERM) SIGTERMs every group it
started, waits a bounded grace period, then SIGKILLs whatever is left: nothing keeps
running. Every wait here has a deadline.

Usage::

    from p2pfl.localnet import LocalNet, wait_until

    with LocalNet(tmp_dir) as net:
        n0, n1, n2 = net.start(3, trust=lambda i, first: [first] if i else [])
        n1.kill()                        # SIGKILL the node process, like a crash
        code = n2.stop()                 # SIGTERM, wait, its exit code
        assert not net.leaked() or ...   # after close(): nothing left running
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from p2pfl.client import Client
from p2pfl.config import CONTROL_SOCKET

# The line `p2pfl node` prints on stdout once it listens: "p2pfl node <peer_id> listening on
# <addr> <addr> ...". It is the only readiness signal a parent process gets.
READY_RE = re.compile(r"^p2pfl node (\S+) listening on (.*)$", re.MULTILINE)
# Starting a node imports libp2p: slow on a loaded 2-core machine with many nodes at once.
READY_TIMEOUT = 90.0
# How long stop() waits for a SIGTERMed node to exit before it kills everything.
STOP_TIMEOUT = 20.0
# Teardown grace between SIGTERM and SIGKILL; a clean exit no longer matters then.
CLOSE_GRACE = 10.0
LISTEN_ADDR = "/ip4/127.0.0.1/tcp/0"  # loopback only, a free port each


class NodeExited(RuntimeError):
    """A node process exited before it was ready; waiting longer would not help."""


def p2pfl_argv(*args: str) -> list[str]:
    """The `p2pfl ARGS` command line run by this interpreter (so its venv's p2pfl)."""
    return [sys.executable, "-m", "p2pfl.cli.main", *args]


def node_env() -> dict[str, str]:
    """The environment for node and CLI processes: ours, minus what would change them."""
    env = dict(os.environ)
    env.pop("P2PFL_DATA_DIR", None)  # every call names its --data-dir
    env.pop("P2PFL_DEBUG", None)  # keep the CLI's one-line errors (callers check them)
    env["PYTHONUNBUFFERED"] = "1"  # the ready line must reach the log file at once
    return env


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str = "condition",
    interval: float = 0.25,
) -> Any:
    """Poll `predicate` until it returns something truthy (returned); TimeoutError past
    `timeout`, naming `what` and the predicate's last error.

    Exceptions from the predicate are retried (a node still starting or restarting, a
    half-written state), except `NodeExited`: a dead node does not come back by waiting.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except NodeExited:
            raise
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last})" if last is not None else ""
            raise TimeoutError(f"{what} not reached within {timeout:g} s{extra}")
        time.sleep(interval)


@dataclass
class LocalNode:
    """One `p2pfl node` process (running or stopped); stdout/stderr go to files."""

    name: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    peer_id: str = ""  # from the ready line
    addrs: list[str] = field(default_factory=list)
    # Descendants seen so far, kept as psutil handles: sandbox workers run in sessions of
    # their own, so killpg misses them, and their pids must be killable after the node died.
    descendants: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        with contextlib.suppress(OSError):
            return self.stdout_path.read_text(errors="replace")
        return ""

    def stderr(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")
        return ""

    def stderr_tail(self, n: int = 4000) -> str:
        return self.stderr()[-n:]

    @property
    def bootstrap_addr(self) -> str:
        """An address other nodes can --bootstrap to (with /p2p/PEER_ID); needs ready."""
        addr = self.addrs[0]
        return addr if "/p2p/" in addr else f"{addr}/p2p/{self.peer_id}"

    @property
    def socket_path(self) -> Path:
        """The node's control socket (what `p2pfl.Client(data_dir)` talks to)."""
        return self.data_dir / CONTROL_SOCKET

    def alive(self) -> bool:
        return self.proc.poll() is None

    def try_ready(self) -> bool:
        """True once the ready line is out (peer_id and addrs parsed); NodeExited if the
        process ended first."""
        if self.peer_id:
            return True
        match = READY_RE.search(self.stdout())
        if match:
            self.peer_id, self.addrs = match.group(1), match.group(2).split()
            return True
        if self.proc.poll() is not None:
            raise NodeExited(
                f"node {self.name} exited with {self.proc.returncode} before it was ready:\n"
                + self.stderr_tail()
            )
        return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the ready line; NodeExited or TimeoutError carry the node's stderr tail."""
        try:
            wait_until(self.try_ready, timeout, what=f"node {self.name} ready", interval=0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}:\n{self.stderr_tail()}") from None

    def snapshot_descendants(self) -> None:
        """Remember the node's current descendants (only possible while it is alive)."""
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

    def terminate(self, *, group: bool = False) -> None:
        """SIGTERM the node (asks for a clean exit). `group=True` also reaches the helpers
        in its process group -- for teardown, where a clean exit no longer matters."""
        self.snapshot_descendants()
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:
                    os.killpg(self.pid, signal.SIGTERM)
                else:
                    os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the node process only, as a crash would (its children are left to
        notice on their own); reaps it."""
        self.snapshot_descendants()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait for the exit, return its exit code. Past `timeout` kills the group
        and descendants, then raises subprocess.TimeoutExpired (a hang is a bug to report)."""
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise

    def kill_group(self) -> None:
        """SIGKILL the node's process group and every descendant it was seen with; reap."""
        self.snapshot_descendants()
        # The group may outlive its leader (helpers), so it is killed even if the node is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for p in self.descendants.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)

    def leaked(self) -> list[int]:
        """Pids of this node and its remembered descendants still running."""
        return ([self.pid] if self.alive() else []) + self.live_descendants()


class LocalNet:
    """Nodes under `root`: data dirs root/<name>, logs root/logs/<name>.<pid>.{out,err}.

    `node_args` go on every node's command line (e.g. ["--log-level", "warning"]);
    `node_class` lets a caller attach helpers to its nodes (a LocalNode subclass).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        node_args: Sequence[str] = (),
        node_class: type[LocalNode] = LocalNode,
    ) -> None:
        self.root = Path(root)
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # A local network is a development network: any requester may use the datasets
        # its nodes do not name in a policy.yaml (a test that wants a site policy writes one).
        self.node_args = ["--allow-any-requester", *node_args]
        self.node_class = node_class
        self.nodes: list[LocalNode] = []  # every process ever started (restarts included)
        self._old_sigterm: Any = None

    # -- lifetime ------------------------------------------------------------------------

    def __enter__(self) -> LocalNet:
        # A SIGTERM to this process must still run __exit__ (and so close()): make it an
        # exception. Only the main thread may set signal handlers.
        if threading.current_thread() is threading.main_thread():

            def on_term(signum: int, frame: FrameType | None) -> None:
                raise KeyboardInterrupt(f"signal {signum}")

            self._old_sigterm = signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def stop(self, nodes: Iterable[LocalNode], grace: float = CLOSE_GRACE) -> None:
        """SIGTERM each node's group, wait at most `grace` in all, then SIGKILL the groups
        and every descendant seen (whatever exit code the nodes had)."""
        nodes = list(nodes)
        for node in nodes:
            node.terminate(group=True)
        deadline = time.monotonic() + grace
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in nodes:
            node.kill_group()

    def close(self) -> None:
        """Stop everything this net started; afterwards leaked() should be empty."""
        self.stop(self.nodes)

    def leaked(self) -> dict[str, list[int]]:
        """{"name:pid": pids} of processes this net started (nodes, their workers) still
        running; empty when nothing leaked."""
        out = {}
        for node in self.nodes:
            pids = node.leaked()
            if pids:
                out[f"{node.name}:{node.pid}"] = pids
        return out

    # -- starting nodes ------------------------------------------------------------------

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
        listen: Sequence[str] = (LISTEN_ADDR,),
        prefix: Sequence[str] = (),
    ) -> LocalNode:
        """Start `p2pfl node` without waiting for it; data dir root/<name> unless given.

        `prefix` goes before the command (e.g. `ip netns exec NS` to run the node as if
        on another host)."""
        data_dir = Path(data_dir) if data_dir is not None else self.root / name
        argv = [*prefix, *p2pfl_argv("node", "--data-dir", str(data_dir))]
        for addr in listen:
            argv += ["--listen", addr]
        argv += self.node_args
        for addr in bootstrap:
            argv += ["--bootstrap", addr]
        for ds_name, path in (datasets or {}).items():
            argv += ["--dataset", f"{ds_name}={path}"]
        for peer in trust:
            argv += ["--trust", peer]
        if trust_any:
            argv.append("--trust-any")
        argv += list(extra)
        # The logs are named after the pid (a restarted node keeps its old logs), which is
        # only known after the spawn: open temporary names, rename them afterwards.
        out_tmp = self.log_dir / f"{name}.starting.out"
        err_tmp = self.log_dir / f"{name}.starting.err"
        with open(out_tmp, "wb") as out, open(err_tmp, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.root,
                env=node_env(),
                start_new_session=True,  # its own process group: killpg reaches its helpers
            )
        out_path = self.log_dir / f"{name}.{proc.pid}.out"
        err_path = self.log_dir / f"{name}.{proc.pid}.err"
        os.replace(out_tmp, out_path)
        os.replace(err_tmp, err_path)
        node = self.node_class(name, data_dir, proc, out_path, err_path)
        self.nodes.append(node)
        return node

    def wait_ready(self, nodes: Iterable[LocalNode], timeout: float = READY_TIMEOUT) -> None:
        """Until every node printed its ready line (all polled together, one deadline)."""
        nodes = list(nodes)
        try:
            wait_until(
                lambda: all([n.try_ready() for n in nodes]),
                timeout,
                what=f"{len(nodes)} nodes ready",
                interval=0.1,
            )
        except TimeoutError as exc:
            late = [n for n in nodes if not n.peer_id]
            tails = "\n".join(f"--- {n.name} ---\n{n.stderr_tail(2000)}" for n in late)
            raise TimeoutError(f"{exc}; not ready: {[n.name for n in late]}\n{tails}") from None

    def start_node(self, name: str, **kwargs: Any) -> LocalNode:
        """spawn() + wait_ready()."""
        node = self.spawn(name, **kwargs)
        node.wait_ready()
        return node

    def start(
        self,
        n: int | Sequence[str],
        *,
        datasets: Callable[[int], dict[str, Path]] | None = None,
        trust: Callable[[int, str], Iterable[str]] | None = None,
        trust_any: bool = False,
        connect: bool = True,
        ready_timeout: float = READY_TIMEOUT,
        connect_timeout: float = 60.0,
    ) -> list[LocalNode]:
        """Nodes named n0..n{n-1} (or the names given): the first alone, then the others
        bootstrapping to it; with `connect`, waits until each node sees all others.

        `datasets(i)` gives node i's --dataset inputs; `trust(i, first_peer_id)` its --trust
        list (called with "" for the first node, whose peer id is not known yet).
        """
        names = [f"n{i}" for i in range(n)] if isinstance(n, int) else list(n)
        if not names:
            return []

        def options(i: int, first_peer_id: str) -> dict[str, Any]:
            return {
                "datasets": datasets(i) if datasets else None,
                "trust": trust(i, first_peer_id) if trust else (),
                "trust_any": trust_any,
            }

        first = self.spawn(names[0], **options(0, ""))
        first.wait_ready(ready_timeout)
        others = [
            self.spawn(name, bootstrap=[first.bootstrap_addr], **options(i, first.peer_id))
            for i, name in enumerate(names[1:], start=1)
        ]
        self.wait_ready(others, timeout=ready_timeout)
        nodes = [first, *others]
        if connect:
            self.wait_connected(nodes, timeout=connect_timeout)
        return nodes

    def restart(self, node: LocalNode, **kwargs: Any) -> LocalNode:
        """Start a node again on the same data dir (the old process must have exited)."""
        if node.alive():
            raise RuntimeError(f"restart of {node.name} needs the old process gone")
        return self.start_node(node.name, data_dir=node.data_dir, **kwargs)

    # -- the overlay ---------------------------------------------------------------------

    @staticmethod
    def peer_ids(node: LocalNode) -> set[str]:
        """The peer ids `node` lists as its peers (over its control socket)."""
        return {p["peer_id"] for p in Client(node.data_dir, timeout=30.0).peers()}

    def wait_connected(self, nodes: Sequence[LocalNode], timeout: float = 60.0) -> None:
        """Until every node lists every other one as a peer."""
        for node in nodes:
            want = {n.peer_id for n in nodes if n is not node}
            wait_until(
                functools.partial(self._sees, node, want),
                timeout,
                what=f"{node.name} connected to {len(want)} peers",
            )

    def _sees(self, node: LocalNode, want: set[str]) -> bool:
        return want <= self.peer_ids(node)

    def diagnostics(self) -> str:
        """The tail of every node's stderr, for error messages."""
        return "\n".join(
            f"--- {n.name} pid {n.pid} rc {n.proc.poll()} ---\n{n.stderr_tail(3000)}"
            for n in self.nodes
        )
