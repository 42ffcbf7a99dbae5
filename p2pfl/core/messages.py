"""Every message the protocol puts on the wire (typed, versioned, validated on receipt).

Topics: taskpack announcements, capability records and task messages each have a GossipSub
topic. Anything large (taskpack archives, model updates, final models) is a blob, named
here only by its BlobRef (cid + per-chunk hashes, so chunks are verified as they arrive).

Records that must be checkable later, off the wire (offers, volunteers, rosters, results,
capabilities) travel inside a `Signed` envelope; the rest are authenticated by the transport
(GossipSub message signing, Noise sessions).
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Json, message

TOPIC_TASKPACKS = "p2pfl/v1/taskpacks"
TOPIC_CAPABILITIES = "p2pfl/v1/capabilities"
TOPIC_TASKS = "p2pfl/v1/tasks"
TOPICS = (TOPIC_TASKPACKS, TOPIC_CAPABILITIES, TOPIC_TASKS)


# --- taskpacks -------------------------------------------------------------------------


@message("taskpack.announce")
@dataclass(frozen=True, slots=True)
class TaskpackAnnounce:
    """A publisher's signed manifest for an archive (signature over manifest + cid)."""

    manifest: bytes  # canonical manifest bytes (what the signature covers)
    ref: BlobRef  # the archive: cid, size and chunk hashes
    publisher: str
    sig: bytes


@message("taskpack.have")
@dataclass(frozen=True, slots=True)
class TaskpackHave:
    """The sender serves `cid` (swarming): all of it, or while it downloads the chunks in
    `chunks`, a bitmap (chunk i is bit 7 - i % 8 of byte i // 8; b"" means every chunk)."""

    cid: str
    chunks: bytes = b""


@message("taskpack.sync")
@dataclass(frozen=True, slots=True)
class TaskpackSync:
    """Sent directly to a newly connected peer: the announcements we know of."""

    announcements: tuple[TaskpackAnnounce, ...]


# --- capabilities ----------------------------------------------------------------------


@message("capability")
@dataclass(frozen=True, slots=True)
class Capability:
    peer: str
    cpus: int
    memory_bytes: int
    disk_free_bytes: int
    gpu: bool
    python: str
    torch: str
    datasets: Json  # [{"name", "type", "columns": [...], "rows"}] -- never rows' contents
    issued: float
    expires: float


# --- tasks -----------------------------------------------------------------------------


@message("task.offer")
@dataclass(frozen=True, slots=True)
class TaskOffer:
    task_id: str
    cid: str  # the taskpack archive
    name: str
    version: str
    type: str  # training | analysis | ...
    publisher: str
    params: Json  # validated task parameters
    protocol: str  # fedavg | fedprox | gossip
    aggregator: str
    rounds: int
    min_nodes: int
    max_nodes: int
    fanout: int
    mu: float
    dp: Json  # None or {"epsilon", "delta", "max_grad_norm"}
    inputs: tuple[str, ...]  # dataset names the task reads
    created: float
    volunteer_deadline: float  # absolute time
    round_timeout_s: float


@message("task.volunteer")
@dataclass(frozen=True, slots=True)
class Volunteer:
    task_id: str
    peer: str
    num_samples: int


@message("task.decline")
@dataclass(frozen=True, slots=True)
class Decline:
    task_id: str
    peer: str
    reason: str


@message("task.roster")
@dataclass(frozen=True, slots=True)
class Roster:
    """The coordinator's pick: best-ranked volunteers first. Checkable by anyone: it
    carries every volunteer's own signed record."""

    task_id: str
    coordinator: str
    epoch: int  # 0 for the best-ranked coordinator, k for the k-th takeover
    participants: tuple[str, ...]
    volunteers: tuple[bytes, ...]  # each an encoded Signed(Volunteer)


@message("task.update")
@dataclass(frozen=True, slots=True)
class RoundUpdate:
    """A participant's local update for a round (fedavg/fedprox), fetched by cid."""

    task_id: str
    round: int
    peer: str
    ref: BlobRef | None  # None: no contribution this round (see `status`)
    num_samples: int
    metrics: Json
    status: str = "ok"  # ok | failed | withdrawn


@message("task.close")
@dataclass(frozen=True, slots=True)
class RoundClose:
    """The acting coordinator fixes which updates make round `round`: everyone averages
    exactly these, in sorted order, so all honest participants hold the same model."""

    task_id: str
    round: int
    peer: str
    included: tuple[str, ...]
    dead: tuple[str, ...] = ()
    attempt: int = 0  # a re-close of the same round (an included update was unfetchable)


@message("task.push")
@dataclass(frozen=True, slots=True)
class GossipPush:
    """A push-sum share sent directly to one chosen peer (gossip protocol)."""

    task_id: str
    round: int
    peer: str
    ref: BlobRef | None  # None: the sender had nothing to send this round (failed)
    mass: float


@message("task.progress")
@dataclass(frozen=True, slots=True)
class Progress:
    """A participant's state for whoever follows the task (sent to the publisher)."""

    task_id: str
    peer: str
    round: int
    state: str
    metrics: Json


@message("task.partial")
@dataclass(frozen=True, slots=True)
class FinalPartial:
    task_id: str
    peer: str
    num_samples: int
    metrics: Json
    aggregates: Json
    model: BlobRef | None
    refused: str = ""  # non-empty: the node declined to release (reason)
    mass: float = 0.0  # gossip: the push-sum weight of `model` (the reducer averages by it)


@message("task.result")
@dataclass(frozen=True, slots=True)
class TaskResult:
    task_id: str
    status: str  # succeeded | failed
    reason: str
    reducer: str
    participants: tuple[str, ...]
    rounds: int
    metrics: Json
    model: BlobRef | None
    created: float
