"""N NodeCores over an in-memory link, with a fake job runner and virtual time.

No torch, no trio, no sockets: the driver's part is played here in a few lines, so a
protocol rule is tested in microseconds. Models are tiny numpy tensors; node i's training
moves every weight to `base + (i + 1)` so the honest FedAvg of a round is known exactly.

Attacks are written as hooks: `outgoing` can rewrite or drop what a node publishes or
sends, and `inject` puts any bytes on the wire under any sender.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np

from p2pfl.core.commands import (
    Aggregate,
    Aggregated,
    ArchiveChecked,
    BlobFailed,
    BlobReady,
    CancelTimer,
    CheckArchive,
    Emit,
    FetchBlob,
    JobDone,
    JobFailed,
    Log,
    Persist,
    Publish,
    RunJob,
    Send,
    SetTimer,
    SliceWork,
    SliceWorked,
    TaskEnded,
    TimerFired,
)
from p2pfl.core.messages import TOPIC_TASKS, RoundUpdate, TaskpackAnnounce
from p2pfl.core.node_core import DatasetInfo, NodeCore
from p2pfl.core.phase import Phase
from p2pfl.core.task import TaskMachine
from p2pfl.core.tokens import JobStep
from p2pfl.fl.aggregate import aggregate_checked
from p2pfl.fl.slices import slice_work
from p2pfl.identity import Identity
from p2pfl.net.base import Message, PeerConnected, PeerDisconnected
from p2pfl.store.blobref import make_blob_ref
from p2pfl.taskpack.manifest import load_manifest
from p2pfl.taskpack.trust import TrustPolicy
from p2pfl.wire import Signed, decode_tensors, encode, encode_tensors, seal, type_name, unseal

ROOT = Path(__file__).resolve().parents[2]
LATENCY_S = 0.01
JOB_S = 0.5


# The federated settings a harness task runs with unless a test says otherwise.
FED = {
    "protocol": "fedavg",
    "aggregator": "fedavg",
    "rounds": 2,
    "min_nodes": 1,
    "max_nodes": 100,
    "fanout": 2,
    "mu": 0.0,
    "deadline_s": 10.0,
    "differential_privacy": {"enabled": False},
}


@dataclass
class Node:
    index: int
    identity: Identity
    core: NodeCore
    alive: bool = True
    events: list[dict[str, Any]] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)
    ended: list[TaskEnded] = field(default_factory=list)
    fail_jobs: dict[JobStep, str] = field(default_factory=dict)  # step -> error
    job_delay: dict[JobStep, float] = field(default_factory=dict)  # step -> extra seconds
    fail_aggregate: bool = False
    snapshots: dict[str, bytes] = field(default_factory=dict)  # what survives a restart

    @property
    def peer(self) -> str:
        return self.identity.peer_id


class Harness:
    def __init__(
        self,
        n: int,
        *,
        taskpack: str = "fedavg-mlp-digits",
        rows: list[int] | None = None,
        seed: int = 1,
        full_mesh: bool = True,
        sites: dict[int, Callable[[list[str]], Any]] | None = None,
        labels: dict[int, dict[str, str]] | None = None,
    ) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._timers: dict[tuple[int, Any], int] = {}  # (node, key) -> live seq
        self.blobs: dict[str, bytes] = {}
        self.outgoing: Callable[[Node, Any], Any] | None = None  # (node, cmd) -> cmd | None
        self.slice_works: list[SliceWork] = []  # reduce-scatter steps asked for, in order
        self.fetched: list[tuple[int, str]] = []  # (node, cid) of every FetchBlob
        self.manifest = load_manifest(ROOT / "taskpacks" / taskpack)
        self.rows = rows or [100] * n
        self.seed, self.full_mesh = seed, full_mesh
        self.sites = sites or {}  # node -> (peer ids of all nodes -> its SitePolicy)
        self.labels = labels or {}  # node -> its site labels (region=eu)
        self.peer_ids = [
            Identity.from_seed(hashlib.sha256(f"harness|{seed}|{i}".encode()).digest()).peer_id
            for i in range(n)
        ]
        archive = b"taskpack archive " + taskpack.encode()
        ref = make_blob_ref(archive)
        self.blobs[ref.cid] = archive
        self.cid = ref.cid
        publisher = Identity.from_seed(hashlib.sha256(f"harness|{seed}|0".encode()).digest())
        self.announce = TaskpackAnnounce(
            self.manifest.canonical_bytes(), ref, publisher.peer_id, b"\0" * 64
        )
        self.nodes: list[Node] = [Node(i, *self._core(i)) for i in range(n)]
        for a in self.nodes:
            for b in self.nodes:
                if a is not b:
                    self._feed(a, PeerConnected(b.peer, ()))

    def _core(self, i: int, restarts: int = 0) -> tuple[Identity, NodeCore]:
        identity = Identity.from_seed(hashlib.sha256(f"harness|{self.seed}|{i}".encode()).digest())
        core = NodeCore(
            identity,
            policy=TrustPolicy(frozenset(), True),
            capabilities={"labels": self.labels.get(i, {})},
            datasets={"data": DatasetInfo("data", self.rows[i], [])},
            caps_interval_s=None,
            rng=random.Random(self.seed * 1000 + i + 7919 * restarts),
            site=self.sites[i](self.peer_ids) if i in self.sites else None,
        )
        core.full_mesh = self.full_mesh
        core.book.publish_local(self.announce)  # verified everywhere: the book has its own tests
        return identity, core

    def restart(self, index: int) -> None:
        """A crashed node comes back: a fresh core, its snapshots from 'disk', reconnected."""
        node = self.nodes[index]
        node.identity, node.core = self._core(index, restarts=1)
        node.alive = True
        for other in self.nodes:
            if other is not node and other.alive:
                self._feed(node, PeerConnected(other.peer, ()))
                self._feed(other, PeerConnected(node.peer, ()))
        for data in list(node.snapshots.values()):
            self._execute(node, node.core.resume(data, self.now))

    # --- running -----------------------------------------------------------------------

    def at(self, delay: float, fn: Callable[[], None]) -> int:
        self._seq += 1
        heapq.heappush(self._heap, (self.now + delay, self._seq, fn))
        return self._seq

    def run(self, until: float = 1e9, max_steps: int = 200_000) -> None:
        steps = 0
        while self._heap and steps < max_steps:
            t, _, fn = self._heap[0]
            if t > until:
                break
            heapq.heappop(self._heap)
            self.now = max(self.now, t)
            fn()
            steps += 1
        assert steps < max_steps, "harness: no quiescence (a loop?)"

    def offer(self, node: int = 0, **federated: Any) -> str:
        fed = {**FED, **federated}
        # Task parameters the core reads (not manifest fields): moved to the offer's params.
        params = {k: fed.pop(k) for k in ("max_update_norm", "aggregation") if k in fed}
        core = self.nodes[node].core
        task_id, cmds = core.create_task(
            self.cid, params, fed, ("data",), self.now, volunteer_window_s=3.0
        )
        self._execute(self.nodes[node], cmds)
        return task_id

    def crash(self, index: int) -> None:
        node = self.nodes[index]
        node.alive = False
        for other in self.nodes:
            if other is not node and other.alive:
                self._feed(other, PeerDisconnected(node.peer))

    def inject(
        self, sender: Node, topic: str | None, msg: Any, to: list[int] | None = None
    ) -> None:
        """Put `msg` on the wire as `sender` (a topic: everyone; None: a direct message)."""
        data = encode(msg)
        for node in self.nodes:
            if node.alive and (to is None or node.index in to):
                self.at(LATENCY_S, lambda n=node: self._feed(n, Message(topic, sender.peer, data)))

    # --- views -------------------------------------------------------------------------

    def machines(self, task_id: str) -> list[TaskMachine]:
        return [n.core.tasks[task_id] for n in self.nodes if n.alive and task_id in n.core.tasks]

    def model(self, cid: str) -> dict[str, np.ndarray]:
        return decode_tensors(self.blobs[cid])

    def results(self, task_id: str) -> list[Any]:
        return [m.result for m in self.machines(task_id)]

    def logs(self, level: str | None = None) -> list[str]:
        return [text for n in self.nodes for lvl, text in n.logs if level in (None, lvl)]

    # --- the driver's part ---------------------------------------------------------------

    def _feed(self, node: Node, event: Any) -> None:
        if node.alive:
            self._execute(node, node.core.handle(event, self.now))

    def _execute(self, node: Node, cmds: list[Any]) -> None:
        i = 0
        while i < len(cmds):
            cmd = cmds[i]
            group = 1
            while (
                isinstance(cmd, Send)
                and i + group < len(cmds)
                and isinstance(cmds[i + group], Send)
                and cmds[i + group].msg is cmd.msg
            ):
                group += 1
            # A message sent directly with a gossip copy (task.to_participants) too.
            backup = (
                group > 1
                and i + group < len(cmds)
                and isinstance(cmds[i + group], Publish)
                and cmds[i + group].msg is cmd.msg
            )
            sends, i = cmds[i : i + group], i + group + int(backup)
            if self.outgoing is None or not isinstance(cmd, Publish | Send):
                for one in cmds[i - group - int(backup) : i]:
                    self._one(node, one)
                continue
            if group == 1:
                cmd = self.outgoing(node, cmd)
                if cmd is not None:
                    self._one(node, cmd)
                continue
            # One message sent directly to every participant (core/scatter.py tell) is
            # shown to the hook once, as the broadcast it is; what the hook returns goes
            # to every one of them.
            seen = self.outgoing(node, Publish(TOPIC_TASKS, cmd.msg))
            if seen is not None:
                for send in sends:
                    self._one(node, replace(send, msg=seen.msg))
                if backup:
                    self._one(node, seen)

    def _one(self, node: Node, cmd: Any) -> None:
        if isinstance(cmd, Publish):
            data = encode(cmd.msg)
            for other in self.nodes:  # a publisher receives its own message too
                self.at(
                    LATENCY_S, lambda o=other: self._feed(o, Message(cmd.topic, node.peer, data))
                )
        elif isinstance(cmd, Send):
            target = next((n for n in self.nodes if n.peer == cmd.peer), None)
            if target is not None:
                data = encode(cmd.msg)
                self.at(LATENCY_S, lambda: self._feed(target, Message(None, node.peer, data)))
        elif isinstance(cmd, SetTimer):
            key = (node.index, cmd.key)
            seq = self.at(max(0.0, cmd.deadline - self.now), lambda: self._timer(node, key, seq))
            self._timers[key] = seq
        elif isinstance(cmd, CancelTimer):
            self._timers.pop((node.index, cmd.key), None)
        elif isinstance(cmd, FetchBlob):
            cid = cmd.ref.cid
            self.fetched.append((node.index, cid))
            ok = cid in self.blobs
            event = BlobReady(cid) if ok else BlobFailed(cid, "no provider holds it")
            self.at(LATENCY_S, lambda: self._feed(node, event))
        elif isinstance(cmd, CheckArchive):
            self.at(0, lambda: self._feed(node, ArchiveChecked(cmd.cid, None)))
        elif isinstance(cmd, RunJob):
            delay = JOB_S + node.job_delay.get(cmd.token.step, 0.0)
            self.at(delay, lambda: self._feed(node, self._job(node, cmd)))
        elif isinstance(cmd, Aggregate):
            self.at(0, lambda: self._feed(node, self._aggregate(node, cmd)))
        elif isinstance(cmd, SliceWork):
            self.at(0, lambda: self._feed(node, self._slice_work(node, cmd)))
        elif isinstance(cmd, Emit):
            node.events.append(cmd.event.as_dict())
        elif isinstance(cmd, TaskEnded):
            node.ended.append(cmd)
        elif isinstance(cmd, Persist):
            data = cmd.data()
            if data is None:
                node.snapshots.pop(cmd.task_id, None)
            else:
                node.snapshots[cmd.task_id] = data
        elif isinstance(cmd, Log):
            node.logs.append((cmd.level, cmd.text))

    def _timer(self, node: Node, key: tuple[int, Any], seq: int) -> None:
        if self._timers.get(key) == seq:
            del self._timers[key]
            self._feed(node, TimerFired(key[1]))

    def put(self, weights: dict[str, np.ndarray]) -> Any:
        data = bytes(encode_tensors(weights))
        ref = make_blob_ref(data)
        self.blobs[ref.cid] = data
        return ref

    def _job(self, node: Node, cmd: RunJob) -> JobDone | JobFailed:
        step = cmd.token.step
        if step in node.fail_jobs:
            return JobFailed(cmd.token, node.fail_jobs[step])
        job = cmd.job
        rows = node.core.datasets["data"].rows
        if step is JobStep.VALIDATE:
            return JobDone(cmd.token, None)
        if step is JobStep.INIT:
            zeros = {"w": np.zeros(4, np.float32), "id": np.zeros(2, np.float32)}
            return JobDone(cmd.token, self.put(zeros))
        if step is JobStep.TRAIN:
            if job.get("weights") is None:  # analysis: one execution
                aggregates = {"sum": float(rows), "n": rows}
                return JobDone(
                    cmd.token, {"num_samples": rows, "metrics": {}, "aggregates": aggregates}
                )
            base = self.model(job["weights"].cid)["w"]
            # "id" makes every node's update its own blob (two equal updates would share
            # a cid, and a cid is owned by its first announcer).
            tag = np.array([node.index + 1, job["round"]], np.float32)
            update = {"w": (base + (node.index + 1)).astype(np.float32), "id": tag}
            return JobDone(
                cmd.token,
                {"ref": self.put(update), "num_samples": rows, "metrics": {"loss": 1.0}},
            )
        if step is JobStep.EVALUATE:
            return JobDone(cmd.token, {"accuracy": 0.5})
        if step is JobStep.FINALIZE:
            partial = SimpleNamespace(
                num_samples=job["num_samples"], metrics=job["metrics"], aggregates=job["aggregates"]
            )
            return JobDone(cmd.token, partial)
        if step is JobStep.REDUCE:
            total = sum(p["num_samples"] for p in job["partials"])
            return JobDone(cmd.token, {"num_samples": total, "nodes": len(job["partials"])})
        raise AssertionError(step)

    def _slice_work(self, node: Node, cmd: SliceWork) -> SliceWorked:
        if node.fail_aggregate and cmd.token.kind != "cut":
            return SliceWorked(cmd.token, (), "MemoryError: out of memory")
        blobs, bad, reason, chosen, values = slice_work(
            cmd.token.kind,
            [self.blobs[r.cid] for r in cmd.refs],
            self.blobs[cmd.reference.cid],
            cmd.count,
            cmd.token.index,
            cmd.method,
            cmd.weights,
            cmd.options,
        )
        self.slice_works.append(cmd)
        refs = tuple(self.put_bytes(b) for b in blobs)
        return SliceWorked(cmd.token, refs, reason, bad, chosen, values)

    def put_bytes(self, data: bytes) -> Any:
        ref = make_blob_ref(data)
        self.blobs[ref.cid] = data
        return ref

    def _aggregate(self, node: Node, cmd: Aggregate) -> Aggregated:
        if node.fail_aggregate:
            return Aggregated(cmd.token, None, "MemoryError: out of memory")
        try:
            data, dropped = aggregate_checked(
                cmd.method,
                [(r.cid, self.blobs[r.cid], w) for r, w in zip(cmd.refs, cmd.weights, strict=True)],
                reference=self.blobs[cmd.reference.cid] if cmd.reference else None,
                max_norm=cmd.max_norm,
                options=cmd.options,
            )
        except ValueError as exc:
            return Aggregated(cmd.token, None, str(exc))
        ref = make_blob_ref(data)
        self.blobs[ref.cid] = data
        return Aggregated(cmd.token, ref, dropped=dropped)


def tap(h: Harness) -> tuple[list[tuple[int, str, Any]], list[Callable[[int, Any], bool]]]:
    """Record every Send and Publish as it leaves a node, after the `outgoing` hook, as
    (node index, "Send" | "Publish", command); `drop` holds predicates (node index,
    command) -> True that lose that one command on the way (one direct copy, say)."""
    seen: list[tuple[int, str, Any]] = []
    drop: list[Callable[[int, Any], bool]] = []
    one = h._one

    def record(node: Node, cmd: Any) -> None:
        if isinstance(cmd, Send | Publish):
            seen.append((node.index, type(cmd).__name__, cmd))
            if any(rule(node.index, cmd) for rule in drop):
                return
        one(node, cmd)

    h._one = record  # type: ignore[method-assign]
    return seen, drop


def done(h: Harness, task_id: str) -> list[TaskMachine]:
    """Every live machine of the task, asserting they all ended in the same result."""
    machines = h.machines(task_id)
    assert machines and all(m.result is not None for m in machines), [
        (m.phase, m.reason) for m in machines
    ]
    assert len({encode(m.result) for m in machines}) == 1
    return machines


def phases(h: Harness, task_id: str) -> list[Phase]:
    return [m.phase for m in h.machines(task_id)]


T = TypeVar("T")


def carried(cmd: Any, kind: type[T], how: type | tuple[type, ...] = (Publish, Send)) -> T | None:
    """The `kind` message a Publish or Send (`how`) carries, signed or not, or None."""
    if not isinstance(cmd, how):
        return None
    msg = cmd.msg
    if isinstance(msg, Signed) and msg.kind == type_name(kind):
        msg = unseal(msg, kind)
    return msg if isinstance(msg, kind) else None


def update_in(cmd: Any) -> RoundUpdate | None:
    """The RoundUpdate a Publish carries, or None."""
    return carried(cmd, RoundUpdate, Publish)


def as_sent(node: Node, original: Any, msg: Any) -> Any:
    """`msg` in the form `original` went out in: signed by `node` if it was signed."""
    return seal(node.identity, msg) if isinstance(original, Signed) else msg


def with_update(node: Node, cmd: Publish, update: RoundUpdate) -> Publish:
    """`cmd` carrying `update` instead, signed by `node` as the original was."""
    return replace(cmd, msg=as_sent(node, cmd.msg, update))
