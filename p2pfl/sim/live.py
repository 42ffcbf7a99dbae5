"""A scenario over the real network: every node a py-libp2p host on 127.0.0.1, one process.

`p2pfl simulate SCENARIO --network libp2p` runs this instead of SimCluster. Each node is
the node code of a deployment (NodeCore + Driver over a Libp2pNetwork, wall-clock timers
in trio); what is shared is the process, one trio loop (in a background thread) and one
in-process taskpack pool that runs one job at a time. Node 0 publishes and offers the
task; the others bootstrap to node 0 and discovery connects the rest.

    cluster = LiveCluster(ClusterSpec(..., network="libp2p"), deadline_s=120)
    for record in cluster.run():   # RoundRecords stream in as nodes finish rounds
        ...
    cluster.result, cluster.final_test_metrics, cluster.virtual_s  # wall seconds here

Faults: `crash` cancels the node (its host closes; peers see PeerDisconnected); `restart`
starts a fresh node with the same key and data. `partition`/`heal` cannot be played with
real sockets in one process and are refused at construction (ValidationError). The link
model and non-full topologies do not apply to real sockets: they are ignored, with a line
in `warnings`.

Records, faults and test metrics are ClusterBase's (p2pfl.sim.cluster_base), as for
SimCluster; this class supplies the world: hosts in trio, wall-clock time, and records
built in the consumer thread (test-set evaluations block) from byte counters read in the
trio thread when the round finished.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio

from p2pfl.core.node_core import NodeCore
from p2pfl.driver import Driver
from p2pfl.errors import ValidationError
from p2pfl.io_trio import TrioIO
from p2pfl.net.base import NetStats
from p2pfl.runtime import InProcessRunner, JobOutput, TaskSpec
from p2pfl.sim.cluster_base import CAPABILITIES, ClusterBase, ClusterNode, ClusterSpec, RoundRecord
from p2pfl.store.blobs import BlobStore

log = logging.getLogger("p2pfl.sim.live")

UNSUPPORTED_FAULTS = ("partition", "heal")
POLL_S = 0.05
# Every node shares one event loop and one GIL here, so a busy round (8 nodes moving
# 4 MB models) can delay a ping by seconds: a real node's 6 s liveness timeout then drops
# live peers. A crash closes the host's sockets, which peers see at once anyway.
LIVE_NET_DEFAULTS: dict[str, Any] = {"liveness_interval_s": 5.0, "liveness_timeout_s": 30.0}


class SharedPool:
    """One InProcessRunner for every node of the process, running one job at a time.

    Jobs run in a worker thread (trio.to_thread) so the shared event loop keeps serving
    every node's network meanwhile; one at a time because torch sessions are not safe to
    run concurrently in all cases. `run` is the same gate for other threads (the
    cluster's test-set evaluations). `busy_s` is the wall time spent inside jobs.
    """

    def __init__(self, runner: InProcessRunner | None = None) -> None:
        self.runner = runner or InProcessRunner()
        self.busy_s = 0.0
        self.jobs = 0
        self._lock = threading.Lock()
        self._limiter: trio.CapacityLimiter | None = None

    def run(self, spec: TaskSpec, job: Any) -> JobOutput:
        """Run a job now, in this thread (InProcessRunner's face, which SimCluster uses)."""
        with self._lock:
            started = time.perf_counter()
            try:
                return self.runner.run(spec, job)
            finally:
                self.busy_s += time.perf_counter() - started
                self.jobs += 1

    async def run_async(self, spec: TaskSpec, job: Any) -> JobOutput:
        """Run a job in a worker thread, one at a time across every node."""
        if self._limiter is None:  # made inside the trio run that uses it
            self._limiter = trio.CapacityLimiter(1)
        return await trio.to_thread.run_sync(self.run, spec, job, limiter=self._limiter)

    def close(self) -> None:
        self.runner.close()


class PooledIO(TrioIO):
    """TrioIO (wall-clock timers, one callback queue per node) with taskpack jobs in a
    SharedPool instead of one child process per node."""

    def __init__(self, nursery: trio.Nursery, pool: SharedPool) -> None:
        super().__init__(nursery, _AsyncFace(pool))  # type: ignore[arg-type]


class _AsyncFace:
    """The `await runner.run(spec, job)` TrioIO.run_job calls (ChildProcessRunner's face)."""

    def __init__(self, pool: SharedPool) -> None:
        self.run = pool.run_async


class LiveCluster(ClusterBase):
    """SimCluster's API over real libp2p hosts on 127.0.0.1 (see the module docstring).

    deadline_s bounds the whole run (default: generous, from the offer's rounds and round
    timeout); start_timeout_s bounds waiting for the hosts to find each other;
    volunteer_window_s is the offer's; net_options are Libp2pConfig fields over
    LIVE_NET_DEFAULTS.
    """

    tmp_prefix = "p2pfl-live-"
    identity_label = "p2pfl-live"

    def __init__(
        self,
        spec: ClusterSpec,
        *,
        deadline_s: float | None = None,
        start_timeout_s: float = 60.0,
        volunteer_window_s: float = 5.0,
        net_options: dict[str, Any] | None = None,
    ) -> None:
        # Refused before ClusterBase makes its temporary directory.
        problems = [
            f"faults[{k}].{kind}: not supported with --network libp2p (real sockets in one"
            " process cannot be partitioned); use --network sim"
            for k, fault in enumerate(spec.faults)
            for kind in UNSUPPORTED_FAULTS
            if fault.get(kind)
        ]
        if problems:
            raise ValidationError(problems, "scenario for --network libp2p")
        super().__init__(spec)
        self.deadline_s = deadline_s
        self.start_timeout_s = start_timeout_s
        self.volunteer_window_s = volunteer_window_s
        self.net_options = {**LIVE_NET_DEFAULTS, **(net_options or {})}
        kind = dict(spec.topology).get("kind", "full")
        if kind != "full":
            self.warnings.append(f"topology {kind!r} ignored: libp2p discovery connects every node")
        if spec.link:
            self.warnings.append("network link model ignored: real loopback sockets")
        for line in self.warnings:
            log.warning("%s", line)
        self.pool = SharedPool()
        # Test-set evaluations run in the consumer thread, through the same one-job gate.
        self.runner = self.pool
        self.networks: dict[int, Any] = {}
        # Wall-clock marks (seconds since the trio run began): ready (peers found),
        # published, roster, result; job_marks: job_s at the same moments.
        self.marks: dict[str, float] = {}
        self.job_marks: dict[str, float] = {}
        self._scopes: dict[int, trio.CancelScope] = {}
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._t0: float | None = None
        self._t_end: float | None = None
        self._nursery: trio.Nursery | None = None
        self._done: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._datasets = self._dataset_infos()

    # --- one node ------------------------------------------------------------------------

    async def _run_node(self, i: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Node i until its scope is cancelled (crash) or the cluster stops."""
        from p2pfl.net.libp2p import Libp2pConfig, Libp2pNetwork

        spec = self.spec
        identity = self.identities[i]
        bootstrap = [] if i == 0 else [self.networks[0].listen_addrs()[0]]
        core = NodeCore(
            identity,
            policy=self.policy,
            capabilities=CAPABILITIES,
            datasets={spec.input_name: self._datasets[i]},
            min_records=spec.min_records,
        )
        store = BlobStore(None)
        with trio.CancelScope() as scope:
            self._scopes[i] = scope
            async with trio.open_nursery() as nursery:
                io = PooledIO(nursery, self.pool)
                await nursery.start(io.run)
                holder: list[Driver] = []
                # Every other node, and no more: a target above what exists keeps the
                # discovery loops (peer exchange, DHT lookups) asking through the rounds.
                config = Libp2pConfig(
                    bootstrap=bootstrap, target_peers=max(1, spec.nodes - 1), **self.net_options
                )

                def sink(event: Any) -> None:
                    def deliver() -> None:
                        # Every node is in this process: we know when one sees all others,
                        # so rosters need not wait for their deadline.
                        alive = spec.nodes - len(self._crashed)
                        core.full_mesh = len(network.connected_peers()) >= alive - 1
                        holder[0].on_event(event)

                    io.call_soon(deliver)

                network = Libp2pNetwork(
                    identity, config, sink=sink, blob_reader=store.read, may_serve=core.may_serve
                )
                driver = Driver(
                    core,
                    network,
                    store,
                    io,
                    taskpack_root=self.taskpack_root,
                    datasets={spec.input_name: spec.node_data[i]},
                    update_hook=self._update_hook(i),
                )
                holder.append(driver)
                driver.listeners.append(functools.partial(self._on_event, i))
                node = ClusterNode(i, identity, store, core, driver, spec.node_data[i])
                if i < len(self.nodes):
                    self.nodes[i] = node
                else:
                    self.nodes.append(node)
                self.networks[i] = network
                await nursery.start(network.run)
                driver.start()
                task_status.started()
                await trio.sleep_forever()
        if scope.cancelled_caught:
            log.info("node %d stopped", i)

    # --- the world's hooks (called in the trio thread) ---------------------------------------

    def _schedule(self, fn: Callable[[], None]) -> None:
        assert self._nursery is not None

        async def call() -> None:
            fn()

        self._nursery.start_soon(call)

    def _stats(self, index: int) -> NetStats:
        return self.networks[index].stats()

    def _crash_node(self, index: int) -> None:
        scope = self._scopes.get(index)
        if scope is not None:
            scope.cancel()

    def _restart_node(self, index: int) -> None:
        """A fresh node with the same key and data (no task state), like a restarted process."""
        assert self._nursery is not None
        self._nursery.start_soon(self._run_node, index)

    def _partition(self, groups: list[list[int]]) -> None:  # refused at construction
        raise NotImplementedError("partition faults are not supported with --network libp2p")

    def _heal(self) -> None:  # refused at construction
        raise NotImplementedError("heal faults are not supported with --network libp2p")

    def _collect(self, index: int, rnd: int, metrics: dict[str, Any]) -> None:
        # Snapshot the byte counters now; the record (and its test-set evaluation, which
        # blocks) is built by the consumer thread in run().
        self._queue.put(("record", index, rnd, dict(metrics), self._stats(index)))

    def _on_event(self, index: int, event: dict[str, Any]) -> None:
        if index == 0 and event.get("kind") == "roster" and "roster" not in self.marks:
            self._mark("roster")
        super()._on_event(index, event)
        if self.result is not None and self._done is not None and not self._done.is_set():
            self._mark("result")
            self._done.set()

    def _mark(self, name: str) -> None:
        self.marks[name] = self.virtual_s
        self.job_marks[name] = self.pool.busy_s

    # --- the trio side ---------------------------------------------------------------------

    async def _main(self) -> None:
        self._t0 = time.perf_counter()
        self._token = trio.lowlevel.current_trio_token()
        self._done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for i in range(self.spec.nodes):
                    await nursery.start(self._run_node, i)
                await self._wait_for_peers()
                self._mark("ready")
                await self._offer()
                self._mark("published")
                offer = self.nodes[0].core.tasks[self.task_id].offer  # type: ignore[index]
                deadline = self.deadline_s
                if deadline is None:
                    deadline = 60.0 + offer.rounds * (offer.round_timeout_s + 30.0)
                with trio.move_on_after(deadline):
                    await self._done.wait()
                if self.result is None:
                    self.result = {
                        "status": "failed",
                        "reason": f"live run deadline ({deadline:.0f} s) passed",
                    }
                nursery.cancel_scope.cancel()
        finally:
            self._t_end = time.perf_counter()

    async def _wait_for_peers(self) -> None:
        # Small clusters wait for a full mesh (hosts target every other node): a node then
        # knows when everyone has answered an offer, and the roster need not wait for the
        # volunteer deadline. Larger ones start once each host has a few peers.
        n = self.spec.nodes
        want = n - 1 if n <= 16 else 3
        with trio.move_on_after(self.start_timeout_s):
            while any(
                len(self.networks[i].connected_peers()) < want for i in range(self.spec.nodes)
            ):
                await trio.sleep(POLL_S)
            return
        counts = [len(self.networks[i].connected_peers()) for i in range(self.spec.nodes)]
        raise RuntimeError(
            f"libp2p hosts did not find {want} peers each within {self.start_timeout_s:.0f} s: {counts}"
        )

    async def _offer(self) -> None:
        publisher = self.nodes[0].driver
        for extra in self.spec.extra_taskpacks:  # other versions, for a rollout
            more = await trio.to_thread.run_sync(publisher.publish_taskpack, extra)
            publisher.announce_taskpack(more["announce"])
        info = await trio.to_thread.run_sync(publisher.publish_taskpack, self.spec.taskpack_dir)
        # Signed over the whole BlobRef (see taskpack.signing; a no-op once the driver is).
        publisher.announce_taskpack(info["announce"])
        created = publisher.create_task(
            info["cid"],
            self._offer_overrides(),
            volunteer_window_s=self.volunteer_window_s,
            rollout=self.spec.rollout,
        )
        self.task_id = created["task_id"]

    def _thread_main(self) -> None:
        from p2pfl.memtrim import keep_freed_memory

        keep_freed_memory()  # as a node does (a round's buffers are reused, not faulted)
        try:
            trio.run(self._main)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(("error", exc))
        finally:
            self._queue.put(("done",))

    def _stop(self) -> None:
        """Ask the trio run to stop (the consumer gave up early)."""
        if self._token is None or self._nursery is None:
            return
        try:
            trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    # --- the consumer side -------------------------------------------------------------------

    def run(self) -> Iterator[RoundRecord]:
        """Start the nodes, publish, offer, and run the task to its end, yielding records as
        nodes complete rounds."""
        thread = threading.Thread(target=self._thread_main, name="p2pfl-live", daemon=True)
        thread.start()
        try:
            yield from self._consume()
        finally:
            if thread.is_alive():
                self._stop()
                thread.join(timeout=30)
            self.pool.close()
            self._remove_tmp()

    def _consume(self) -> Iterator[RoundRecord]:
        error: BaseException | None = None
        while True:
            item = self._queue.get()
            if item[0] == "done":
                break
            if item[0] == "error":
                error = item[1]
                continue
            _, index, rnd, metrics, stats = item
            self._record(index, rnd, metrics, stats)
            yield self._records[-1]
        if error is not None:
            raise error
        yield from self._missing_records()
        self._final_test()

    @property
    def virtual_s(self) -> float:
        """Wall seconds since the run began (until it ended)."""
        if self._t0 is None:
            return 0.0
        end = self._t_end if self._t_end is not None else time.perf_counter()
        return end - self._t0

    @property
    def job_s(self) -> float:
        """Wall seconds spent inside taskpack jobs (they run one at a time)."""
        return self.pool.busy_s
