"""Messages of the exact rounds' aggregation stages (after a RoundClose): reduce-scatter
(core/scatter.py) and hierarchical aggregation (core/hierarchy.py).

Each names a round and the close attempt it belongs to; who may send which is a rule
every node evaluates from the roster and the close (the slice's owner, the group's
leader), checked on receipt by the stage, never taken from the message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pfl.core.messages import _check_task, check_peers
from p2pfl.core.sketch import PER_SLICE, WIRE
from p2pfl.limits import MAX_SIGNED_OFFER_BYTES, MAX_SKETCH_BYTES, MAX_SLICES
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import message


def _check_round(rnd: int, attempt: int, index: int, limit: int = MAX_SLICES) -> None:
    if rnd < 1 or attempt < 0:
        raise ValueError("round must be >= 1 and attempt >= 0")
    if not 0 <= index < limit:
        raise ValueError(f"index {index} outside [0, {limit})")


@message("task.slice-offer")
@dataclass(frozen=True, slots=True)
class SliceOffer:
    """An author tells the owner of slice `index` where to fetch that slice of its update
    (a direct message, signed: the owner may need to show it in a SketchProof; the blob
    is served by the author). An owner also offers its own slice to its witness."""

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


@message("task.stage-ask")
@dataclass(frozen=True, slots=True)
class StageAsk:
    """A participant asks another, directly, for its stage messages of close `attempt`
    once more (its SliceDones, its SliceSketch): they were sent directly, and a direct
    message can be lost. Answered to the asker only, a bounded number of times."""

    task_id: str
    round: int
    attempt: int
    peer: str  # who asks

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_round(self.round, self.attempt, 0)


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


@message("task.slice-sketch")
@dataclass(frozen=True, slots=True)
class SliceSketch:
    """A participant's sketches (core/sketch.py) of the slices of its update under close
    `attempt`: `values` holds PER_SLICE float32s per slice (core/sketch.py pack), in slice
    order; `witnessed` the slices whose owner's own contribution it holds as witness,
    `witness_values` their sketches. Signed: an owner or witness may show it in a
    SketchProof."""

    task_id: str
    round: int
    attempt: int
    peer: str
    values: bytes
    witnessed: tuple[int, ...] = ()
    witness_values: bytes = b""

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_round(self.round, self.attempt, 0)
        size = PER_SLICE * WIRE.itemsize
        n = len(self.values)
        if n == 0 or n % size or n > MAX_SLICES * size:
            raise ValueError(
                f"{n} value bytes: expected {size} per slice, at most {MAX_SLICES} slices"
            )
        if len(self.witnessed) > MAX_SLICES or len(set(self.witnessed)) != len(self.witnessed):
            raise ValueError("witnessed slices must be distinct, at most MAX_SLICES")
        if any(not 0 <= j < MAX_SLICES for j in self.witnessed):
            raise ValueError(f"a witnessed slice index outside [0, {MAX_SLICES})")
        if len(self.witness_values) != size * len(self.witnessed):
            raise ValueError(f"{size} witness value bytes per witnessed slice")
        for block in (self.values, self.witness_values):
            floats = np.frombuffer(block, dtype=WIRE)
            if not np.all(np.isfinite(floats)):
                raise ValueError("sketch values must be finite")
            if np.any(floats[PER_SLICE - 1 :: PER_SLICE] < 0):
                raise ValueError("a slice's L1 norm must be >= 0")

    def slices(self) -> int:
        return len(self.values) // (PER_SLICE * WIRE.itemsize)


@message("task.sketch-proof")
@dataclass(frozen=True, slots=True)
class SketchProof:
    """Evidence that a participant's sketch of slice `index` lies: `sketch` its signed
    SliceSketch (encoded Signed), `offer` the signed SliceOffer of that slice by the
    slice's author (the participant itself, or the slice's owner when the liar is its
    witness). Anyone checks it by fetching the offered slice (1/n of a model) and
    recomputing the sketch; it is refused unless both signatures hold and the numbers
    disagree."""

    task_id: str
    round: int
    attempt: int
    peer: str  # who shows it (anyone may)
    index: int
    sketch: bytes
    offer: bytes

    def __post_init__(self) -> None:
        _check_task(self.task_id, self.peer)
        _check_round(self.round, self.attempt, self.index)
        if len(self.sketch) > MAX_SKETCH_BYTES:
            raise ValueError(f"signed sketch of {len(self.sketch)} bytes, over {MAX_SKETCH_BYTES}")
        if len(self.offer) > MAX_SIGNED_OFFER_BYTES:
            raise ValueError(
                f"signed offer of {len(self.offer)} bytes, over {MAX_SIGNED_OFFER_BYTES}"
            )


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
