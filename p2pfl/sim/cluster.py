"""Many real nodes in one process: the node code of a deployment over the simulated network.

Each simulated node is the same `NodeCore` + `Driver` pair a real node runs; only the I/O
backend differs (virtual time on the hub, jobs in one shared in-process pool, blobs in
memory). Node 0 publishes the taskpack and offers the task; every node trusts it.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from p2pfl.core.node_core import DatasetInfo, NodeCore
from p2pfl.driver import Driver
from p2pfl.identity import Identity
from p2pfl.net.sim import LinkModel, SimHub
from p2pfl.runtime import Evaluate, InProcessRunner, JobError, TaskSpec, Train
from p2pfl.sim.io import SimIO
from p2pfl.store.blobs import BlobStore
from p2pfl.taskpack.trust import TrustPolicy

# Virtual compute time of a training job: fixed overhead + per sample-epoch cost. Virtual
# time costs nothing to wait for; this only makes round timing plausible.
TRAIN_OVERHEAD_S = 0.005
TRAIN_PER_SAMPLE_S = 2e-5


@dataclass
class ClusterSpec:
    seed: int
    nodes: int
    taskpack_dir: Path
    node_data: list[Path]
    input_name: str
    params: dict[str, Any] = field(default_factory=dict)
    topology: dict[str, Any] = field(default_factory=lambda: {"kind": "full"})
    link: dict[str, Any] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)
    byzantine: dict[str, Any] | None = None
    dp: dict[str, Any] | None = None
    test_path: Path | None = None
    network: str = "sim"
    detect_s: float = 1.0
    min_records: int = 1


@dataclass(frozen=True)
class RoundRecord:
    node: int
    round: int
    accuracy: float | None
    loss: float | None
    bytes_sent: int
    bytes_received: int
    epsilon: float | None
    alive: bool


@dataclass
class _SimNode:
    index: int
    identity: Identity
    store: BlobStore
    core: NodeCore
    driver: Driver
    data: Path


class SimCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        if spec.network != "sim":
            raise NotImplementedError(
                "SimCluster runs --network sim; see p2pfl.sim.live for libp2p"
            )
        if len(spec.node_data) != spec.nodes:
            raise ValueError(f"{spec.nodes} nodes but {len(spec.node_data)} data files")
        self.spec = spec
        self.hub = SimHub(seed=spec.seed, link=LinkModel(**spec.link), detect_s=spec.detect_s)
        self.runner = InProcessRunner()
        self._tmp = Path(tempfile.mkdtemp(prefix="p2pfl-sim-"))
        self.taskpack_root = self._tmp / "taskpacks"
        self.nodes: list[_SimNode] = []
        self.result: dict[str, Any] | None = None
        self.task_id: str | None = None
        self.final_test_metrics: dict[str, Any] = {}
        self._records: list[RoundRecord] = []
        self._seen: set[tuple[int, int]] = set()
        self._last_bytes: dict[int, tuple[int, int]] = {}
        self._test_cache: dict[str, dict[str, Any]] = {}
        self._applied_faults: set[int] = set()
        self._closed_round = 0
        self._crashed: set[int] = set()
        self._by_peer: dict[str, int] = {}
        self._result_at: float | None = None
        self._build()

    # --- construction ----------------------------------------------------------------------

    def _build(self) -> None:
        from p2pfl.fl.datasets import load_table

        spec = self.spec
        identities = [
            Identity.from_seed(hashlib.sha256(f"p2pfl-sim|{spec.seed}|{i}".encode()).digest())
            for i in range(spec.nodes)
        ]
        publisher = identities[0].peer_id
        policy = TrustPolicy(frozenset({publisher}), False)
        capabilities = {
            "cpus": 2,
            "memory_bytes": 8 << 30,
            "disk_free_bytes": 100 << 30,
            "gpu": False,
            "python": "3.11.7",
        }
        rows_cache: dict[Path, int] = {}
        byzantine = set((spec.byzantine or {}).get("nodes", []))
        for i, identity in enumerate(identities):
            path = spec.node_data[i]
            if path not in rows_cache:
                rows_cache[path] = int(len(load_table(path)[1]))
            info = DatasetInfo(spec.input_name, rows_cache[path], [])
            core = NodeCore(
                identity,
                policy=policy,
                capabilities=capabilities,
                datasets={spec.input_name: info},
                min_records=spec.min_records,
                caps_interval_s=None,  # capability gossip is per-node chatter, not modelled
                rng=random.Random(spec.seed * 100_003 + i),
            )
            store = BlobStore(None)
            node_ref: list[Driver] = []
            net = self.hub.add_node(
                identity.peer_id,
                sink=lambda ev, ref=node_ref: ref[0].on_event(ev),
                blob_reader=store.read,
            )
            driver = Driver(
                core,
                net,
                store,
                SimIO(self.hub, identity.peer_id, self.runner, _compute_s),
                taskpack_root=self.taskpack_root,
                datasets={spec.input_name: path},
                update_hook=self._byzantine_hook(i) if i in byzantine else None,
            )
            node_ref.append(driver)
            driver.listeners.append(lambda ev, i=i: self._on_event(i, ev))
            self.nodes.append(_SimNode(i, identity, store, core, driver, path))
            self._by_peer[identity.peer_id] = i
        topo = dict(spec.topology)
        kind = topo.pop("kind", "full")
        self.hub.apply_topology(kind, **topo)
        for node in self.nodes:
            node.core.full_mesh = kind == "full"
        for node in self.nodes:
            node.driver.start()

    def _byzantine_hook(self, index: int):  # -> Callable[[str, bytes], bytes]
        import numpy as np

        from p2pfl.fl.attacks import attack
        from p2pfl.wire import decode_tensors, encode_tensors

        name = str((self.spec.byzantine or {}).get("attack", "sign-flip"))
        rng = np.random.default_rng(self.spec.seed * 7919 + index)

        def hook(task_id: str, update: bytes) -> bytes:
            node = self.nodes[index]
            machine = node.core.tasks.get(task_id)
            ref = machine.global_ref if machine else None
            honest = decode_tensors(update)
            global_ = decode_tensors(node.store.get(ref.cid)) if ref is not None else honest
            return encode_tensors(attack(name, honest, global_, rng))

        return hook

    # --- events from the nodes ---------------------------------------------------------------

    def _on_event(self, index: int, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "round" and event.get("round") and "closed" in event.get("message", ""):
            if index == 0 or self._closed_round < event["round"]:
                self._closed_round = max(self._closed_round, int(event["round"]))
                self.hub.call_soon(self._apply_faults)
        if kind == "roster" and index == 0:
            self.hub.call_soon(self._apply_faults)
        if kind == "node" and event.get("peer") == self.nodes[index].identity.peer_id:
            rnd = event.get("round")
            metrics = event.get("metrics") or {}
            if rnd and "model_cid" in metrics and (index, rnd) not in self._seen:
                self._seen.add((index, rnd))
                self._record(index, int(rnd), metrics)
        if index == 0 and kind in ("result", "failed") and self.result is None:
            machine = self.nodes[0].core.tasks.get(event["task_id"])
            self.result = machine.result_dict() if machine else {"status": "failed"}

    def _record(self, index: int, rnd: int, metrics: dict[str, Any]) -> None:
        peer = self.nodes[index].identity.peer_id
        stats = self.hub.stats(peer)
        last_sent, last_recv = self._last_bytes.get(index, (0, 0))
        self._last_bytes[index] = (stats.bytes_sent, stats.bytes_received)
        test = self._test_metrics(metrics.get("model_cid"), index)
        accuracy = test.get("accuracy", metrics.get("accuracy"))
        loss = test.get("loss", metrics.get("loss"))
        self._records.append(
            RoundRecord(
                node=index,
                round=rnd,
                accuracy=_float(accuracy),
                loss=_float(loss),
                bytes_sent=stats.bytes_sent - last_sent,
                bytes_received=stats.bytes_received - last_recv,
                epsilon=_float(metrics.get("epsilon")),
                alive=True,
            )
        )

    def _test_metrics(self, cid: str | None, index: int) -> dict[str, Any]:
        """The global test set's metrics of a model, once per distinct model."""
        if cid is None or self.spec.test_path is None or self.task_id is None:
            return {}
        if cid in self._test_cache:
            return self._test_cache[cid]
        weights = self.nodes[index].store.get(cid)
        spec = TaskSpec(
            task_id=self.task_id,
            node="__test__",
            taskpack_dir=self.taskpack_root / self._task_cid(),
            params={**self._task_params(), "validation_fraction": 0.0},
            inputs={self.spec.input_name: self.spec.test_path},
            seed=int(self.task_id[:8], 16),
        )
        try:
            metrics = dict(self.runner.run(spec, Evaluate(0, bytes(weights))).result)
        except JobError:
            metrics = {}
        self._test_cache[cid] = metrics
        return metrics

    def _task_cid(self) -> str:
        assert self.task_id is not None
        return self.nodes[0].core.tasks[self.task_id].offer.cid

    def _task_params(self) -> dict[str, Any]:
        assert self.task_id is not None
        params = self.nodes[0].core.tasks[self.task_id].offer.params
        return dict(params) if isinstance(params, dict) else {}

    # --- faults ------------------------------------------------------------------------------

    def _apply_faults(self) -> None:
        upcoming = self._closed_round + 1
        for k, fault in enumerate(self.spec.faults):
            if k in self._applied_faults or int(fault.get("round", 1)) > upcoming:
                continue
            self._applied_faults.add(k)
            peers = [n.identity.peer_id for n in self.nodes]
            for i in fault.get("crash", []) or []:
                if i not in self._crashed:
                    self._crashed.add(i)
                    self.hub.crash(peers[i])
            if fault.get("partition"):
                self.hub.partition([[peers[i] for i in group] for group in fault["partition"]])
            if fault.get("heal"):
                self.hub.heal()
            for i in fault.get("restart", []) or []:
                if i in self._crashed:
                    self._crashed.discard(i)
                    self._restart(i)

    def _restart(self, i: int) -> None:
        """A crashed node comes back as a fresh process: same key and data, no task state."""
        old = self.nodes[i]
        core = NodeCore(
            old.identity,
            policy=old.core.book.policy,
            capabilities=old.core.capabilities,
            datasets=old.core.datasets,
            min_records=old.core.local.min_records,
            caps_interval_s=None,
            rng=random.Random(self.spec.seed * 100_003 + i + 1),
        )
        store = BlobStore(None)
        ref: list[Driver] = []
        net = self.hub.restart(old.identity.peer_id, lambda ev: ref[0].on_event(ev), store.read)
        driver = Driver(
            core,
            net,
            store,
            SimIO(self.hub, old.identity.peer_id, self.runner, _compute_s),
            taskpack_root=self.taskpack_root,
            datasets={self.spec.input_name: old.data},
        )
        ref.append(driver)
        driver.listeners.append(lambda ev, i=i: self._on_event(i, ev))
        core.full_mesh = old.core.full_mesh
        self.nodes[i] = _SimNode(i, old.identity, store, core, driver, old.data)
        driver.start()

    # --- running -----------------------------------------------------------------------------

    def run(self) -> Iterator[RoundRecord]:
        """Publish, offer, and run the task to its end, yielding records as they come."""
        try:
            yield from self._run()
        finally:
            self.runner.close()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _run(self) -> Iterator[RoundRecord]:
        publisher = self.nodes[0].driver
        self.hub.run(until=self.hub.now + 0.5)  # links come up
        info = publisher.publish_taskpack(self.spec.taskpack_dir)
        publisher.announce_taskpack(info["announce"])
        params = dict(self.spec.params)
        # A scenario of N nodes means N participants, whatever the taskpack's own cap.
        params.setdefault("max_nodes", self.spec.nodes)
        params.setdefault("min_nodes", min(2, self.spec.nodes))
        overrides = {k: _param_text(v) for k, v in _flatten(params).items()}
        if self.spec.dp:
            overrides["differential_privacy.enabled"] = "true"
            for key, value in self.spec.dp.items():
                overrides[f"differential_privacy.{key}"] = _param_text(value)
        # Waiting costs nothing in virtual time: a wide window lets every node volunteer.
        created = publisher.create_task(info["cid"], overrides, volunteer_window_s=10.0)
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
        # Rows for nodes that were not there (crashed, partitioned off) in a round.
        rounds = max((r.round for r in self._records), default=0)
        have = {(r.node, r.round) for r in self._records}
        for rnd in range(1, rounds + 1):
            for i in range(self.spec.nodes):
                if (i, rnd) not in have:
                    record = RoundRecord(i, rnd, None, None, 0, 0, None, False)
                    self._records.append(record)
                    yield record
        model_cid = (self.result or {}).get("model_cid")
        if model_cid:
            holder = next((n for n in self.nodes if n.store.has(model_cid)), None)
            if holder is not None:
                self.final_test_metrics = self._test_metrics(model_cid, holder.index)

    def _should_pause(self, emitted: int) -> bool:
        return self.result is not None or len(self._records) > emitted

    @property
    def virtual_s(self) -> float:
        """Virtual seconds until the result (or until now, while running)."""
        return self._result_at if self._result_at is not None else self.hub.now

    @property
    def records(self) -> list[RoundRecord]:
        return list(self._records)


def _compute_s(job: Any, output: Any) -> float:
    if isinstance(job, Train) and output is not None:
        n = getattr(output.result, "num_samples", 0) or 0
        return TRAIN_OVERHEAD_S + TRAIN_PER_SAMPLE_S * n
    return 0.0


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
