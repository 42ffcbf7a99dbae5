"""Many real nodes in one process: the node code of a deployment over the simulated network.

Each simulated node is the same `NodeCore` + `Driver` pair a real node runs; only the I/O
backend differs (virtual time on the hub, jobs in one shared in-process pool, blobs in
memory). Node 0 publishes the taskpack and offers the task; every node trusts it. What
does not depend on the network (records, faults, test metrics) is ClusterBase's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from p2pfl.core.node_core import NodeCore
from p2pfl.net.base import NetStats
from p2pfl.net.sim import LinkModel, SimHub
from p2pfl.runtime import InProcessRunner, Train
from p2pfl.sim.cluster_base import (
    CAPABILITIES,
    ClusterBase,
    ClusterNode,
    ClusterSpec,
    RoundRecord,
)
from p2pfl.sim.io import JobPool, sim_node

__all__ = ["ClusterSpec", "RoundRecord", "SimCluster", "TRAIN_OVERHEAD_S", "TRAIN_PER_SAMPLE_S"]

# Virtual compute time of a training job: fixed overhead + per sample-epoch cost. Virtual
# time costs nothing to wait for; this only makes round timing plausible.
TRAIN_OVERHEAD_S = 0.005
TRAIN_PER_SAMPLE_S = 2e-5


class SimCluster(ClusterBase):
    tmp_prefix = "p2pfl-sim-"
    identity_label = "p2pfl-sim"
    runner: JobPool

    def __init__(self, spec: ClusterSpec) -> None:
        if spec.network != "sim":
            raise NotImplementedError(
                "SimCluster runs --network sim; see p2pfl.sim.live for libp2p"
            )
        super().__init__(spec)
        self.hub = SimHub(seed=spec.seed, link=LinkModel(**spec.link), detect_s=spec.detect_s)
        self.runner = make_pool(spec.executor)
        if spec.dp:
            self.warnings.append(
                "DP noise in this simulation is reproducible (seeded from the task id), so "
                "it protects nothing: real nodes draw DP noise and sampling from the OS CSPRNG"
            )
        self.warnings.append(
            "simulated nodes apply no site policy and run taskpack code unconfined, in one process"
        )
        self._result_at: float | None = None
        self._build()

    # --- construction ----------------------------------------------------------------------

    def _build(self) -> None:
        spec = self.spec
        infos = self._dataset_infos()
        for i, identity in enumerate(self.identities):
            core = NodeCore(
                identity,
                policy=self.policy,
                capabilities=CAPABILITIES,
                datasets={spec.input_name: infos[i]},
                min_records=spec.min_records,
                caps_interval_s=None,  # capability gossip is per-node chatter, not modelled
                rng=random.Random(spec.seed * 100_003 + i),
            )
            self.nodes.append(self._start_node(i, core, add=True))
        topo = dict(spec.topology)
        kind = topo.pop("kind", "full")
        self.hub.apply_topology(kind, **topo)
        for node in self.nodes:
            node.core.full_mesh = kind == "full"
        for node in self.nodes:
            node.driver.start()

    def _start_node(self, i: int, core: NodeCore, *, add: bool) -> ClusterNode:
        """Node i's driver over a hub endpoint (a new one, or a crashed node's, restarted)."""
        identity = self.identities[i]
        data = self.spec.node_data[i]
        driver = sim_node(
            self.hub,
            core,
            self.runner,
            taskpack_root=self.taskpack_root,
            datasets={self.spec.input_name: data},
            compute_s=_compute_s,
            min_compute_s=_min_compute_s,
            # A restarted node is a fresh, honest process.
            update_hook=self._update_hook(i) if add else None,
            restart=not add,
        )
        driver.listeners.append(lambda ev, i=i: self._on_event(i, ev))
        # Derived datasets (preprocessing) stay in the run's temporary dir, as on a node.
        from p2pfl.data import DerivedRegistry

        driver.attach_derived(DerivedRegistry(self._tmp / "derived" / str(i)))
        return ClusterNode(i, identity, driver.store, core, driver, data)

    # --- the world's hooks -------------------------------------------------------------------

    def _schedule(self, fn: Callable[[], None]) -> None:
        self.hub.call_soon(fn)

    def _stats(self, index: int) -> NetStats:
        return self.hub.stats(self.identities[index].peer_id)

    def _crash_node(self, index: int) -> None:
        self.hub.crash(self.identities[index].peer_id)

    def _partition(self, groups: list[list[int]]) -> None:
        self.hub.partition([[self.identities[i].peer_id for i in group] for group in groups])

    def _heal(self) -> None:
        self.hub.heal()

    def _restart_node(self, index: int) -> None:
        """A crashed node comes back as a fresh process: same key and data, no task state."""
        old = self.nodes[index]
        core = NodeCore(
            old.identity,
            policy=old.core.book.policy,
            capabilities=old.core.capabilities,
            datasets=old.core.datasets,
            min_records=old.core.local.min_records,
            caps_interval_s=None,
            rng=random.Random(self.spec.seed * 100_003 + index + 1),
        )
        node = self._start_node(index, core, add=False)
        core.full_mesh = old.core.full_mesh
        self.nodes[index] = node
        node.driver.start()

    # --- running -----------------------------------------------------------------------------

    def run(self) -> Iterator[RoundRecord]:
        """Publish, offer, and run the task to its end, yielding records as they come."""
        try:
            yield from self._run()
        finally:
            close = getattr(self.runner, "close", None)
            if close is not None:
                close()
            self._remove_tmp()

    def _run(self) -> Iterator[RoundRecord]:
        publisher = self.nodes[0].driver
        self.hub.run(until=self.hub.now + 0.5)  # links come up
        for extra in self.spec.extra_taskpacks:  # other versions, for a rollout
            publisher.announce_taskpack(publisher.publish_taskpack(extra)["announce"])
        info = publisher.publish_taskpack(self.spec.taskpack_dir)
        # Signed over the whole BlobRef (see taskpack.signing; a no-op once the driver is).
        publisher.announce_taskpack(info["announce"])
        # Waiting costs nothing in virtual time: a wide window lets every node volunteer
        # (10 s, and more for big runs: the taskpack and the offer take longer to reach
        # 10,000 nodes, and a node whose checks end after the window declines).
        created = publisher.create_task(
            info["cid"],
            self._offer_overrides(),
            volunteer_window_s=max(10.0, len(self.nodes) / 200),
            rollout=self.spec.rollout,
        )
        self.task_id = created["task_id"]
        offer = self.nodes[0].core.tasks[self.task_id].offer
        horizon = self.hub.now + 60.0 + offer.rounds * (offer.round_timeout_s + 30.0)
        emitted = 0
        while self.result is None:
            state = self.hub.run(until=horizon, stop=partial(self._should_pause, emitted))
            while emitted < len(self._records):
                yield self._records[emitted]
                emitted += 1
            if state in ("idle", "until") and self.result is None:
                self.result = {
                    "status": "failed",
                    "reason": f"simulation stalled ({state}) at t={self.hub.now:.1f}s",
                }
        self._result_at = self.hub.now
        # Let messages in flight (the result reaching every node) arrive: virtual time is free.
        self.hub.run(until=self.hub.now + 5.0)
        yield from self._missing_records()
        self._final_test()

    def _should_pause(self, emitted: int) -> bool:
        return self.result is not None or len(self._records) > emitted

    @property
    def virtual_s(self) -> float:
        """Virtual seconds until the result (or until now, while running)."""
        return self._result_at if self._result_at is not None else self.hub.now


def make_pool(executor: dict[str, Any]) -> JobPool:
    """Where the nodes' jobs run: this process (local) or Ray actors (ray)."""
    kind = executor.get("kind", "local")
    if kind == "local":
        return InProcessRunner()
    if kind == "ray":
        from p2pfl.sim.ray_executor import RayExecutor

        return RayExecutor(
            address=executor.get("address"),
            cpus_per_job=float(executor.get("cpus_per_job", 1.0)),
            hosts=executor.get("hosts"),
        )
    raise ValueError(f"executor: unknown kind {kind!r} (local or ray)")


def _compute_s(job: Any, output: Any) -> float:
    """Virtual seconds a job takes. A training job costs its overhead even when it fails:
    that makes TRAIN_OVERHEAD_S a lower bound that holds before the outcome is known."""
    if isinstance(job, Train):
        n = getattr(output.result, "num_samples", 0) if output is not None else 0
        return TRAIN_OVERHEAD_S + TRAIN_PER_SAMPLE_S * (n or 0)
    return 0.0


def _min_compute_s(job: Any) -> float:
    """A lower bound of _compute_s(job, any outcome): where a submitted job's gate goes."""
    return TRAIN_OVERHEAD_S if isinstance(job, Train) else 0.0
