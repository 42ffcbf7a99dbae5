"""Who coordinates and who reduces: a rule every node can evaluate on its own.

Volunteers are ranked by sha256(task_id || peer_id): unpredictable before the task exists,
identical on every node, and not choosable by a peer (its id is its public key). The
best-ranked volunteer coordinates; the roster lists participants best-ranked first, and
every later duty (closing a round, reducing) falls to the first *live* peer in that order,
so a dead coordinator or reducer is replaced by the next in rank without a new election.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence


@functools.lru_cache(maxsize=1 << 17)
def rank_key(task_id: str, peer: str) -> bytes:
    return hashlib.sha256(task_id.encode() + b"|" + peer.encode()).digest()


def ranked(task_id: str, peers: Iterable[str]) -> list[str]:
    """Peers best-ranked first."""
    return sorted(set(peers), key=lambda p: rank_key(task_id, p))


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
    volunteers: Sequence[str],
    min_nodes: int,
    max_nodes: int,
) -> str | None:
    """Why a roster breaks the rule, or None. `volunteers` are the ids whose signed
    volunteer records the roster carries (already checked by the caller)."""
    if not participants:
        return "empty roster"
    if len(set(participants)) != len(participants):
        return "duplicate participants"
    if not min_nodes <= len(participants) <= max_nodes:
        return f"{len(participants)} participants, outside [{min_nodes}, {max_nodes}]"
    missing = set(participants) - set(volunteers)
    if missing:
        return f"participants without a volunteer record: {sorted(missing)[:3]}"
    if list(participants) != ranked(task_id, participants):
        return "participants not in rank order"
    if participants[0] != coordinator:
        return "coordinator is not the best-ranked participant"
    order = ranked(task_id, volunteers)
    position = order.index(coordinator)
    if position > epoch:
        return f"coordinator is rank {position} but the roster claims takeover epoch {epoch}"
    return None
