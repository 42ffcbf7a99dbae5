"""What the sans-IO core asks its driver to do, and what the driver tells it back.

The core never performs I/O: every handler returns a list of these commands. The driver
(p2pfl.driver) carries them out over the real network (trio + libp2p) or the simulated one
(a discrete-event hub) and feeds the outcomes back as the events at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    key: tuple
    deadline: float  # absolute, on the driver's clock (the same clock `now` comes from)


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: tuple


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
    token: tuple


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Combine update blobs (in this order) into a new model blob; answer Aggregated.

    method: an aggregator name (fedavg|median|trimmed_mean|krum) or "pushsum" (sum of
    mass-weighted shares)."""

    task_id: str
    round: int
    refs: tuple[BlobRef, ...]
    weights: tuple[float, ...]
    method: str
    options: dict = field(default_factory=dict)
    token: tuple = ()


@dataclass(frozen=True, slots=True)
class Emit:
    """A task event for whoever follows the task (control socket, simulator, logs)."""

    event: dict


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
    | Emit
    | Log
)

# --- events (driver -> core), besides the network's own events -------------------------


@dataclass(frozen=True, slots=True)
class TimerFired:
    key: tuple


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
    token: tuple
    result: Any


@dataclass(frozen=True, slots=True)
class JobFailed:
    token: tuple
    reason: str


@dataclass(frozen=True, slots=True)
class Aggregated:
    token: tuple
    ref: BlobRef | None
    reason: str = ""  # non-empty when aggregation failed
