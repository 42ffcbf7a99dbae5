"""The state one node keeps about one task, and how followers see it.

`TaskState` holds the fields; the behaviour lives in `core/task.py` (offer, volunteering,
roster, timers), `core/rounds.py` (fedavg/fedprox rounds and push-sum gossip) and
`core/final.py` (final partials, reduce, result). They share this one state so that every
transition stays inspectable in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pfl.core.commands import Aggregate, Emit
from p2pfl.core.election import first_live
from p2pfl.core.messages import (
    FinalPartial,
    GossipPush,
    Roster,
    RoundClose,
    RoundUpdate,
    TaskOffer,
    TaskResult,
)
from p2pfl.identity import Identity
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed

GRACE_S = 2.0  # per rank position, before the next in line takes over a silent duty
REDUCER_CANDIDATES = 3  # final partials go to this many best-ranked live participants


@dataclass
class NodeState:
    """What the task's followers see of one participant."""

    state: str = "volunteered"
    round: int = 0
    loss: float | None = None
    accuracy: float | None = None
    epsilon: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "round": self.round,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "epsilon": self.epsilon,
        }


@dataclass
class LocalContext:
    """What the owning node knows that the task needs (datasets, policy)."""

    datasets: dict[str, int]  # name -> record count
    min_records: int = 10


@dataclass
class TaskState:
    offer: TaskOffer
    me: Identity
    local: LocalContext
    created_at: float
    phase: str = "pending"
    reason: str = ""
    volunteers: dict[str, Signed] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    declines: dict[str, str] = field(default_factory=dict)
    roster: Roster | None = None
    dead: set[str] = field(default_factory=set)
    withdrawn: set[str] = field(default_factory=set)
    round: int = 0
    global_ref: BlobRef | None = None
    mass: float = 0.0  # push-sum weight (gossip)
    updates: dict[int, dict[str, RoundUpdate]] = field(default_factory=dict)
    closes: dict[int, RoundClose] = field(default_factory=dict)
    pushes: dict[int, dict[str, GossipPush]] = field(default_factory=dict)
    my_update: dict[int, tuple[BlobRef, int]] = field(default_factory=dict)
    waiting_blobs: set[str] = field(default_factory=set)
    pending_aggregate: Aggregate | None = None
    partials: dict[str, FinalPartial] = field(default_factory=dict)
    reducing: bool = False
    final_merge: str = ""  # gossip reducer: "" -> "merging" -> "merged" (or "skipped")
    result: TaskResult | None = None
    result_signer: str = ""
    nodes: dict[str, NodeState] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    final_sent: bool = False
    fetch_retries: dict[str, int] = field(default_factory=dict)  # cid -> retries so far
    deadline_waits: dict[int, int] = field(default_factory=dict)  # round -> graces waited
    roster_publish: Any = None  # our roster's Publish command, if we coordinate
    # Blobs this task made or fetched, by round, so old rounds can be forgotten.
    round_blobs: dict[int, set[str]] = field(default_factory=dict)
    # Round messages that arrived before the roster (a fast peer can be rounds ahead):
    # replayed once the roster is accepted, instead of being lost.
    early: list[tuple[Any, str]] = field(default_factory=list)
    connected: set[str] = field(default_factory=set)  # peers the node is connected to
    # True when the driver knows this node is connected to every node of the network (a
    # small full mesh): only then can the roster be made before the volunteer deadline.
    full_mesh: bool = False

    # --- identity of the task -------------------------------------------------------

    @property
    def task_id(self) -> str:
        return self.offer.task_id

    @property
    def my_id(self) -> str:
        return self.me.peer_id

    @property
    def is_training(self) -> bool:
        return self.offer.type == "training"

    @property
    def participants(self) -> tuple[str, ...]:
        return self.roster.participants if self.roster else ()

    @property
    def participating(self) -> bool:
        return self.my_id in self.participants

    def live(self) -> list[str]:
        """Roster members still expected to contribute, in rank order."""
        return [p for p in self.participants if p not in self.dead and p not in self.withdrawn]

    def acting_coordinator(self) -> str | None:
        return first_live(self.participants, self.dead)

    # --- view for followers -----------------------------------------------------------

    def status(self) -> str:
        if self.result is not None:
            return self.result.status
        if self.phase == "failed":
            return "failed"
        return "running" if self.roster is not None else "pending"

    def summary(self) -> dict[str, Any]:
        result = self.result
        return {
            "task_id": self.task_id,
            "cid": self.offer.cid,
            "name": self.offer.name,
            "version": self.offer.version,
            "type": self.offer.type,
            "status": self.status(),
            "reason": result.reason if result else self.reason,
            "publisher": self.offer.publisher,
            "coordinator": self.roster.coordinator if self.roster else None,
            "reducer": result.reducer if result else first_live(self.participants, self.dead),
            "participants": list(self.participants),
            "round": self.round if self.participating else max(self.closes, default=0),
            "rounds": self.offer.rounds,
            "protocol": self.offer.protocol,
            "aggregator": self.offer.aggregator,
            "phase": self.phase,
            "nodes": {p: s.as_dict() for p, s in sorted(self.nodes.items())},
            "created": self.offer.created,
        }

    def result_dict(self) -> dict[str, Any] | None:
        r = self.result
        if r is None:
            return None
        return {
            "task_id": r.task_id,
            "status": r.status,
            "reason": r.reason,
            "participants": list(r.participants),
            "rounds": r.rounds,
            "metrics": r.metrics,
            "model_cid": r.model.cid if r.model else None,
            "reducer": r.reducer,
            "signer": self.result_signer,
            "signature_ok": True,  # unsealed with a valid signature, or it would not be here
            "name": self.offer.name,
            "version": self.offer.version,
            "cid": self.offer.cid,
            "created": r.created,
        }

    def _event(self, kind: str, now: float, message: str = "", **extra: Any) -> Emit:
        event = {"t": now, "kind": kind, "task_id": self.task_id, "message": message}
        event.update(extra)
        event.setdefault("peer", None)
        event.setdefault("round", None)
        event.setdefault("metrics", {})
        # No task summary here: building one is O(participants) and events are many. The
        # real node attaches the current summary for its followers (node.py).
        return Emit(event)


def _jsonable(value: Any) -> Any:
    """Reduce output as msgpack-native values (numpy scalars and arrays become Python)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)
