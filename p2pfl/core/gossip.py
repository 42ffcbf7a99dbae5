"""Who sends push-sum shares to whom in a gossip round.

Every node must know whose shares to wait for, so the choice of targets is a pure
function of (task, round, the live roster): each peer draws `fanout` distinct targets from
a generator seeded by sha256(task_id|round|peer). Drawing costs O(fanout) per peer, so the
whole plan (and its inverse, the sources of each peer) costs O(N * fanout) and is computed
once per round per process, then shared: 1,000 simulated nodes ask for the same plan.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence


@functools.lru_cache(maxsize=32)
def gossip_plan(
    task_id: str, rnd: int, live: tuple[str, ...], fanout: int
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """(targets, sources) of every live peer for round `rnd`."""
    peers = sorted(live)
    n = len(peers)
    k = max(0, min(fanout, n - 1))
    targets: dict[str, tuple[str, ...]] = {}
    sources: dict[str, list[str]] = {p: [] for p in peers}
    for i, peer in enumerate(peers):
        seed = hashlib.sha256(f"{task_id}|{rnd}|{peer}".encode()).digest()
        picks = random.Random(seed).sample(range(n - 1), k) if k else []
        # Indices skip the peer itself: j >= i maps to j + 1.
        chosen = tuple(peers[j + 1 if j >= i else j] for j in picks)
        targets[peer] = chosen
        for t in chosen:
            sources[t].append(peer)
    return targets, {p: tuple(s) for p, s in sources.items()}


def targets_of(
    task_id: str, rnd: int, peer: str, live: Sequence[str], fanout: int
) -> tuple[str, ...]:
    return gossip_plan(task_id, rnd, tuple(live), fanout)[0].get(peer, ())


def sources_of(
    task_id: str, rnd: int, peer: str, live: Sequence[str], fanout: int
) -> tuple[str, ...]:
    return gossip_plan(task_id, rnd, tuple(live), fanout)[1].get(peer, ())
