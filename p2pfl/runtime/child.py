"""ChildProcessRunner: task code in one worker process per (task_id, node), for real nodes.

The worker (`python -m p2pfl.runtime.worker`) is persistent: it imports the task once
(torch takes seconds), preprocesses once, then serves many jobs. It runs under bubblewrap
(p2pfl.runtime.bwrap: it sees only the runtime, its code, its inputs and its scratch dir;
no network, no other process), in its own pids cgroup where the node may make one, with
cwd/HOME/TMPDIR = its private scratch dir (wiped when it ends), resource limits from the
node's ResourcePolicy and Landlock as a second layer (p2pfl.runtime.sandbox). Without a
usable bwrap the runner refuses to start workers (KIND_SANDBOX) unless it was built with
unsafe_no_sandbox=True. Whatever happens to it, the node
sees a JobError: a crash or timeout is a failed contribution, never a dead node. After a
failure that ended the worker, the next job for that task starts a fresh worker (which
preprocesses again; ctx.state survives through the state file).

stderr of the worker is drained while a job runs, logged to the "p2pfl.runtime.worker"
logger, and its tail is attached to the JobError of a worker that died.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

import p2pfl
from p2pfl.runtime import bwrap, protocol
from p2pfl.runtime.cgroup import PidsCgroup, pids_root
from p2pfl.runtime.jobs import (
    KIND_CLOSED,
    KIND_CPU,
    KIND_CRASHED,
    KIND_ERROR,
    KIND_PROTOCOL,
    KIND_SANDBOX,
    KIND_TIMEOUT,
    Job,
    JobError,
    JobOutput,
    Limits,
    TaskSpec,
)
from p2pfl.runtime.loader import describe, load_state, save_state
from p2pfl.runtime.policy import ResourcePolicy
from p2pfl.runtime.sandbox import landlock_abi

log = logging.getLogger("p2pfl.runtime")
worker_log = logging.getLogger("p2pfl.runtime.worker")

STDERR_TAIL_LINES = 40
READ_CHUNK = 1 << 20

Key = tuple[str, str]
# bwrap starts under a small shell that stays its parent. Why: --die-with-parent is
# PR_SET_PDEATHSIG, which fires when the *thread* that forked bwrap ends, and trio forks
# from a cached worker thread that ends when idle: bwrap would be SIGKILLed mid-job. The
# shell first moves itself into the worker's pids cgroup ($0, if any), so bwrap and all the
# task ever forks are born inside it (moving bwrap after its start would race its forks).
# `; exit $?` keeps sh from exec'ing bwrap in its place.
SHELL_WRAP = 'if [ -n "$0" ]; then echo $$ > "$0" || exit 125; fi; "$@"; exit $?'
SIGNAL_EXIT_BASE = 128  # bwrap exits 128 + N when the worker died of signal N
EXIT_GRACE_S = 2.0  # for a worker that closed its pipes to report its exit status


class _Worker:
    def __init__(
        self,
        key: Key,
        process: trio.Process,
        workdir: Path,
        limits: Limits,
        confined: bool,
        cgroup: PidsCgroup | None,
    ) -> None:
        assert process.stdin and process.stdout and process.stderr  # opened with PIPE
        self.key = key
        self.process = process
        self.stdin: trio.abc.SendStream = process.stdin
        self.stdout: trio.abc.ReceiveStream = process.stdout
        self.stderr: trio.abc.ReceiveStream = process.stderr
        self.workdir = workdir
        self.limits = limits  # effective: the spec's request under the node's policy
        self.confined = confined  # under bwrap: exit codes > 128 are signals
        self.cgroup = cgroup
        self.buf = bytearray()  # stdout bytes not yet parsed into a frame
        self.err_partial = b""
        self.err_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.report: dict[str, Any] = {}
        self.closing = False
        self.discarded = False

    @property
    def label(self) -> str:
        task_id, node = self.key
        return f"[task {task_id[:12]} node {node[-8:]} pid {self.process.pid}]"


def exit_reason(returncode: int | None, confined: bool = False) -> tuple[str, str]:
    """(reason, kind) for a worker that ended with `returncode` (through bwrap if confined)."""
    if returncode is None:
        return "crashed (still running)", KIND_CRASHED
    if confined and SIGNAL_EXIT_BASE < returncode <= SIGNAL_EXIT_BASE + 64:
        returncode = SIGNAL_EXIT_BASE - returncode  # bwrap's 137 is the worker's SIGKILL
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        if sig == signal.SIGXCPU:
            return f"cpu limit exceeded (signal {sig} {name})", KIND_CPU
        return f"crashed (signal {sig} {name})", KIND_CRASHED
    return f"crashed (exit code {returncode})", KIND_CRASHED


def _pack(msg: dict[str, Any], what: str) -> bytes:
    try:
        return protocol.pack(msg)
    except (TypeError, ValueError, OverflowError, protocol.ProtocolError) as e:
        raise JobError(f"cannot encode the {what} for the worker: {describe(e)}") from None


class ChildProcessRunner:
    """Async (trio) runner: one persistent, confined worker process per (task_id, node).

    `policy` bounds what manifests may ask for (and fills in what they do not name);
    `private_paths` (the node's data dir; $HOME always) are never visible to a worker, even
    when a runtime dir contains them. The sandbox is probed here, once: `sandbox` says what
    is used, `sandbox_error` why there is none (then every job fails with KIND_SANDBOX,
    unless `unsafe_no_sandbox`, which runs workers unconfined but for rlimits/Landlock).
    """

    def __init__(
        self,
        *,
        python: str | None = None,
        tmp_root: Path | None = None,
        close_grace_s: float = 2.0,
        policy: ResourcePolicy | None = None,
        unsafe_no_sandbox: bool = False,
        private_paths: Sequence[Path] = (),
    ) -> None:
        self._python = python or sys.executable
        self._tmp_root = tmp_root
        self._grace = close_grace_s
        self.policy = policy or ResourcePolicy()
        self.unsafe_no_sandbox = unsafe_no_sandbox
        self._private = [Path.home(), *private_paths]
        self._workers: dict[Key, _Worker] = {}
        self._locks: dict[Key, trio.Lock] = {}
        self.bwrap: bwrap.Bwrap | None = None
        self.sandbox_error: str | None = None
        self._pids_root: Path | None = None
        if not unsafe_no_sandbox:
            try:
                self.bwrap = bwrap.probe(self._python)
            except bwrap.SandboxUnavailable as e:
                self.sandbox_error = e.reason
                log.error("sandbox unavailable, taskpack code will NOT run: %s", e.reason)
            else:
                self._pids_root = pids_root()

    @property
    def sandbox(self) -> str:
        """One line for the operator: what confines taskpack code on this node."""
        abi = landlock_abi()
        second = (f"landlock ABI {abi} + " if abi else "") + "rlimits"
        if self.unsafe_no_sandbox:
            return f"NONE (--unsafe-no-sandbox): only {second}"
        if self.bwrap is None:
            return f"unavailable ({self.sandbox_error}): taskpack code is refused"
        if self._pids_root:
            pids = " + pids cgroup"
        elif os.geteuid() == 0:  # the kernel exempts host root from RLIMIT_NPROC
            pids = " (NO process limit: root without a writable pids cgroup)"
        else:
            pids = ""
        return f"{self.bwrap.describe()} + {second}{pids}"

    # --- public ----------------------------------------------------------------------

    async def run(self, spec: TaskSpec, job: Job) -> JobOutput:
        """Run `job` in the worker of (spec.task_id, spec.node); raises JobError only.

        The spec a worker was started with stays in force until close_task (or its death).
        """
        key = (spec.task_id, spec.node)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            frame = _pack({"op": "job", "job": protocol.encode_job(job)}, "job")
            worker = self._workers.get(key)
            if worker is None:
                worker = await self._start(spec)
            reply = await self._exchange(worker, frame, worker.limits.timeout_s)
            self._save_state(spec, reply.get("state"))
            logs = [str(line) for line in reply.get("logs") or []]
            if not reply.get("ok"):
                raise JobError(
                    str(reply.get("reason", "?")), str(reply.get("kind", KIND_ERROR)), logs
                )
            try:
                result = protocol.decode_result(job, reply.get("result"))
            except protocol.ProtocolError as e:
                await self._discard(worker)
                raise JobError(f"worker protocol error: {e}", KIND_PROTOCOL, logs) from None
            return JobOutput(result, logs)

    async def close_task(self, task_id: str, node: str) -> None:
        """End the task's worker (killing it if a job is running) and wipe its temp dir."""
        key = (task_id, node)
        worker = self._workers.get(key)
        if worker is None:
            return
        worker.closing = True
        lock = self._locks.setdefault(key, trio.Lock())
        if lock.locked():
            self._kill(worker)  # the running job sees EOF and reports KIND_CLOSED
        async with lock:
            if not worker.discarded:
                await self._end_gracefully(worker)
        if not lock.statistics().tasks_waiting:
            self._locks.pop(key, None)

    async def aclose(self) -> None:
        """End every worker."""
        async with trio.open_nursery() as nursery:
            for task_id, node in list(self._workers):
                nursery.start_soon(self.close_task, task_id, node)

    def workers(self) -> dict[Key, int]:
        """(task_id, node) -> pid of each live worker."""
        return {k: w.process.pid for k, w in self._workers.items()}

    def sandbox_report(self, task_id: str, node: str) -> dict[str, Any]:
        """What the worker of (task_id, node) enforced: rlimits and Landlock status."""
        worker = self._workers.get((task_id, node))
        return dict(worker.report) if worker else {}

    async def __aenter__(self) -> ChildProcessRunner:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    # --- worker lifecycle ------------------------------------------------------------

    def _env(self, workdir: Path) -> dict[str, str]:
        # An allow-list: nothing of the node's environment (tokens, proxies...) leaks in.
        pkg_root = str(Path(p2pfl.__file__).resolve().parent.parent)
        pythonpath = [pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
        confined = self.bwrap is not None
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin" if confined else os.environ.get("PATH", ""),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "PYTHONPATH": ":".join(dict.fromkeys(pythonpath)),
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONSAFEPATH": "1",
            "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }

    def _refuse_unconfined(self) -> None:
        if self.bwrap is not None:
            return
        if not self.unsafe_no_sandbox:
            raise JobError(
                f"sandbox unavailable: {self.sandbox_error}; this node refuses to run taskpack "
                "code unconfined (the operator may pass --unsafe-no-sandbox)",
                KIND_SANDBOX,
            )
        log.warning("!!! running taskpack code WITHOUT the bubblewrap sandbox !!!")

    async def _start(self, spec: TaskSpec) -> _Worker:
        self._refuse_unconfined()
        key = (spec.task_id, spec.node)
        limits = self.policy.effective(spec.limits)
        if self.bwrap is None or not self.bwrap.userns:
            # RLIMIT_NPROC outside a user namespace counts every process of the node's uid.
            limits = dataclasses.replace(limits, nproc=None)
        state = load_state(spec.state_path)
        workdir = Path(tempfile.mkdtemp(prefix="p2pfl-task-", dir=self._tmp_root))
        hello = {
            "op": "open",
            "spec": protocol.encode_spec(dataclasses.replace(spec, limits=limits)),
            "workdir": str(workdir),
            "state": state,
            "sandbox": True,  # Landlock
            # Private tmpfs under bwrap: writable without reaching anything of the node's.
            "writable": ["/tmp", "/dev/shm"] if self.bwrap else ["/dev/shm"],
        }
        try:
            frame = _pack(hello, "task spec")
        except JobError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        cgroup: PidsCgroup | None = None
        try:
            argv, env = self._command(spec, workdir)
            if self._pids_root is not None:
                cgroup = PidsCgroup(self._pids_root, self.policy.effective(spec.limits).nproc or 1)
            if self.bwrap is not None:
                procs = str(cgroup.procs) if cgroup else ""
                argv = ["/bin/sh", "-c", SHELL_WRAP, procs, *argv]
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=str(workdir),
                env=env,
                start_new_session=True,  # its own process group: killed as a whole
            )
        except OSError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            if cgroup is not None:
                cgroup.remove()
            raise JobError(f"cannot start worker: {describe(e)}", KIND_CRASHED) from None
        worker = _Worker(key, process, workdir, limits, self.bwrap is not None, cgroup)
        self._workers[key] = worker
        reply = await self._exchange(worker, frame, limits.timeout_s)
        if not reply.get("ok"):
            await self._discard(worker)
            raise JobError(
                str(reply.get("reason", "?")),
                str(reply.get("kind", KIND_ERROR)),
                [str(x) for x in reply.get("logs") or []],
            )
        worker.report = reply.get("report") or {}
        worker.report["bwrap"] = self.bwrap.describe() if self.bwrap else None
        worker.report["pids_cgroup"] = cgroup.max_pids if cgroup else None
        log.debug("%s started: %s", worker.label, worker.report)
        return worker

    def _command(self, spec: TaskSpec, workdir: Path) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) that start the worker, confined when a sandbox is set."""
        argv = [self._python, "-m", "p2pfl.runtime.worker"]
        env = self._env(workdir)
        if self.bwrap is None:
            return argv, env
        mounts = bwrap.Mounts(
            workdir=workdir,
            read_only=[Path(spec.taskpack_dir), *map(Path, spec.inputs.values())],
            hide=self._private,
        )
        tmpfs = self.policy.tmpfs_bytes
        # bwrap itself gets no environment: it passes the worker's through --setenv only.
        return bwrap.command(self.bwrap, self._python, mounts, env, argv, tmpfs_bytes=tmpfs), {}

    def _kill(self, worker: _Worker) -> None:
        if worker.process.returncode is None:
            try:
                os.killpg(worker.process.pid, signal.SIGKILL)  # the task's children too
            except (ProcessLookupError, PermissionError):
                worker.process.kill()

    async def _end_gracefully(self, worker: _Worker) -> None:
        # EOF on its stdin lets the worker leave its loop; it is killed if it lingers.
        with trio.CancelScope(shield=True):
            try:
                await worker.stdin.aclose()
            except trio.BrokenResourceError:
                pass
            with trio.move_on_after(self._grace):
                await worker.process.wait()
            await self._discard(worker)

    async def _discard(self, worker: _Worker) -> None:
        """Kill (if needed), reap, drain stderr, close pipes, wipe the temp dir. Idempotent."""
        if self._workers.get(worker.key) is worker:
            del self._workers[worker.key]
        if worker.discarded:
            return
        worker.discarded = True
        with trio.CancelScope(shield=True):
            self._kill(worker)
            await worker.process.wait()
            with trio.move_on_after(1.0):  # e.g. faulthandler's traceback of a segfault
                await self._pump_stderr(worker)
            self._flush_stderr(worker)
            for stream in (worker.stdin, worker.stdout, worker.stderr):
                if stream is not None:
                    await stream.aclose()
            await self._empty_cgroup(worker)
        shutil.rmtree(worker.workdir, ignore_errors=True)
        log.debug("%s ended (%s)", worker.label, worker.process.returncode)

    async def _empty_cgroup(self, worker: _Worker) -> None:
        # bwrap's --die-with-parent ends the namespace soon after bwrap; the cgroup makes
        # sure (nothing of the task outlives it) and is removed once empty.
        cgroup = worker.cgroup
        if cgroup is None:
            return
        for _ in range(200):
            cgroup.kill_all()
            if cgroup.remove():
                return
            await trio.sleep(0.01)
        log.warning("%s: pids cgroup %s not removed (busy)", worker.label, cgroup.path)

    # --- talking to the worker -------------------------------------------------------

    async def _exchange(self, worker: _Worker, frame: bytes, timeout: float) -> dict:
        """Send one frame and read the reply, within `timeout`; JobError if none comes."""
        reply: dict[str, Any] | None = None
        bad: protocol.ProtocolError | None = None
        done = False
        try:
            with trio.move_on_after(timeout) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_stderr, worker)
                    # Caught here, not around the nursery, which would wrap them in a group.
                    try:
                        await worker.stdin.send_all(frame)
                        reply = await self._read_frame(worker)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        reply = None
                    except protocol.ProtocolError as e:
                        bad = e
                    nursery.cancel_scope.cancel()
            done = True
        finally:
            if not done:  # cancelled from outside mid-job: the worker's state is unknown
                await self._discard(worker)
        if bad is not None:
            await self._discard(worker)
            raise JobError(f"worker protocol error: {bad}", KIND_PROTOCOL)
        if reply is None:
            timed_out = scope.cancelled_caught and not worker.closing
            if not timed_out and not worker.closing:
                # EOF: the worker is dying. bwrap reports how only once its namespace is
                # down; killing it first would turn every crash into "SIGKILL".
                with trio.move_on_after(EXIT_GRACE_S):
                    await worker.process.wait()
            await self._discard(worker)
            tail = [f"stderr: {line}" for line in worker.err_tail]
            if worker.closing:
                raise JobError("task closed while the job ran", KIND_CLOSED, tail)
            if timed_out:
                raise JobError(f"timeout after {timeout:g} s", KIND_TIMEOUT, tail)
            reason, kind = exit_reason(worker.process.returncode, worker.confined)
            raise JobError(reason, kind, tail)
        return reply

    async def _read_frame(self, worker: _Worker) -> dict[str, Any] | None:
        """The next frame, decoded; None at EOF (the worker died). ProtocolError if bad."""
        size = protocol.LENGTH.size
        if not await self._fill(worker, size):
            return None
        (n,) = protocol.LENGTH.unpack(worker.buf[:size])
        if n >= protocol.MAX_FRAME:
            raise protocol.ProtocolError(f"frame of {n} bytes announced")
        if not await self._fill(worker, size + n):
            return None
        with memoryview(worker.buf) as view:  # decoded in place: no copy of the body
            reply = protocol.unpack(view[size : size + n])
        del worker.buf[: size + n]
        return reply

    async def _fill(self, worker: _Worker, n: int) -> bool:
        stdout = worker.stdout
        while len(worker.buf) < n:
            chunk = await stdout.receive_some(max(READ_CHUNK, n - len(worker.buf)))
            if not chunk:
                return False
            worker.buf += chunk
        return True

    async def _pump_stderr(self, worker: _Worker) -> None:
        stderr = worker.stderr
        while True:
            try:
                chunk = await stderr.receive_some(65536)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            if not chunk:
                return
            *lines, worker.err_partial = (worker.err_partial + chunk).split(b"\n")
            for line in lines:
                self._stderr_line(worker, line)

    def _flush_stderr(self, worker: _Worker) -> None:
        if worker.err_partial:
            self._stderr_line(worker, worker.err_partial)
            worker.err_partial = b""

    def _stderr_line(self, worker: _Worker, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()[:2000]
        worker.err_tail.append(line)
        worker_log.info("%s %s", worker.label, line)

    def _save_state(self, spec: TaskSpec, state: Any) -> None:
        if state is None or spec.state_path is None:
            return
        if not isinstance(state, dict):
            raise JobError("worker protocol error: state is not a map", KIND_PROTOCOL)
        try:
            save_state(spec.state_path, state)
        except (OSError, TypeError, ValueError) as e:
            raise JobError(f"cannot save task state {spec.state_path}: {describe(e)}") from None
