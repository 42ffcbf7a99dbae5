"""Every message the protocol puts on the wire (typed, versioned, validated on receipt).

Topics: taskpack announcements, capability records and task messages each have a GossipSub
topic. Anything large (taskpack archives, model updates, final models) is a blob, named
here only by its BlobRef (cid + per-chunk hashes, so chunks are verified as they arrive).

Records that must be checkable later, off the wire (offers, volunteers, rosters, results,
capabilities) travel inside a `Signed` envelope; the rest are authenticated by the transport
(GossipSub message signing, Noise sessions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pfl.core.flowrec import MAX_FLOW_STEPS, FlowRecord
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Json, message

TOPIC_TASKPACKS = "p2pfl/v1/taskpacks"
TOPIC_CAPABILITIES = "p2pfl/v1/capabilities"
TOPIC_TASKS = "p2pfl/v1/tasks"
TOPICS = (TOPIC_TASKPACKS, TOPIC_CAPABILITIES, TOPIC_TASKS)


# --- fixed-format tokens ----------------------------------------------------------------
# Ids from the wire are opaque tokens of one fixed format, checked at decode time (a
# dataclass __post_init__ refusal becomes a RemoteProtocolError in the codec): a task id
# can never be "../../x", so no code path can turn one into a surprising file name.

TASK_ID_HEX = 32  # hex digits of a task id (128 bits of sha256)
NONCE_BYTES = 16  # offer nonces and volunteer ranking nonces
_TASK_ID = re.compile(f"[0-9a-f]{{{TASK_ID_HEX}}}")
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,64}")  # base58btc multihash


def check_task_id(value: str) -> None:
    if type(value) is not str or not _TASK_ID.fullmatch(value):
        raise ValueError(f"task_id must be {TASK_ID_HEX} lowercase hex digits")


def check_peer_id(value: str, what: str = "peer") -> None:
    if type(value) is not str or not _PEER_ID.fullmatch(value):
        raise ValueError(f"{what} is not a peer id")


def check_peers(values: tuple[str, ...], what: str) -> None:
    for value in values:
        check_peer_id(value, what)


def _check_task(task_id: str, peer: str) -> None:
    check_task_id(task_id)
    check_peer_id(peer)


MAX_CALL_PARTS = 256  # a call of MAX_NODES records fits
MAX_CALL_PART_RECORDS = 4096
# A signed Volunteer is about 300 bytes (450 with a rollout cid and a group label), so a
# call holds at most ~1 KiB per record of the offer's max_nodes (checked as parts arrive).
MAX_CALL_RECORD_BYTES = 1024
LABEL_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # site label names and values
MAX_REASON = 2000  # characters of a decline's, withdrawal's or cancel's reason


def _check_reason(reason: str) -> None:
    if len(reason) > MAX_REASON:
        raise ValueError(f"reason longer than {MAX_REASON} characters")


def _check_nonce(nonce: bytes, what: str) -> None:
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"{what} must be {NONCE_BYTES} bytes")


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
    """A publisher's signed offer. `task_id` is derived from every other field
    (core/offer.py `derive_task_id`, re-derived by every receiver), so nobody can pick it."""

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
    nonce: bytes  # the publisher's fresh randomness (NONCE_BYTES), part of the task id
    max_update_norm: float = 0.0  # > 0: an update farther than this from the model is dropped
    # Versions (core/versions.py): the range the requester asked for ("" = exactly
    # `version`), and for a partial rollout its arms [[version, cid, model schema, share]].
    range: str = ""
    rollout: Json = None
    # A flow's step (core/flowrec.py): the whole flow, this step's index in it, and the
    # result model of an earlier step that this step works on (fetched by its BlobRef).
    flow: FlowRecord | None = None
    step: int = 0
    model: BlobRef | None = None
    # How each node runs it (p2pfl.runtime.batching.RunOptions): None, or {test_run: N,
    # new_data_only: bool, rerun_failed: bool}. Signed and in the task id: nodes enforce it.
    run: Json = None

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.publisher)
        _check_nonce(self.nonce, "nonce")
        if not 0 <= self.step < MAX_FLOW_STEPS:
            raise ValueError(f"step must be in [0, {MAX_FLOW_STEPS})")


@message("task.volunteer")
@dataclass(frozen=True, slots=True)
class Volunteer:
    """A node's signed offer to take part. `commit` is sha256 of a secret ranking nonce it
    reveals later (`Reveal`): ranks mix every volunteer's nonce, so neither the offerer
    (who picks the task id) nor one volunteer can choose to rank first."""

    task_id: str
    peer: str
    num_samples: int
    commit: bytes
    cid: str = ""  # a rollout's volunteer: the archive (version) it runs, by the rule
    # Hierarchical offers grouped by a site label (aggregation.group_by): the volunteer's
    # value of that label ("" if it has none); carried in the roster, so every node can
    # form the same groups (core/hierarchy.py).
    group: str = ""

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        if self.num_samples < 0:
            raise ValueError("num_samples must be >= 0")
        if len(self.commit) != 32:
            raise ValueError("commit must be 32 bytes")
        if len(self.cid) > 128:
            raise ValueError("cid longer than 128 characters")
        if self.group and not LABEL_RE.fullmatch(self.group):
            raise ValueError("group must be 1-64 letters, digits, '.', '_', '-'")


@message("task.reveal")
@dataclass(frozen=True, slots=True)
class Reveal:
    """A volunteer's ranking nonce, published once volunteering is over (signed)."""

    task_id: str
    peer: str
    nonce: bytes

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_nonce(self.nonce, "nonce")


