"""Who coordinates and who reduces: a rule every node can evaluate on its own.

Ranks mix randomness that no single party controls. Each volunteer commits to a secret
nonce in its signed Volunteer record (sha256(nonce)) and reveals it once volunteering is
over; the beacon is the hash of every revealed nonce, and a peer's rank key is
sha256(task_id | peer | beacon). The offerer picks the task id before anyone's nonce is
known, and a volunteer fixes its nonce before it sees the others', so neither can choose
to rank first (the last revealer can only withhold its reveal, dropping out: one bit).

The best-ranked volunteer coordinates; the roster lists participants best-ranked first,
and every later duty (closing a round, failing the task, reducing) falls to the first
*live* peer in that order, so a dead coordinator or reducer is replaced by the next in
rank without a new election.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence

_BEACON_DOMAIN = b"p2pfl/beacon/v1|"


def commitment(nonce: bytes) -> bytes:
    """What a volunteer record commits to (checked against the later reveal)."""
    return hashlib.sha256(b"p2pfl/commit/v1|" + nonce).digest()


def beacon(nonces: Mapping[str, bytes]) -> bytes:
    """The ranking beacon: a hash over every (peer, revealed nonce), in peer order."""
    h = hashlib.sha256(_BEACON_DOMAIN)
    for peer in sorted(nonces):
        h.update(peer.encode() + b"|" + nonces[peer])
    return h.digest()


@functools.lru_cache(maxsize=1 << 17)
def rank_key(task_id: str, peer: str, seed: bytes) -> bytes:
    return hashlib.sha256(task_id.encode() + b"|" + peer.encode() + b"|" + seed).digest()


def ranked(task_id: str, peers: Iterable[str], seed: bytes) -> list[str]:
    """Peers best-ranked first under the beacon `seed`."""
    return sorted(set(peers), key=lambda p: rank_key(task_id, p, seed))


def first_live(order: Sequence[str], dead: Iterable[str]) -> str | None:
    gone = set(dead)
    for peer in order:
        if peer not in gone:
            return peer
    return None


def roster_problem(
    task_id: str,
    coordinator: str,
    epoch: int,
    participants: Sequence[str],
    carried: Mapping[str, bytes],
    held: Iterable[str],
    min_nodes: int,
    max_nodes: int,
) -> str | None:
    """Why a roster breaks the rule, or None.

    `carried`: peer -> revealed nonce of every volunteer whose signed record and reveal the
    roster carries (already checked by the caller). `held`: volunteers whose record and
    reveal the checking node holds itself. A roster must list every volunteer the checker
    holds that ranks better than the worst one listed (and everyone, while it has room),
    so a coordinator cannot leave out a better-ranked volunteer to stay in charge."""
    if not participants:
        return "empty roster"
    if len(set(participants)) != len(participants):
        return "duplicate participants"
    if not min_nodes <= len(participants) <= max_nodes:
        return f"{len(participants)} participants, outside [{min_nodes}, {max_nodes}]"
    missing = set(participants) - set(carried)
    if missing:
        return f"participants without a volunteer record and reveal: {sorted(missing)[:3]}"
    seed = beacon(carried)
    if list(participants) != ranked(task_id, participants, seed):
        return "participants not in rank order"
    if participants[0] != coordinator:
        return "coordinator is not the best-ranked participant"
    known = set(carried) | set(held)
    order = ranked(task_id, known, seed)
    position = order.index(coordinator)
    if position > epoch:
        return f"coordinator is rank {position} but the roster claims takeover epoch {epoch}"
    left_out = [p for p in order if p not in carried]
    if left_out:
        worst = rank_key(task_id, participants[-1], seed)
        better = [p for p in left_out if rank_key(task_id, p, seed) < worst]
        if better or len(participants) < max_nodes:
            who = (better or left_out)[0]
            return f"leaves out volunteer {who}"
    return None
