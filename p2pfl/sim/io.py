"""The simulator's driver backend: virtual time on the hub, jobs in a shared pool.

Taskpack jobs run synchronously inside the event loop (virtual time does not pass while
they run), then their outcome is delivered `compute_s(job)` virtual seconds later. That
keeps a run deterministic whatever the machine's load, and lets 1,000 nodes share one
imported task module and one process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfl.core.tokens import Timer
from p2pfl.net.sim import SimHub, TimerHandle
from p2pfl.runtime import InProcessRunner, JobError


class SimIO:
    def __init__(
        self,
        hub: SimHub,
        owner: str,
        runner: InProcessRunner,
        compute_s: Callable[[Any, Any], float] | None = None,
    ) -> None:
        self.hub = hub
        self.owner = owner
        self.runner = runner
        self.compute_s = compute_s
        self._timers: dict[Timer, TimerHandle] = {}

    def now(self) -> float:
        return self.hub.now

    def set_timer(self, key: Timer, deadline: float, callback: Callable[[], None]) -> None:
        self.cancel_timer(key)

        def fire() -> None:
            self._timers.pop(key, None)
            callback()

        self._timers[key] = self.hub.call_at(deadline, fire, owner=self.owner)

    def cancel_timer(self, key: Timer) -> None:
        handle = self._timers.pop(key, None)
        if handle is not None:
            self.hub.cancel(handle)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.hub.call_at(self.hub.now, callback, owner=self.owner)

    def run_blocking(
        self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        try:
            result, error = fn(), None
        except Exception as exc:  # delivered to the driver, which decides
            result, error = None, exc
        self.call_soon(lambda: done(result, error))

    def run_job(self, spec: Any, job: Any, done: Callable[[Any, str | None], None]) -> None:
        try:
            output, error = self.runner.run(spec, job), None
        except JobError as exc:
            output, error = None, exc.reason
        delay = self.compute_s(job, output) if self.compute_s else 0.0
        self.hub.call_at(self.hub.now + delay, lambda: done(output, error), owner=self.owner)

    def close_task(self, task_id: str, node: str) -> None:
        self.runner.close_task(task_id, node)


def sim_node(
    hub: SimHub,
    core: Any,
    runner: InProcessRunner,
    *,
    taskpack_root: Path,
    datasets: dict[str, Path],
    compute_s: Callable[[Any, Any], float] | None = None,
    update_hook: Callable[[str, bytes], bytes] | None = None,
    restart: bool = False,
) -> Any:
    """One simulated node: the real `Driver` for `core` over a hub endpoint, with an
    in-memory blob store and the shared job pool. `restart` reuses a crashed node's
    endpoint. Returns the driver (not started: call `driver.start()` once wired)."""
    from p2pfl.driver import Driver
    from p2pfl.store.blobs import BlobStore

    store = BlobStore(None)
    ref: list[Driver] = []

    def sink(event: Any) -> None:
        ref[0].on_event(event)

    if restart:
        net = hub.restart(core.me, sink, store.read, may_serve=core.may_serve)
    else:
        net = hub.add_node(core.me, sink=sink, blob_reader=store.read, may_serve=core.may_serve)
    driver = Driver(
        core,
        net,
        store,
        SimIO(hub, core.me, runner, compute_s),
        taskpack_root=taskpack_root,
        datasets=datasets,
        update_hook=update_hook,
    )
    driver.deterministic_dp = True  # a simulation's DP noise is reproducible, and says so
    ref.append(driver)
    return driver
