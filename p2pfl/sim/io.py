"""The simulator's driver backend: virtual time on the hub, jobs in a shared pool.

Taskpack jobs run synchronously inside the event loop (virtual time does not pass while
they run), then their outcome is delivered `compute_s(job)` virtual seconds later. That
keeps a run deterministic whatever the machine's load, and lets 1,000 nodes share one
imported task module and one process.

A runner that can `submit` (the Ray executor, p2pfl.sim.ray_executor) runs jobs elsewhere,
many at once. The job's outcome still lands at the same (virtual time, sequence number) as
on the spot: the number is reserved at submission, and a gate placed at the earliest time
the outcome can be due (`min_compute_s(job)`) waits for the job there. Everything due
before the gate runs meanwhile, other nodes' jobs included, and nothing after it can run
first, so the event order, and the run, are those of the in-process runner, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from p2pfl.core.tokens import Timer
from p2pfl.net.sim import SimHub, TimerHandle
from p2pfl.runtime import JobError, JobOutput

# What a submitted job gives back when waited for: (output, None) or (None, reason).
Outcome = tuple[JobOutput | None, str | None]


class JobPool(Protocol):
    """The runners a simulated node can use: InProcessRunner (runs a job on the spot)
    or one that also has `submit(spec, job) -> wait` (p2pfl.sim.ray_executor)."""

    def run(self, spec: Any, job: Any) -> JobOutput: ...

    def close_task(self, task_id: str, node: str) -> None: ...


class SimIO:
    def __init__(
        self,
        hub: SimHub,
        owner: str,
        runner: JobPool,
        compute_s: Callable[[Any, Any], float] | None = None,
        min_compute_s: Callable[[Any], float] | None = None,
    ) -> None:
        self.hub = hub
        self.owner = owner
        self.runner = runner
        self.compute_s = compute_s
        # A lower bound of compute_s(job, any outcome): how far a submitted job's gate is.
        self.min_compute_s = min_compute_s
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
        submit: Callable[[Any, Any], Callable[[], Outcome]] | None
        submit = getattr(self.runner, "submit", None)
        if submit is not None:
            self._submit_job(submit(spec, job), job, done)
            return
        output: JobOutput | None
        try:
            output, error = self.runner.run(spec, job), None
        except JobError as exc:
            output, error = None, exc.reason
        delay = self.compute_s(job, output) if self.compute_s else 0.0
        self.hub.call_at(self.hub.now + delay, lambda: done(output, error), owner=self.owner)

    def _submit_job(
        self, wait: Callable[[], Outcome], job: Any, done: Callable[[Any, str | None], None]
    ) -> None:
        """The job runs elsewhere; its outcome lands where run_job's on-the-spot one would."""
        hub, owner, start = self.hub, self.owner, self.hub.now
        seq = hub.reserve_seq()  # the number run_job's call_at would have taken now
        gate_at = start + (self.min_compute_s(job) if self.min_compute_s else 0.0)

        def gate() -> None:
            output, error = wait()
            due = start + (self.compute_s(job, output) if self.compute_s else 0.0)
            if due < gate_at:
                raise AssertionError(f"min_compute_s({job!r}) is not a lower bound")
            if due == gate_at:
                done(output, error)
            else:
                hub.call_at(due, lambda: done(output, error), owner=owner, seq=seq)

        hub.call_at(gate_at, gate, owner=owner, seq=seq)

    def close_task(self, task_id: str, node: str) -> None:
        self.runner.close_task(task_id, node)


def sim_node(
    hub: SimHub,
    core: Any,
    runner: JobPool,
    *,
    taskpack_root: Path,
    datasets: dict[str, Path],
    compute_s: Callable[[Any, Any], float] | None = None,
    min_compute_s: Callable[[Any], float] | None = None,
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
        SimIO(hub, core.me, runner, compute_s, min_compute_s),
        taskpack_root=taskpack_root,
        datasets=datasets,
        update_hook=update_hook,
    )
    driver.deterministic_dp = True  # a simulation's DP noise is reproducible, and says so
    ref.append(driver)
    return driver
