"""Whom to dial and when: known addresses, bootstrap peers, per-peer redial backoff.

Pure bookkeeping (the clock is passed in) so the dial policy is testable without hosts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class _Entry:
    addrs: tuple[str, ...] = ()
    bootstrap: bool = False
    failures: int = 0
    next_dial: float = 0.0  # earliest time of the next dial attempt
    dialing: bool = False


@dataclass
class PeerBook:
    self_id: str
    backoff_min: float
    backoff_max: float
    max_failures: int
    rng: random.Random = field(default_factory=random.Random)
    _peers: dict[str, _Entry] = field(default_factory=dict)
    connected: set[str] = field(default_factory=set)

    def add_bootstrap(self, peer: str, addr: str) -> None:
        if peer == self.self_id:
            return
        entry = self._peers.setdefault(peer, _Entry())
        entry.bootstrap = True
        if addr not in entry.addrs:
            entry.addrs = (*entry.addrs, addr)

    def learn(self, peer: str, addrs: tuple[str, ...] | list[str]) -> bool:
        """Record addresses a peer advertises; True when the peer is new to us."""
        if peer == self.self_id or not addrs:
            return False
        entry = self._peers.get(peer)
        if entry is None:
            self._peers[peer] = _Entry(addrs=tuple(addrs))
            return True
        # Keep bootstrap addresses (configured by an operator) ahead of learned ones.
        merged = list(entry.addrs) if entry.bootstrap else []
        merged += [a for a in addrs if a not in merged]
        entry.addrs = tuple(merged)
        return False

    def is_bootstrap(self, peer: str) -> bool:
        entry = self._peers.get(peer)
        return entry is not None and entry.bootstrap

    def forget(self, peer: str) -> None:
        """Never dial `peer` again (unless learned anew); bootstrap peers stay."""
        entry = self._peers.get(peer)
        if entry is not None and not entry.bootstrap and not entry.dialing:
            del self._peers[peer]

    def addrs(self, peer: str) -> tuple[str, ...]:
        entry = self._peers.get(peer)
        return entry.addrs if entry else ()

    def known(self) -> dict[str, tuple[str, ...]]:
        return {p: e.addrs for p, e in self._peers.items()}

    def on_connected(self, peer: str) -> None:
        self.connected.add(peer)
        entry = self._peers.get(peer)
        if entry is not None:
            entry.failures = 0

    def on_disconnected(self, peer: str, now: float) -> None:
        self.connected.discard(peer)
        entry = self._peers.get(peer)
        if entry is not None:
            # A peer that just left may be restarting: first retry soon, then back off.
            entry.failures = 0
            entry.next_dial = now + self.backoff_min

    def dial_started(self, peer: str) -> None:
        self._peers[peer].dialing = True

    def dial_finished(self, peer: str, ok: bool, now: float) -> None:
        entry = self._peers.get(peer)
        if entry is None:
            return
        entry.dialing = False
        if ok:
            entry.failures = 0
            return
        entry.failures += 1
        if not entry.bootstrap and entry.failures >= self.max_failures:
            del self._peers[peer]  # gone for good, as far as we can tell
            return
        delay = min(self.backoff_max, self.backoff_min * 2 ** (entry.failures - 1))
        entry.next_dial = now + delay * (0.8 + 0.4 * self.rng.random())

    def due(self, now: float, target: int) -> tuple[list[str], float | None]:
        """Peers to dial now, and the time when the next one becomes due (None: never).

        Bootstrap peers are always redialled; others only while we are below `target`
        connected-or-dialing peers.
        """
        dialing = sum(1 for e in self._peers.values() if e.dialing)
        room = target - len(self.connected) - dialing
        to_dial: list[str] = []
        next_at: float | None = None
        candidates = [
            (p, e) for p, e in self._peers.items() if p not in self.connected and not e.dialing
        ]
        # Bootstrap first, then the peers that failed least.
        candidates.sort(key=lambda pe: (not pe[1].bootstrap, pe[1].failures))
        for peer, entry in candidates:
            if not entry.bootstrap and room <= 0:
                continue
            if entry.next_dial <= now:
                to_dial.append(peer)
                if not entry.bootstrap:
                    room -= 1
            elif next_at is None or entry.next_dial < next_at:
                next_at = entry.next_dial
        return to_dial, next_at