@message("task.decline")
@dataclass(frozen=True, slots=True)
class Decline:
    """A node will not take part (before the roster) or withdraws (after it), and why."""

    task_id: str
    peer: str
    reason: str

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_reason(self.reason)


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
    # The revealed ranking nonce of each carried volunteer, in the same order: each is
    # checked against the commitment in that volunteer's own signed record, so it needs no
    # signature of its own (16 bytes instead of a signed envelope: rosters of 1,000 nodes
    # stay well inside one gossip message).
    nonces: tuple[bytes, ...]
    # A large task's compact roster (core/call.py): the call it ranks (its digest), the
    # committee's revealed nonces (in committee order, b"" for one that did not reveal) and
    # the volunteers skipped as gone. Participants and records are then left out on the
    # wire: every node derives the participants from the call it holds.
    call: bytes = b""
    committee: tuple[bytes, ...] = ()
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.coordinator)
        check_peers(self.participants, "participant")
        if len(self.nonces) != len(self.volunteers):
            raise ValueError("one nonce per carried volunteer record")
        if self.call and len(self.call) != 32:
            raise ValueError("call must be a 32-byte digest")
        if len(self.committee) > 64 or any(n and len(n) != NONCE_BYTES for n in self.committee):
            raise ValueError(f"committee: at most 64 nonces of {NONCE_BYTES} bytes")
        check_peers(self.skipped, "skipped peer")


@message("task.call")
@dataclass(frozen=True, slots=True)
class CallPart:
    """Part `part` of `parts` of a large task's call: the signed volunteer records its
    publisher received, in peer order (core/call.py). Signed by the publisher."""

    task_id: str
    publisher: str
    part: int
    parts: int
    records: tuple[bytes, ...]  # each an encoded Signed(Volunteer)

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.publisher)
        if not 0 <= self.part < self.parts <= MAX_CALL_PARTS:
            raise ValueError(f"part {self.part} of {self.parts}: parts are 1 to {MAX_CALL_PARTS}")
        if not 1 <= len(self.records) <= MAX_CALL_PART_RECORDS:
            raise ValueError(f"a call part carries 1 to {MAX_CALL_PART_RECORDS} records")
        if any(len(r) > MAX_CALL_RECORD_BYTES for r in self.records):
            raise ValueError(f"a volunteer record longer than {MAX_CALL_RECORD_BYTES} bytes")


@message("task.update")
@dataclass(frozen=True, slots=True)
class RoundUpdate:
    """A participant's local update for a round (fedavg/fedprox), fetched by cid (under
    reduce-scatter, core/scatter.py, its slices are offered to their owners directly)."""

    task_id: str
    round: int
    peer: str
    ref: BlobRef | None  # None: no contribution this round (see `status`)
    num_samples: int
    metrics: Json
    status: str = "ok"  # ok | failed | withdrawn

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        if self.round < 1 or self.num_samples < 0:
            raise ValueError("round must be >= 1 and num_samples >= 0")


@message("task.update-ask")
@dataclass(frozen=True, slots=True)
class UpdateAsk:
    """A participant holding a close that includes an update which never reached it asks
    the update's author, directly, for it once more: updates go only directly when every
    participant is a connection away (TaskMachine.to_participants), and a direct message
    can be lost. Answered to the asker only, a bounded number of times."""

    task_id: str
    round: int
    peer: str  # who asks

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        if self.round < 1:
            raise ValueError("round must be >= 1")


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

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        check_peers(self.included, "included")
        check_peers(self.dead, "dead")
        if self.round < 1 or self.attempt < 0:
            raise ValueError("round must be >= 1 and attempt >= 0")


@message("task.push")
@dataclass(frozen=True, slots=True)
class GossipPush:
    """A push-sum share sent directly to one chosen peer (gossip protocol)."""

    task_id: str
    round: int
    peer: str
    ref: BlobRef | None  # None: the sender had nothing to send this round (failed)
    mass: float

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        if self.round < 1 or not self.mass >= 0.0:
            raise ValueError("round must be >= 1 and mass >= 0")


@message("task.progress")
@dataclass(frozen=True, slots=True)
class Progress:
    """A participant's state for whoever follows the task (sent to the publisher)."""

    task_id: str
    peer: str
    round: int
    state: str
    metrics: Json

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)


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

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        if self.num_samples < 0 or not self.mass >= 0.0:
            raise ValueError("num_samples and mass must be >= 0")


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
    # A large task (core/call.py) names who did NOT contribute instead: `participants` is
    # then empty, and the contributors are the roster (which every node derives) less these.
    absent: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.reducer)
        check_peers(self.participants, "participant")
        check_peers(self.absent, "absent participant")
        if self.participants and self.absent:
            raise ValueError("a result names its contributors or its absentees, not both")
        if self.status not in ("succeeded", "failed"):
            raise ValueError("status must be succeeded or failed")


@message("task.cancel")
@dataclass(frozen=True, slots=True)
class Cancel:
    """The task's publisher ends it for every participant (signed; from anyone else it is
    refused)."""

    task_id: str
    publisher: str
    reason: str

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.publisher)
        _check_reason(self.reason)
