"""What a node keeps on disk to rejoin a task after a restart.

A snapshot is written (atomically, by the driver) whenever the task's standing changes:
the roster is accepted, a round's model is evaluated, the task ends (the snapshot is then
deleted). It holds the signed offer and roster as they came off the wire, so a restarted
node re-checks both signatures before it trusts its own file again, plus the current
round, the global model's ref and (gossip) the push-sum mass.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfl.core.messages import Roster, TaskOffer, check_task_id
from p2pfl.errors import RemoteProtocolError
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed, decode, encode, message, unseal


@message("task.snapshot")
@dataclass(frozen=True, slots=True)
class TaskSnapshot:
    task_id: str
    offer: bytes  # encode(Signed(TaskOffer))
    roster: bytes  # encode(Signed(Roster))
    round: int  # the last round whose model we hold (0: the initial model, or none yet)
    model: BlobRef | None
    mass: float = 0.0
    # A large task's call (core/call.py): each part as signed by the publisher, encoded.
    call: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check_task_id(self.task_id)
        if self.round < 0 or not self.mass >= 0.0:
            raise ValueError("round and mass must be >= 0")


def make_snapshot(
    offer: Signed,
    roster: Signed,
    rnd: int,
    model: BlobRef | None,
    mass: float,
    call: tuple[Signed, ...] = (),
) -> bytes:
    body = unseal(offer, expected=TaskOffer)
    parts = tuple(encode(part) for part in call)
    return encode(
        TaskSnapshot(body.task_id, encode(offer), encode(roster), rnd, model, mass, parts)
    )


def open_snapshot(data: bytes) -> tuple[TaskSnapshot, Signed, TaskOffer, Signed, Roster]:
    """Decode a snapshot and re-check the signatures it carries; RemoteProtocolError if
    anything is off (a damaged or planted file is refused, not trusted)."""
    snap = decode(data, expected=TaskSnapshot)
    offer_env = decode(snap.offer, expected=Signed)
    offer = unseal(offer_env, expected=TaskOffer)
    roster_env = decode(snap.roster, expected=Signed)
    roster = unseal(roster_env, expected=Roster)
    if offer.task_id != snap.task_id or roster.task_id != snap.task_id:
        raise RemoteProtocolError("snapshot mixes records of different tasks")
    if roster_env.signer != roster.coordinator or offer_env.signer != offer.publisher:
        raise RemoteProtocolError("snapshot records are not signed by their authors")
    return snap, offer_env, offer, roster_env, roster
