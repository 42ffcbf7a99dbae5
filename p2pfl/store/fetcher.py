"""Sans-IO multi-peer chunk fetcher: events in, FetchCmds out; no trio, no clock.

The driver maps each `FetchCmd` to ``Network.fetch(peer, cid, offset, length,
token=cmd.token)`` and feeds FetchDone/FetchFailed back as `on_done`/`on_failed`. Timeouts
are the driver's (or the network's) business: a request that times out is an `on_failed`.

Providers may hold the whole blob or only some chunks (peers still downloading it serve
what they verified: swarming). Each provider's availability is known from its
announcements (`add_provider(peer, chunks)`, repeated as it grows).

Scheduling is rarest-first: among the missing chunks not in flight, the one held by the
fewest known providers goes first, ties broken by a per-node random order of the chunks
(seeded from `seed`, e.g. the node id, so two downloaders of the same blob start on
different chunks and can then trade them). Without a seed ties go to the lowest index.

A swarm download may also name a `stripe` (k, m): this node is the k-th of m downloaders
it knows of, and its "home" chunks are k, k+m, k+2m... It asks for those first, and asks
the seeds (providers with the whole blob, e.g. the publisher) for another stripe's chunk
only when it has nothing else in flight: that chunk's home node is likely fetching it
and will announce it. So the publisher uploads each chunk about once instead of once per
downloader, and the downloaders trade the rest.

Each chunk goes to the least-loaded provider that holds it, preferring one that has not
failed it, then peers still downloading over seeds (everyone asks the seeds); ties rotate
over the providers (in the order they were added). Everything is deterministic given the
same call sequence (so simulations replay).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass

from p2pfl.errors import RemoteProtocolError
from p2pfl.store.blobref import BlobRef
from p2pfl.store.blobs import PartialBlob

# A provider that fails this many requests for one blob is dropped for that blob.
MAX_FAILURES_PER_PEER = 3


@dataclass(frozen=True, slots=True)
class FetchCmd:
    peer: str
    cid: str
    index: int
    offset: int
    length: int

    @property
    def token(self) -> tuple[str, int]:
        """The token to pass to Network.fetch, so answers map back to (cid, chunk)."""
        return (self.cid, self.index)


def _stripe(n: int, stripe: tuple[int, int]) -> range:
    k, m = stripe
    return range(k % max(1, m), n, max(1, m))


def chunk_order(
    cid: str, n: int, seed: str | bytes | None, stripe: tuple[int, int] | None = None
) -> list[int]:
    """rank[i] of each chunk for tie-breaks: the stripe's chunks first (ascending), then
    the rest in index order without a seed, else shuffled by sha256(seed, cid) (stable
    across runs and Python versions, unlike hash())."""
    order = list(range(n))
    if seed is not None:
        raw = seed.encode() if isinstance(seed, str) else bytes(seed)
        digest = hashlib.sha256(b"p2pfl-fetch-order|" + raw + b"|" + cid.encode()).digest()
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    if stripe is not None:
        home = _stripe(n, stripe)
        order = list(home) + [i for i in order if i not in home]
    rank = [0] * n
    for k, i in enumerate(order):
        rank[i] = k
    return rank


class BlobFetch:
    """Fetches the missing chunks of one blob from whichever providers are known.

    When every chunk is in, `finish()` of the partial blob runs (whole-CID check and move
    into the store): then `done` is True and `cid` is set, or `failed_reason` says why.
    `failed_reason == "no providers"` is not final: adding a provider resumes the fetch.
    Known providers that lack every missing chunk are waited for (they may get them).
    """

    def __init__(
        self,
        ref: BlobRef,
        partial: PartialBlob,
        *,
        max_inflight_per_peer: int = 2,
        max_inflight: int = 8,
        seed: str | bytes | None = None,
        stripe: tuple[int, int] | None = None,
    ) -> None:
        if ref != partial.ref:
            raise ValueError("BlobFetch: ref and partial.ref differ")
        self.ref = partial.ref
        self.partial = partial
        self.max_inflight_per_peer = max(1, max_inflight_per_peer)
        self.max_inflight = max(1, max_inflight)
        self.done = False
        self.cid: str | None = None
        self.failed_reason: str | None = None
        n = self.ref.n_chunks
        self._rank = chunk_order(self.ref.cid, n, seed, stripe)
        self._striped = stripe is not None
        self._home = set() if stripe is None else set(_stripe(n, stripe))
        self._providers: list[str] = []  # in order of addition (deterministic tie-breaks)
        self._avail: dict[str, set[int] | None] = {}  # None: the whole blob
        self._n_full = 0  # providers with the whole blob
        self._held = [0] * n  # per chunk: partial providers that hold it
        self._dropped: set[str] = set()  # lied or failed too often: never asked again
        self._load: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._inflight: dict[int, str] = {}  # chunk index -> peer asked
        self._failed_at: dict[int, set[str]] = {}  # chunk index -> peers that failed it
        self._started = False

    # --- events ------------------------------------------------------------------------

    def start(self) -> list[FetchCmd]:
        self._started = True
        if self.partial.complete():
            self._complete()
            return []
        return self._pump()

    def add_provider(self, peer: str, chunks: Iterable[int] | None = None) -> list[FetchCmd]:
        """`peer` holds the blob (`chunks` None) or at least the chunks `chunks`.

        Called again as a partial provider gets more: availability only grows (an older
        announcement arriving late does not take chunks back). A provider dropped for
        lying or failing is not taken back. Out-of-range indices are ignored.
        """
        if peer in self._dropped:
            return []
        n = self.ref.n_chunks
        new = None if chunks is None else {i for i in chunks if 0 <= i < n}
        if peer in self._load:
            old = self._avail[peer]
            if old is None:
                return []  # already known to hold everything
            if new is None:
                for i in old:
                    self._held[i] -= 1
                self._avail[peer] = None
                self._n_full += 1
            else:
                gained = new - old
                if not gained:
                    return []
                for i in gained:
                    self._held[i] += 1
                old |= gained
        else:
            self._providers.append(peer)
            self._load[peer] = 0
            self._avail[peer] = new
            if new is None:
                self._n_full += 1
            else:
                for i in new:
                    self._held[i] += 1
        if self.failed_reason == "no providers":
            self.failed_reason = None
        return self._pump() if self._started else []

    def remove_provider(self, peer: str) -> list[FetchCmd]:
        """`peer` is gone: its in-flight chunks are asked elsewhere."""
        self._drop(peer, forever=False)
        return self._pump()

    def on_done(
        self, peer: str, index: int, data: bytes | bytearray | memoryview
    ) -> list[FetchCmd]:
        """An answer arrived. A chunk that fails verification drops `peer` for this blob."""
        if self._inflight.get(index) == peer:
            del self._inflight[index]
            self._load[peer] -= 1
        if self.done or self.failed_reason not in (None, "no providers"):
            return []
        if not 0 <= index < self.ref.n_chunks:
            self._drop(peer, forever=True)
            return self._pump()
        if not self.partial.has_chunk(index):
            try:
                self.partial.write_chunk(index, data)
            except RemoteProtocolError:
                self._drop(peer, forever=True)
                return self._pump()
        if self.partial.complete():
            self._complete()
            return []
        return self._pump()

    def on_failed(self, peer: str, index: int, reason: str) -> list[FetchCmd]:
        """A request failed (not found, timeout, reset...): retry elsewhere first."""
        if self._inflight.get(index) == peer:
            del self._inflight[index]
            self._load[peer] -= 1
            self._failed_at.setdefault(index, set()).add(peer)
            self._failures[peer] = self._failures.get(peer, 0) + 1
            if self._failures[peer] >= MAX_FAILURES_PER_PEER:
                self._drop(peer, forever=True)
        return self._pump()

    # --- queries -----------------------------------------------------------------------

    def progress(self) -> tuple[int, int]:
        """(bytes verified so far, total bytes)."""
        return self.partial.bytes_have(), self.ref.size

    def inflight(self) -> dict[int, str]:
        """Chunk index -> peer, for requests not yet answered."""
        return dict(self._inflight)

    def providers(self) -> list[str]:
        return list(self._providers)

    def availability(self, index: int) -> int:
        """How many known providers hold chunk `index`."""
        return self._n_full + self._held[index]

    # --- internals ---------------------------------------------------------------------

    def _drop(self, peer: str, *, forever: bool) -> None:
        if forever:
            self._dropped.add(peer)
        if peer not in self._load:
            return
        self._providers.remove(peer)
        del self._load[peer]
        avail = self._avail.pop(peer)
        if avail is None:
            self._n_full -= 1
        else:
            for i in avail:
                self._held[i] -= 1
        # Its outstanding chunks become askable again; a late answer is still accepted if
        # it verifies (on_done checks the hash, not who was asked).
        for index in [i for i, p in self._inflight.items() if p == peer]:
            del self._inflight[index]

    def _complete(self) -> None:
        try:
            self.cid = self.partial.finish()
        except RemoteProtocolError as e:
            # Every chunk matched its hash but the whole does not match the CID: the ref
            # itself was wrong. Nothing more to fetch.
            self.failed_reason = f"hash-mismatch: {e}"
            return
        self.done = True
        self._inflight.clear()

    def _pick(self, index: int, free: list[str]) -> str | None:
        holders = [p for p in free if (a := self._avail[p]) is None or index in a]
        if not holders:
            return None
        tried = self._failed_at.get(index)
        if tried:
            fresh = [p for p in holders if p not in tried]
            holders = fresh or holders
        # Peers still downloading before those with the whole blob: everyone asks the
        # latter (the publisher above all), so their uplinks are the bottleneck; they
        # should serve the chunks nobody else has yet.
        partial = [p for p in holders if self._avail[p] is not None]
        holders = partial or holders
        least = min(self._load[p] for p in holders)
        best = [p for p in holders if self._load[p] == least]
        return best[self._rank[index] % len(best)]

    def _pump(self) -> list[FetchCmd]:
        if self.done or not self._started:
            return []
        if self.failed_reason is not None and self.failed_reason != "no providers":
            return []
        if not self._providers:
            if not self._inflight and not self.partial.complete():
                self.failed_reason = "no providers"
            return []
        cap = self.max_inflight_per_peer
        free = [p for p in self._providers if self._load[p] < cap]
        if not free or len(self._inflight) >= self.max_inflight:
            return []
        n_full, held, rank, inflight = self._n_full, self._held, self._rank, self._inflight
        todo = [i for i in self.partial.missing() if i not in inflight and n_full + held[i]]
        todo.sort(key=lambda i: (held[i], rank[i]))  # rarest first (n_full is common)
        cmds: list[FetchCmd] = []
        ref = self.ref
        home, striped = self._home, self._striped
        for index in todo:
            if not free or len(inflight) >= self.max_inflight:
                break
            if striped and inflight and not held[index] and index not in home:
                # Only seeds hold it and it is another downloader's stripe: that one is
                # probably fetching it now and will announce it. Asking the seeds too
                # would duplicate their upload; do it only when we have nothing else.
                continue
            peer = self._pick(index, free)
            if peer is None:
                continue
            inflight[index] = peer
            self._load[peer] += 1
            if self._load[peer] >= cap:
                free.remove(peer)
            offset, length = ref.chunk_range(index)
            cmds.append(FetchCmd(peer, ref.cid, index, offset, length))
        return cmds
