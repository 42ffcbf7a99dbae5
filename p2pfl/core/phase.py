"""The phases of one task at one node, and which events each phase takes.

One table (`ACCEPTS`) says, for each phase, which event kinds it handles; the handler for
an event kind is the same in every phase (`TaskMachine.HANDLERS`), and checks the finer
conditions itself. An event a phase does not take is counted per kind and logged, never
silently dropped (`TaskMachine.refused`).
"""

from __future__ import annotations

import enum
from typing import Any

from p2pfl.core.commands import SliceWorked
from p2pfl.core.messages import (
    CallPart,
    Cancel,
    Decline,
    FinalPartial,
    GossipPush,
    Progress,
    Reveal,
    Roster,
    RoundClose,
    RoundUpdate,
    TaskResult,
    UpdateAsk,
    Volunteer,
)
from p2pfl.core.round_messages import (
    GroupDone,
    SketchProof,
    SliceAsk,
    SliceDone,
    SliceOffer,
    SliceSketch,
    StageAsk,
)
from p2pfl.core.tokens import JobStep, TimerKind


class Phase(enum.Enum):
    PENDING = "pending"  # heard of; the taskpack is not verified here (yet)
    VALIDATING = "validating"  # validate_inputs runs on our data
    VOLUNTEERED = "volunteered"  # our signed record is out; waiting for the roster
    DECLINED = "declined"  # we do not take part (the reason says why); we still follow
    OBSERVING = "observing"  # a roster without us: we follow
    INIT = "init"  # computing the initial model
    TRAINING = "training"  # local training of the current round
    AGGREGATING = "aggregating"  # fetching and combining the round's updates
    EVALUATING = "evaluating"  # the new model on our validation data
    FINALIZING = "finalizing"  # postprocess: our final partial
    REDUCING = "reducing"  # partial sent; waiting for (or computing) the result
    WITHDRAWN = "withdrawn"  # we left after a local failure; others go on
    DONE = "done"  # the signed result says succeeded
    FAILED = "failed"  # the signed result says failed
    ERRORED = "errored"  # a bug while handling an event: this task stops here
    EXPIRED = "expired"  # the offer never got a roster


TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.ERRORED, Phase.EXPIRED})
ACTIVE = frozenset(
    {
        Phase.INIT,
        Phase.TRAINING,
        Phase.AGGREGATING,
        Phase.EVALUATING,
        Phase.FINALIZING,
        Phase.REDUCING,
    }
)


class PeerLost:
    """A network event: `peer` is unreachable."""

    __slots__ = ("peer",)

    def __init__(self, peer: str) -> None:
        self.peer = peer


class PeerBack:
    """A network event: `peer` is reachable again."""

    __slots__ = ("peer",)

    def __init__(self, peer: str) -> None:
        self.peer = peer


class TaskpackState:
    """The taskpack's status changed in the book (verified, rejected...); once verified,
    with the site policy's decision on the offer (None: no site policy, a simulation)."""

    __slots__ = ("decision", "reason", "status")

    def __init__(self, status: str | None, reason: str = "", decision: Any = None) -> None:
        self.status, self.reason, self.decision = status, reason, decision


class BlobOutcome:
    """A blob fetch ended (ok) or failed (reason)."""

    __slots__ = ("cid", "ok", "reason")

    def __init__(self, cid: str, ok: bool, reason: str = "") -> None:
        self.cid, self.ok, self.reason = cid, ok, reason


class PolicyRevoked:
    """The site's policy no longer allows this task (it was reloaded): leave it."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class AggregatedKey:
    """Table key for aggregation outcomes."""


EventKey = type | TimerKind | JobStep

# What anyone following a task takes, whatever its part in it.
_FOLLOW: frozenset[EventKey] = frozenset(
    {
        Volunteer,
        Reveal,
        Decline,
        Cancel,
        Roster,
        CallPart,
        RoundUpdate,
        RoundClose,
        SliceDone,
        GroupDone,
        Progress,
        TaskResult,
        PeerLost,
        PeerBack,
        TaskpackState,
        TimerKind.VOLUNTEER,
        TimerKind.REVEAL,
        TimerKind.ROSTER_TAKEOVER,
        TimerKind.PUBLISHER_WATCH,
        TimerKind.EXPIRE,
        TimerKind.REDUCE,  # observers escalate a held result too
        TimerKind.REPUBLISH_REVEAL,
        PolicyRevoked,
    }
)
_PARTICIPATE: frozenset[EventKey] = _FOLLOW | {
    GossipPush,
    UpdateAsk,
    TimerKind.UPDATES,
    StageAsk,
    TimerKind.STAGE,
    SliceOffer,
    SliceAsk,
    TimerKind.SLICES,
    SliceSketch,
    SketchProof,
    SliceWorked,
    FinalPartial,
    BlobOutcome,
    AggregatedKey,
    TimerKind.ROUND,
    TimerKind.RECLOSE,
    TimerKind.REFETCH,
    TimerKind.REPUBLISH_ROSTER,
    JobStep.INIT,
    JobStep.TRAIN,
    JobStep.EVALUATE,
    JobStep.FINALIZE,
    JobStep.REDUCE,
    TimerKind.PARTIAL,
}

ACCEPTS: dict[Phase, frozenset[EventKey]] = {
    Phase.PENDING: _FOLLOW,
    Phase.VALIDATING: _FOLLOW | {JobStep.VALIDATE},
    # A fast peer's direct round messages can come before the roster: held until it does.
    Phase.VOLUNTEERED: _FOLLOW | {TimerKind.REPUBLISH_ROSTER, GossipPush, FinalPartial, SliceOffer},
    Phase.DECLINED: _FOLLOW,
    Phase.OBSERVING: _FOLLOW,
    Phase.INIT: _PARTICIPATE,
    Phase.TRAINING: _PARTICIPATE,
    Phase.AGGREGATING: _PARTICIPATE,
    Phase.EVALUATING: _PARTICIPATE,
    Phase.FINALIZING: _PARTICIPATE,
    Phase.REDUCING: _PARTICIPATE,
    # A withdrawn participant still follows, and a late partial or share is harmless.
    Phase.WITHDRAWN: _FOLLOW | {TimerKind.REPUBLISH_ROSTER},
    Phase.DONE: frozenset({PeerLost, PeerBack, TaskResult}),
    Phase.FAILED: frozenset({PeerLost, PeerBack, TaskResult}),
    Phase.ERRORED: frozenset(),
    Phase.EXPIRED: frozenset(),
}
