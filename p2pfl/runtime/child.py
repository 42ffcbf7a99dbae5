"""ChildProcessRunner: task code in one worker process per (task_id, node), for real nodes.

The worker (`python -m p2pfl.runtime.worker`) is persistent: it imports the task once
(torch takes seconds), preprocesses once, then serves many jobs. It runs with a scrubbed
environment, cwd/HOME/TMPDIR = its private temp dir (wiped when it ends), resource limits
and a Landlock sandbox (see p2pfl.runtime.sandbox). Whatever happens to it, the node
sees a JobError: a crash or timeout is a failed contribution, never a dead node. After a
failure that ended the worker, the next job for that task starts a fresh worker (which
preprocesses again; ctx.state survives through the state file).

stderr of the worker is drained while a job runs, logged to the "p2pfl.runtime.worker"
logger, and its tail is attached to the JobError of a worker that died.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import trio

import p2pfl
from p2pfl.runtime import protocol
from p2pfl.runtime.jobs import (
    KIND_CLOSED,
    KIND_CPU,
    KIND_CRASHED,
    KIND_ERROR,
    KIND_PROTOCOL,
    KIND_TIMEOUT,
    Job,
    JobError,
    JobOutput,
    TaskSpec,
)
from p2pfl.runtime.loader import describe, load_state, save_state

log = logging.getLogger("p2pfl.runtime")
worker_log = logging.getLogger("p2pfl.runtime.worker")

STDERR_TAIL_LINES = 40
READ_CHUNK = 1 << 20

Key = tuple[str, str]


class _Worker:
    def __init__(self, key: Key, process: trio.Process, workdir: Path) -> None:
        self.key = key
        self.process = process
        self.workdir = workdir
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


def exit_reason(returncode: int | None) -> tuple[str, str]:
    """(reason, kind) for a worker that ended with `returncode`."""
    if returncode is None:
        return "crashed (still running)", KIND_CRASHED
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
    """Async (trio) runner: one persistent, confined worker process per (task_id, node)."""

    def __init__(
        self,
        *,
        python: str | None = None,
        sandbox: bool = True,
        tmp_root: Path | None = None,
        close_grace_s: float = 2.0,
    ) -> None:
        self._python = python or sys.executable
        self._sandbox = sandbox
        self._tmp_root = tmp_root
        self._grace = close_grace_s
        self._workers: dict[Key, _Worker] = {}
        self._locks: dict[Key, trio.Lock] = {}

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
            reply = await self._exchange(worker, frame, spec.limits.timeout_s)
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
        return {
            "PATH": os.environ.get("PATH", os.defpath),
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

    async def _start(self, spec: TaskSpec) -> _Worker:
        key = (spec.task_id, spec.node)
        state = load_state(spec.state_path)
        workdir = Path(tempfile.mkdtemp(prefix="p2pfl-task-", dir=self._tmp_root))
        hello = {
            "op": "open",
            "spec": protocol.encode_spec(spec),
            "workdir": str(workdir),
            "state": state,
            "sandbox": self._sandbox,
        }
        try:
            frame = _pack(hello, "task spec")
        except JobError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        try:
            process = await trio.lowlevel.open_process(
                [self._python, "-m", "p2pfl.runtime.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=str(workdir),
                env=self._env(workdir),
                start_new_session=True,  # its own process group: killed as a whole
            )
        except OSError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            raise JobError(f"cannot start worker: {describe(e)}", KIND_CRASHED) from None
        worker = _Worker(key, process, workdir)
        self._workers[key] = worker
        reply = await self._exchange(worker, frame, spec.limits.timeout_s)
        if not reply.get("ok"):
            await self._discard(worker)
            raise JobError(
                str(reply.get("reason", "?")),
                str(reply.get("kind", KIND_ERROR)),
                [str(x) for x in reply.get("logs") or []],
            )
        worker.report = reply.get("report") or {}
        log.debug("%s started: %s", worker.label, worker.report)
        return worker

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
                await worker.process.stdin.aclose()
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
            for stream in (worker.process.stdin, worker.process.stdout, worker.process.stderr):
                if stream is not None:
                    await stream.aclose()
        shutil.rmtree(worker.workdir, ignore_errors=True)
        log.debug("%s ended (%s)", worker.label, worker.process.returncode)

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
                        await worker.process.stdin.send_all(frame)
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
            await self._discard(worker)
            tail = [f"stderr: {line}" for line in worker.err_tail]
            if worker.closing:
                raise JobError("task closed while the job ran", KIND_CLOSED, tail)
            if timed_out:
                raise JobError(f"timeout after {timeout:g} s", KIND_TIMEOUT, tail)
            reason, kind = exit_reason(worker.process.returncode)
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
        stdout = worker.process.stdout
        while len(worker.buf) < n:
            chunk = await stdout.receive_some(max(READ_CHUNK, n - len(worker.buf)))
            if not chunk:
                return False
            worker.buf += chunk
        return True

    async def _pump_stderr(self, worker: _Worker) -> None:
        stderr = worker.process.stderr
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
