"""What the sans-IO core asks its driver to do, and what the driver tells it back.

The core never performs I/O: every handler returns a list of these commands. The driver
(p2pfl.driver) carries them out over the real network (trio + libp2p) or the simulated one
(a discrete-event hub) and feeds the outcomes back as the events at the bottom.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pfl.core.tokens import AggToken, JobToken, SliceToken, Timer
from p2pfl.store.blobref import BlobRef

# --- commands (core -> driver) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    msg: Any  # a wire message (p2pfl.core.messages); the driver encodes it


@dataclass(frozen=True, slots=True)
class Send:
    peer: str
    msg: Any
    # A blob the receiver fetches as soon as it reads `msg` (a slice offered to its owner, a
    # combined slice told to a participant): the driver may send its bytes along, so the
    # receiver need not ask for them (driver.py, Attached). Only a hint: it is ignored
    # when too big for a direct message, and the receiver takes it only for a fetch of
    # that very blob that `msg` starts, after checking its hash.
    attach: BlobRef | None = None


@dataclass(frozen=True, slots=True)
class FetchBlob:
    """Get blob `ref` from `providers` (more may be added later); answer BlobReady/BlobFailed."""

    ref: BlobRef
    providers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AddProviders:
    cid: str
    providers: tuple[str, ...]
    # Chunk bitmap the providers hold (see TaskpackHave.chunks); None: the whole blob.
    chunks: bytes | None = None


@dataclass(frozen=True, slots=True)
class ForgetBlobs:
    """These blobs are no longer needed by this task (old rounds' updates and models):
    the driver may delete them, so a long task does not fill the disk."""

    cids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SetTimer:
    key: Timer
    deadline: float  # absolute, on the driver's clock (the same clock `now` comes from)


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: Timer


@dataclass(frozen=True, slots=True)
class CheckArchive:
    """Verify a fetched taskpack archive against its signed manifest and unpack it."""

    cid: str
    manifest: bytes


@dataclass(frozen=True, slots=True)
class RunJob:
    """Run taskpack code (p2pfl.runtime job) for a task; answer JobDone/JobFailed."""

    task_id: str
    job: Any
    token: JobToken


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Combine update blobs (in this order) into a new model blob; answer Aggregated.

    method: an aggregator name (fedavg|median|trimmed_mean|krum) or "pushsum" (push-sum
    merge: the mass-weighted mean of estimates, masses as floats).

    Before combining, every update is checked against `reference` (the model the round
    started from): tensor names, shapes and dtypes must match, values must be finite and,
    if `max_norm` > 0, the distance ||update - reference|| at most `max_norm`. An update
    failing a check is left out (Aggregated.dropped says which and why). The check is a
    pure function of the bytes, so every honest node leaves out the same updates."""

    task_id: str
    round: int
    refs: tuple[BlobRef, ...]
    weights: tuple[float, ...]
    method: str
    token: AggToken
    options: dict = field(default_factory=dict)
    reference: BlobRef | None = None
    max_norm: float = 0.0


@dataclass(frozen=True, slots=True)
class SliceWork:
    """Reduce-scatter work on models cut into `count` slices (fl/slices.py), shaped by
    the model `reference`; answer SliceWorked with the same token. token.kind:
    cut: the update refs[0] -> its `count` slice blobs;
    reduce: slice token.index of each update (refs, in order) combined by `method`
      (weights, options as for Aggregate) -> one blob, or the first malformed input;
    assemble: the `count` combined slices (refs, slice order) -> the model;
    distances (Krum): slice token.index of each update -> their n x n squared distances;
    krum: the `count` distance matrices (slice order), n = len(weights), options f -> the
      position Krum chooses (SliceWorked.chosen);
    sketch, check: slices (options indices: each one's index, seed: hex) -> their
      sketches, or the combined slices' checks (SliceWorked.values; core/sketch.py)."""

    refs: tuple[BlobRef, ...]
    count: int
    reference: BlobRef
    token: SliceToken
    method: str = "fedavg"
    weights: tuple[float, ...] = ()
    options: dict = field(default_factory=dict)


class EventKind(enum.Enum):
    """What a follower's event is about (its value is the `kind` field followers read)."""

    STATE = "state"  # this node's own standing in the task (offered, declined...)
    NODE = "node"  # a participant's progress or state
    ROSTER = "roster"  # the roster was accepted
    ROUND = "round"  # an update announced in a round
    CLOSED = "closed"  # a round was closed (which updates make it)
    RESULT = "result"  # the signed result arrived: succeeded
    FAILED = "failed"  # the signed result arrived: failed
    LOG = "log"  # a line the task's code logged


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """A task event for whoever follows the task (control socket, simulator, logs)."""

    kind: EventKind
    task_id: str
    t: float
    message: str = ""
    peer: str | None = None
    round: int | None = None
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "kind": self.kind.value,
            "task_id": self.task_id,
            "message": self.message,
            "peer": self.peer,
            "round": self.round,
            "metrics": dict(self.metrics),
        }


