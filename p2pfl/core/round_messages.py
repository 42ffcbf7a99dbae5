"""Messages of the exact rounds' aggregation stages (after a RoundClose): reduce-scatter
(core/scatter.py) and hierarchical aggregation (core/hierarchy.py).

Each names a round and the close attempt it belongs to; who may send which is a rule
every node evaluates from the roster and the close (the slice's owner, the group's
leader), checked on receipt by the stage, never taken from the message.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfl.core.messages import _check_task, check_peers
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import message

MAX_SLICES = 256  # slices a model is cut into (= participants; more use hierarchical)


def _check_round(rnd: int, attempt: int, index: int, limit: int = MAX_SLICES) -> None:
    if rnd < 1 or attempt < 0:
        raise ValueError("round must be >= 1 and attempt >= 0")
    if not 0 <= index < limit:
        raise ValueError(f"index {index} outside [0, {limit})")


@message("task.slice-offer")
@dataclass(frozen=True, slots=True)
class SliceOffer:
    """An author tells the owner of slice `index` where to fetch that slice of its update
    (a direct message; the blob is served by the author)."""

    task_id: str
    round: int
    peer: str  # the author
    index: int
    ref: BlobRef

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_round(self.round, 0, self.index)


@message("task.slice-ask")
@dataclass(frozen=True, slots=True)
class SliceAsk:
    """An owner asks an author for slice `index`'s offer again (a direct message lost)."""

    task_id: str
    round: int
    peer: str  # the owner asking
    index: int

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_round(self.round, 0, self.index)


@message("task.slice-done")
@dataclass(frozen=True, slots=True)
class SliceDone:
    """The owner of slice `index` under close `attempt` combined it: everyone fetches
    `ref` from it. `ref` None: an input slice was malformed; `dropped` names its authors
    (the coordinator re-closes the round without them). Krum: `ref` is the slice's
    matrix of squared distances between the updates, and `inputs` the input slices (in
    the close's order), so that everyone can fetch the chosen update's slices."""

    task_id: str
    round: int
    attempt: int
    peer: str  # the owner
    index: int
    ref: BlobRef | None
    dropped: tuple[str, ...] = ()
    inputs: tuple[BlobRef, ...] = ()

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_round(self.round, self.attempt, self.index)
        check_peers(self.dropped, "dropped")
        if len(self.inputs) > MAX_SLICES:
            raise ValueError(f"more than {MAX_SLICES} inputs")
        if len(self.dropped) > 1 or (self.ref is None) != bool(self.dropped):
            raise ValueError("a slice is either combined (ref) or names one bad author")


GROUP_STAGE = "group"  # a leader's model of its group's updates
GLOBAL_STAGE = "global"  # a leader's model of every group's model


@message("task.group-done")
@dataclass(frozen=True, slots=True)
class GroupDone:
    """A group leader's aggregate under close `attempt`: its group's model (stage
    "group", weight = the group's included sample counts) or the global model it made
    from every group's (stage "global"), for its group's members to fetch."""

    task_id: str
    round: int
    attempt: int
    peer: str  # the leader
    group: int
    stage: str
    ref: BlobRef

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_round(self.round, self.attempt, self.group, 100_000)
        if self.stage not in (GROUP_STAGE, GLOBAL_STAGE):
            raise ValueError(f"stage must be {GROUP_STAGE} or {GLOBAL_STAGE}")
