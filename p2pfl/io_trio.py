"""The real world's driver backend: wall-clock timers in trio, jobs in child processes.

Every callback into the driver (network events, timers, job and thread outcomes) goes
through one FIFO queue drained by one task, so the driver and the core see events one at
a time, in order, and a bug in handling one event is logged instead of killing the node.

The queue is bounded in bytes where peers fill it: a received message (`deliver`) holds
its bytes in the InboundBudget until the core has handled it, and is dropped when its
sender (or everyone) is over budget. Timers, jobs and our own messages are not charged:
their number is bounded by what this node itself started.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import trio

from p2pfl.core.tokens import Timer
from p2pfl.net.base import Message
from p2pfl.net.inbound import InboundBudget
from p2pfl.runtime import ChildProcessRunner, JobError

log = logging.getLogger("p2pfl.node")


_Item = tuple[Callable[[], None], str | None, int]  # callback, peer charged, bytes charged


class TrioIO:
    def __init__(
        self,
        nursery: trio.Nursery,
        runner: ChildProcessRunner,
        inbound: InboundBudget | None = None,
        me: str = "",
    ) -> None:
        self._nursery = nursery
        self.runner = runner
        self.inbound = inbound if inbound is not None else InboundBudget()
        self._me = me
        self._timers: dict[Timer, trio.CancelScope] = {}
        # Unbounded in count; what peers put here is bounded in bytes by self.inbound.
        self._send, self._receive = trio.open_memory_channel[_Item](math.inf)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the callback queue until cancelled."""
        task_status.started()
        async for callback, peer, cost in self._receive:
            try:
                callback()
            except Exception:  # a bug: say so loudly, keep serving the other tasks
                log.exception("internal error while handling an event")
            finally:
                if peer is not None:
                    self.inbound.release(peer, cost)

    def deliver(self, event: Any, handler: Callable[[Any], None]) -> bool:
        """Queue a network event for `handler`; a peer's message is charged to its sender's
        byte budget until handled, or dropped (False) when over it."""
        if isinstance(event, Message) and event.sender != self._me:
            cost = len(event.data)
            what = "gossip message" if event.topic is not None else "direct message"
            if not self.inbound.take(event.sender, cost, what):
                return False
            self._send.send_nowait((lambda: handler(event), event.sender, cost))
            return True
        self._send.send_nowait((lambda: handler(event), None, 0))
        return True

    def now(self) -> float:
        return time.time()

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._send.send_nowait((callback, None, 0))

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
