"""Bytes of received messages waiting for the core, bounded per peer and in total.

Between the socket and the core every message sits in a queue (the real node's one FIFO
of callbacks, io_trio.TrioIO) until the core has handled it. A peer that sends faster than
the core handles would otherwise grow that queue without bound (issue 9: 3,000 direct
messages of 400 KB grew a node to 2,986 MiB). So the network `take`s a message's bytes
before handing it on and the consumer `release`s them once the core has handled it; a
message that would take a peer past `per_peer`, or everyone past `total`, is dropped:
counted per peer, logged at most once per peer every `log_every` seconds. The flooding
peer loses its own messages; the others keep their share.

Sans-IO and clock-injected; one instance is shared by the network (take) and the driver's
queue (release), both on the same trio thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pfl.limits import INBOUND_PEER_BYTES, INBOUND_TOTAL_BYTES, LOG_EVERY_S

log = logging.getLogger("p2pfl.net")

# Peers remembered for drop counts and log pacing; past it the oldest are forgotten (any
# peer id is free to make, so this table must be bounded too).
_MAX_TRACKED = 4096


@dataclass
class PeerDrops:
    messages: int = 0
    bytes: int = 0
    logged_at: float = float("-inf")
    unlogged: int = 0  # drops since the last log line


@dataclass
class InboundBudget:
    per_peer: int = INBOUND_PEER_BYTES
    total: int = INBOUND_TOTAL_BYTES
    log_every: float = LOG_EVERY_S
    clock: Callable[[], float] = time.monotonic
    held: dict[str, int] = field(default_factory=dict)  # peer -> bytes waiting
    held_total: int = 0
    drops: dict[str, PeerDrops] = field(default_factory=dict)
    dropped_total: int = 0

    def room(self, peer: str, n: int) -> bool:
        """Whether `n` more bytes from `peer` fit (without taking them)."""
        return self.held.get(peer, 0) + n <= self.per_peer and self.held_total + n <= self.total

    def take(self, peer: str, n: int, what: str = "message") -> bool:
        """Hold `n` bytes for `peer`'s message, or count a drop and return False."""
        if not self.room(peer, n):
            self.drop(peer, n, what)
            return False
        self.held[peer] = self.held.get(peer, 0) + n
        self.held_total += n
        return True

    def release(self, peer: str, n: int) -> None:
        """The core has handled a message `take` admitted."""
        left = self.held.get(peer, 0) - n
        if left > 0:
            self.held[peer] = left
        else:
            self.held.pop(peer, None)
        self.held_total = max(0, self.held_total - n)

    def drop(self, peer: str, n: int, what: str = "message") -> None:
        """Count (and, rate-limited, log) a message from `peer` dropped for being over a
        bound (this budget's, or another one the caller checks, like a size cap)."""
        stats = self.drops.get(peer)
        if stats is None:
            if len(self.drops) >= _MAX_TRACKED:
                del self.drops[next(iter(self.drops))]
            stats = self.drops[peer] = PeerDrops()
        stats.messages += 1
        stats.bytes += n
        stats.unlogged += 1
        self.dropped_total += 1
        now = self.clock()
        if now - stats.logged_at >= self.log_every:
            log.warning(
                "dropping messages from %s: %d dropped (%d since the last report; latest a"
                " %s of %d bytes) with %d bytes of its messages waiting (cap %d per peer,"
                " %d of %d in all)",
                peer[:64],
                stats.messages,
                stats.unlogged,
                what,
                n,
                self.held.get(peer, 0),
                self.per_peer,
                self.held_total,
                self.total,
            )
            stats.logged_at = now
            stats.unlogged = 0

    def dropped(self, peer: str) -> int:
        """Messages from `peer` dropped so far."""
        stats = self.drops.get(peer)
        return stats.messages if stats is not None else 0
