"""The real world's driver backend: wall-clock timers in trio, jobs in child processes.

Every callback into the driver (network events, timers, job and thread outcomes) goes
through one FIFO queue drained by one task, so the driver and the core see events one at
a time, in order, and a bug in handling one event is logged instead of killing the node.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import trio

from p2pfl.core.tokens import Timer
from p2pfl.runtime import ChildProcessRunner, JobError

log = logging.getLogger("p2pfl.node")


class TrioIO:
    def __init__(self, nursery: trio.Nursery, runner: ChildProcessRunner) -> None:
        self._nursery = nursery
        self.runner = runner
        self._timers: dict[Timer, trio.CancelScope] = {}
        self._send, self._receive = trio.open_memory_channel[Callable[[], None]](math.inf)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the callback queue until cancelled."""
        task_status.started()
        async for callback in self._receive:
            try:
                callback()
            except Exception:  # a bug: say so loudly, keep serving the other tasks
                log.exception("internal error while handling an event")

    def now(self) -> float:
        return time.time()

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._send.send_nowait(callback)

    def set_timer(self, key: Timer, deadline: float, callback: Callable[[], None]) -> None:
        self.cancel_timer(key)
        scope = trio.CancelScope()
        self._timers[key] = scope

        async def wait() -> None:
            with scope:
                await trio.sleep(max(0.0, deadline - time.time()))
                if self._timers.get(key) is scope:
                    del self._timers[key]
                self.call_soon(callback)

        self._nursery.start_soon(wait)

    def cancel_timer(self, key: Timer) -> None:
        scope = self._timers.pop(key, None)
        if scope is not None:
            scope.cancel()

    def run_blocking(
        self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        async def work() -> None:
            try:
                result = await trio.to_thread.run_sync(fn)
            except Exception as exc:
                error = exc  # `exc` is unbound after the block; the callback runs later
                self.call_soon(lambda: done(None, error))
                return
            self.call_soon(lambda: done(result, None))

        self._nursery.start_soon(work)

    def run_job(self, spec: Any, job: Any, done: Callable[[Any, str | None], None]) -> None:
        async def work() -> None:
            try:
                output = await self.runner.run(spec, job)
            except JobError as exc:
                reason = exc.reason
                self.call_soon(lambda: done(None, reason))
                return
            except Exception as exc:  # our bug, not the task's: log it, fail the job only
                log.exception("runtime error while running %s", type(job).__name__)
                reason = f"runtime error: {type(exc).__name__}: {exc}"
                self.call_soon(lambda: done(None, reason))
                return
            self.call_soon(lambda: done(output, None))

        self._nursery.start_soon(work)

    def close_task(self, task_id: str, node: str) -> None:
        async def close() -> None:
            try:
                await self.runner.close_task(task_id, node)
            except Exception:  # the worker may already be gone; nothing else to undo
                log.debug("closing task %s", task_id, exc_info=True)

        self._nursery.start_soon(close)