@dataclass(frozen=True, slots=True)
class Emit:
    event: TaskEvent


@dataclass(frozen=True, slots=True)
class TaskEnded:
    """The task is over for this node (result, failure, decline, withdrawal, error): the
    driver ends its worker and wipes its scratch space. Nobody parses event text."""

    task_id: str
    status: str  # succeeded | failed | declined | withdrawn | errored | expired
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Audit:
    """A line for the site's audit log (DATA_DIR/audit.jsonl): offers with the decision and
    its rule, releases, privacy spending."""

    kind: str  # offer | release | privacy
    fields: dict


@dataclass(frozen=True, slots=True)
class ChargePrivacy:
    """Spend `epsilon` of each dataset's lifetime budget for this task (idempotent per
    task and dataset: the ledger keeps a task's cumulative spend)."""

    task_id: str
    datasets: tuple[str, ...]
    epsilon: float


@dataclass(frozen=True, slots=True)
class Persist:
    """Write what a restarted node needs to rejoin this task (atomically); None: forget
    it (the task is over). `build`, when set, makes the bytes: a large task's snapshot
    carries its call (megabytes), so it is only encoded where a driver writes it."""

    task_id: str
    snapshot: bytes | None
    build: Callable[[], bytes] | None = None

    def data(self) -> bytes | None:
        return self.build() if self.build is not None else self.snapshot


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # debug | info | warning | error
    text: str


Command = (
    Publish
    | Send
    | FetchBlob
    | AddProviders
    | ForgetBlobs
    | SetTimer
    | CancelTimer
    | CheckArchive
    | RunJob
    | Aggregate
    | SliceWork
    | Emit
    | TaskEnded
    | Audit
    | ChargePrivacy
    | Persist
    | Log
)

# --- events (driver -> core), besides the network's own events -------------------------


@dataclass(frozen=True, slots=True)
class TimerFired:
    key: Timer


@dataclass(frozen=True, slots=True)
class BlobReady:
    cid: str


@dataclass(frozen=True, slots=True)
class BlobFailed:
    cid: str
    reason: str


@dataclass(frozen=True, slots=True)
class ArchiveChecked:
    cid: str
    refusal: str | None  # None: verified and unpacked; else the reason code
    detail: str = ""


@dataclass(frozen=True, slots=True)
class JobDone:
    token: JobToken
    result: Any


@dataclass(frozen=True, slots=True)
class JobFailed:
    token: JobToken
    reason: str


@dataclass(frozen=True, slots=True)
class Aggregated:
    token: AggToken
    ref: BlobRef | None
    reason: str = ""  # non-empty when aggregation failed
    dropped: tuple[tuple[str, str], ...] = ()  # (cid, why) of updates left out


@dataclass(frozen=True, slots=True)
class SliceWorked:
    token: SliceToken
    refs: tuple[BlobRef, ...] = ()  # cut: the slices; reduce, assemble: one blob
    reason: str = ""  # non-empty: the work failed (a bug or a bad assembled slice)
    bad: int = -1  # reduce, distances: position of a malformed input; assemble, krum: index
    chosen: int = -1  # krum: the position of the update Krum picks
    values: tuple[float, ...] = ()  # sketch, check: the floats of core/sketch.py
