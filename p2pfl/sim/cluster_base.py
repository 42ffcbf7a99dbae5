"""What every in-process cluster shares, whatever carries its messages.

A cluster is many real nodes (NodeCore + Driver) in one process, node 0 publishing the
taskpack and offering the task. `ClusterBase` owns what does not depend on the network:
the run's state, turning node events into `RoundRecord`s (with test-set metrics of each
distinct model), playing the scenario's faults at the right round, the byzantine update
hook, the offer's parameter overrides and the closing rows and test. A world (SimCluster
over the simulated hub, LiveCluster over real libp2p hosts) implements the hooks:

    _schedule(fn)        run fn soon, outside the event being handled
    _stats(i)            node i's NetStats now (byte counters)
    _crash_node(i)       node i stops
    _restart_node(i)     node i comes back as a fresh process (same key and data)
    _partition(groups)   split the network into groups of node indices
    _heal()              undo partitions
    _collect(i, rnd, m)  where a node's finished round goes (default: recorded at once)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2pfl.core.node_core import DatasetInfo, NodeCore
from p2pfl.driver import Driver
from p2pfl.identity import Identity
from p2pfl.net.base import NetStats
from p2pfl.runtime import Evaluate, JobError, JobOutput, TaskSpec
from p2pfl.store.blobs import BlobStore
from p2pfl.taskpack.trust import TrustPolicy

# Every node of a cluster is this machine; the figures a node advertises about itself.
CAPABILITIES: dict[str, Any] = {
    "cpus": 2,
    "memory_bytes": 8 << 30,
    "disk_free_bytes": 100 << 30,
    "gpu": False,
    "python": "3.11.7",
}


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
    # A partial rollout: other versions of the taskpack, published beside it, and the
    # shares (`1.0.0=0.8,1.1.0=0.2`, core/versions.py).
    extra_taskpacks: list[Path] = field(default_factory=list)
    rollout: str = ""
    flow: Path | None = None  # a flow file: the run is the whole flow (p2pfl/sim/flowsim.py)
    # Where jobs run: {"kind": "local"} (in this process) or {"kind": "ray", "address",
    # "cpus_per_job"} (p2pfl.sim.ray_executor).
    executor: dict[str, Any] = field(default_factory=lambda: {"kind": "local"})


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
class ClusterNode:
    index: int
    identity: Identity
    store: BlobStore
    core: NodeCore
    driver: Driver
    data: Path


class JobRunner(Protocol):
    """What test-set evaluations need: run one job now, in this thread."""

    def run(self, spec: TaskSpec, job: Any) -> JobOutput: ...


class ClusterBase:
    """Shared state and logic of SimCluster and LiveCluster (see the module docstring)."""

    # The temporary directory's prefix (taskpacks are unpacked under it).
    tmp_prefix = "p2pfl-cluster-"
    # Seeds node identities: sha256(f"{identity_label}|{seed}|{i}").
    identity_label = "p2pfl-cluster"

    runner: JobRunner

    def __init__(self, spec: ClusterSpec) -> None:
        if len(spec.node_data) != spec.nodes:
            raise ValueError(f"{spec.nodes} nodes but {len(spec.node_data)} data files")
        self.spec = spec
        self._tmp = Path(tempfile.mkdtemp(prefix=self.tmp_prefix))
        self.taskpack_root = self._tmp / "taskpacks"
        self.nodes: list[ClusterNode] = []
        self.result: dict[str, Any] | None = None
        self.task_id: str | None = None
        self.final_test_metrics: dict[str, Any] = {}
        # Notices about parts of the scenario this world cannot play (the run summary's).
        self.warnings: list[str] = []
        self._records: list[RoundRecord] = []
        self._seen: set[tuple[int, int]] = set()
        self._seen_in: dict[int, int] = {}  # round -> nodes recorded in it
        self._last_bytes: dict[int, tuple[int, int]] = {}
        self._test_cache: dict[str, dict[str, Any]] = {}
        self._applied_faults: set[int] = set()
        self._closed_round = 0  # the highest round closed anywhere
        self._round_done = 0  # the highest round every live participant finished
        self._participants: list[int] = []  # roster, as node indices
        self._crashed: set[int] = set()
        self.identities = [
            Identity.from_seed(
                hashlib.sha256(f"{self.identity_label}|{spec.seed}|{i}".encode()).digest()
            )
            for i in range(spec.nodes)
        ]
        self._by_peer = {ident.peer_id: i for i, ident in enumerate(self.identities)}
        # Node 0 publishes the taskpack; every node trusts it and only it.
        self.policy = TrustPolicy(frozenset({self.identities[0].peer_id}), False)

    # --- hooks of a world ------------------------------------------------------------------

    def _schedule(self, fn: Callable[[], None]) -> None:
        raise NotImplementedError

    def _stats(self, index: int) -> NetStats:
        raise NotImplementedError

    def _crash_node(self, index: int) -> None:
        raise NotImplementedError

    def _restart_node(self, index: int) -> None:
        raise NotImplementedError

    def _partition(self, groups: list[list[int]]) -> None:
        raise NotImplementedError

    def _heal(self) -> None:
        raise NotImplementedError

    def _collect(self, index: int, rnd: int, metrics: dict[str, Any]) -> None:
        """Node `index` finished round `rnd`: record it now (a world may defer it)."""
        self._record(index, rnd, metrics, self._stats(index))

    # --- construction helpers ----------------------------------------------------------------

    def _dataset_infos(self) -> list[DatasetInfo]:
        """Each node's dataset description (rows counted once per distinct file)."""
        from p2pfl.fl.datasets import load_table

        rows: dict[Path, int] = {}
        for path in self.spec.node_data:
            if path not in rows and Path(path).is_dir():  # a folder dataset: one record per file
                from p2pfl.taskpack.batch import count_files

                rows[path] = count_files(Path(path))
            elif path not in rows:
                try:
                    rows[path] = int(len(load_table(path)[1]))
                except ValueError:  # a CSV with keys or text columns (inference input)
                    from p2pfl.taskpack.batch import csv_shape

                    rows[path] = csv_shape(Path(path))[0]
        return [DatasetInfo(self.spec.input_name, rows[p], []) for p in self.spec.node_data]

    def _update_hook(self, index: int) -> Callable[[str, bytes], bytes] | None:
        """The byzantine attack on node `index`'s updates, if the scenario makes it one."""
        if index not in set((self.spec.byzantine or {}).get("nodes", [])):
            return None
        return self._byzantine_hook(index)

    def _byzantine_hook(self, index: int) -> Callable[[str, bytes], bytes]:
        import numpy as np

        from p2pfl.fl.attacks import attack
        from p2pfl.wire import decode_tensors, encode_tensors

        name, strength = attack_strength(self.spec.byzantine or {})
        rng = np.random.default_rng(self.spec.seed * 7919 + index)

        def hook(task_id: str, update: bytes) -> bytes:
            node = self.nodes[index]
            machine = node.core.tasks.get(task_id)
            ref = machine.global_ref if machine else None
            honest = decode_tensors(update)
            global_ = decode_tensors(node.store.get(ref.cid)) if ref is not None else honest
            return bytes(encode_tensors(attack(name, honest, global_, rng, strength)))

        return hook

    def _offer_overrides(self) -> dict[str, str]:
        """The offer's parameter overrides: the scenario's params and DP settings."""
        params = dict(self.spec.params)
        # A scenario of N nodes means N participants, whatever the taskpack's own cap.
        params.setdefault("max_nodes", self.spec.nodes)
        params.setdefault("min_nodes", min(2, self.spec.nodes))
        overrides = {k: _param_text(v) for k, v in _flatten(params).items()}
        if self.spec.dp:
            overrides["differential_privacy.enabled"] = "true"
            for key, value in self.spec.dp.items():
                overrides[f"differential_privacy.{key}"] = _param_text(value)
        return overrides

    # --- events from the nodes ---------------------------------------------------------------

    def _on_event(self, index: int, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        # Faults of round r play once every live participant finished round r-1 (its
        # evaluation is in), or, as a fallback when some never do (a partition), once
        # round r itself closed somewhere. Round 1's play when the roster is out.
        if kind == "closed" and event.get("round"):
            if self._closed_round < event["round"]:
                self._closed_round = int(event["round"])
                self._schedule(self._apply_faults)
        if kind == "roster" and not self._participants:
            machine = self.nodes[index].core.tasks.get(event["task_id"])
            if machine is not None and machine.roster is not None:
                self._participants = [
                    self._by_peer[p] for p in machine.participants if p in self._by_peer
                ]
            self._schedule(self._apply_faults)
        if kind == "node" and event.get("peer") == self.nodes[index].identity.peer_id:
            rnd = event.get("round")
            metrics = event.get("metrics") or {}
            if rnd and "model_cid" in metrics and (index, rnd) not in self._seen:
                self._seen.add((index, rnd))
                self._collect(index, int(rnd), metrics)
                seen = self._seen_in[rnd] = self._seen_in.get(rnd, 0) + 1
                # The exact check is O(nodes): made only once enough nodes are in.
                enough = seen >= len(self._participants) - len(self._crashed)
                live = [i for i in self._participants if i not in self._crashed] if enough else []
                if enough and rnd > self._round_done and all((i, rnd) in self._seen for i in live):
                    self._round_done = int(rnd)
                    self._schedule(self._apply_faults)
        # The first node to hold the signed result (the publisher may have crashed).
        if kind in ("result", "failed") and self.result is None:
            machine = self.nodes[index].core.tasks.get(event["task_id"])
            self.result = machine.result_dict() if machine else {"status": "failed"}

    def _record(self, index: int, rnd: int, metrics: dict[str, Any], stats: NetStats) -> None:
        """One node's round as a RoundRecord: bytes since its last record, test metrics."""
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
        upcoming = max(self._round_done + 1, self._closed_round)
        for k, fault in enumerate(self.spec.faults):
            if k in self._applied_faults or int(fault.get("round", 1)) > upcoming:
                continue
            self._applied_faults.add(k)
            for i in fault.get("crash", []) or []:
                if i not in self._crashed:
                    self._crashed.add(i)
                    self._crash_node(i)
            if fault.get("partition"):
                self._partition([list(group) for group in fault["partition"]])
            if fault.get("heal"):
                self._heal()
            for i in fault.get("restart", []) or []:
                if i in self._crashed:
                    self._crashed.discard(i)
                    self._restart_node(i)

    # --- the end of a run --------------------------------------------------------------------

    def _missing_records(self) -> Iterator[RoundRecord]:
        """Rows for nodes that were not there (crashed, partitioned off) in a round."""
        rounds = max((r.round for r in self._records), default=0)
        have = {(r.node, r.round) for r in self._records}
        for rnd in range(1, rounds + 1):
            for i in range(self.spec.nodes):
                if (i, rnd) not in have:
                    record = RoundRecord(i, rnd, None, None, 0, 0, None, False)
                    self._records.append(record)
                    yield record

    def _final_test(self) -> None:
        """The result's model on the global test set, from any node that holds it."""
        model_cid = (self.result or {}).get("model_cid")
        if model_cid:
            holder = next((n for n in self.nodes if n.store.has(model_cid)), None)
            if holder is not None:
                self.final_test_metrics = self._test_metrics(model_cid, holder.index)

    def _remove_tmp(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def records(self) -> list[RoundRecord]:
        return list(self._records)


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


def attack_strength(byzantine: dict[str, Any]) -> tuple[str, float | None]:
    """(attack name, its strength) from a scenario's `byzantine` section: `scale` drives
    sign-flip and scaled, `std` the gaussian-noise attack; None: the attack's default
    (p2pfl.fl.attacks.DEFAULT_SCALE)."""
    name = str(byzantine.get("attack", "sign-flip"))
    key = "std" if name == "gaussian-noise" else "scale"
    value = byzantine.get(key)
    return name, None if value is None else float(value)
