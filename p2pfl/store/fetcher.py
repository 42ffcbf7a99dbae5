"""Sans-IO multi-peer chunk fetcher: events in, FetchCmds out; no trio, no clock.

The driver maps each `FetchCmd` to ``Network.fetch(peer, cid, offset, length,
token=cmd.token)`` and feeds FetchDone/FetchFailed back as `on_done`/`on_failed`. Timeouts
are the driver's (or the network's) business: a request that times out is an `on_failed`.

Scheduling is deterministic given the same call sequence (so simulations replay): chunks
are asked in ascending index order, each from the least-loaded provider, ties broken by
rotating over the providers (in the order they were added) by chunk index. A chunk that
failed at one provider is re-asked elsewhere first.
"""

from __future__ import annotations

import heapq
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


class BlobFetch:
    """Fetches the missing chunks of one blob from whichever providers are known.

    When every chunk is in, `finish()` of the partial blob runs (whole-CID check and move
    into the store): then `done` is True and `cid` is set, or `failed_reason` says why.
    `failed_reason == "no providers"` is not final: adding a provider resumes the fetch.
    """

    def __init__(
        self,
        ref: BlobRef,
        partial: PartialBlob,
        *,
        max_inflight_per_peer: int = 2,
        max_inflight: int = 8,
    ) -> None:
        self.ref = partial.ref
        self.partial = partial
        self.max_inflight_per_peer = max(1, max_inflight_per_peer)
        self.max_inflight = max(1, max_inflight)
        self.done = False
        self.cid: str | None = None
        self.failed_reason: str | None = None
        self._providers: list[str] = []  # in order of addition (deterministic tie-breaks)
        self._dropped: set[str] = set()  # lied or failed too often: never asked again
        self._load: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._inflight: dict[int, str] = {}  # chunk index -> peer asked
        self._failed_at: dict[int, set[str]] = {}  # chunk index -> peers that failed it
        # Chunks to ask for, smallest index first (a heap; stale entries are skipped).
        self._todo: list[int] = list(partial.missing())
        self._queued: set[int] = set(self._todo)
        self._started = False
        if ref != partial.ref:
            raise ValueError("BlobFetch: ref and partial.ref differ")

    # --- events ------------------------------------------------------------------------

    def start(self) -> list[FetchCmd]:
        self._started = True
        if self.partial.complete():
            self._complete()
            return []
        return self._pump()

    def add_provider(self, peer: str) -> list[FetchCmd]:
        """`peer` holds the blob. A provider dropped for lying is not taken back."""
        if peer in self._dropped or peer in self._load:
            return []
        self._providers.append(peer)
        self._load[peer] = 0
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
            self._requeue(index)  # skipped as stale by _pump once the chunk is written
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
            self._requeue(index)
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

    # --- internals ---------------------------------------------------------------------

    def _drop(self, peer: str, *, forever: bool) -> None:
        if forever:
            self._dropped.add(peer)
        if peer not in self._load:
            return
        self._providers.remove(peer)
        del self._load[peer]
        # Its outstanding chunks go back to the queue; a late answer is still accepted if
        # it verifies (on_done checks the hash, not who was asked).
        for index in [i for i, p in self._inflight.items() if p == peer]:
            del self._inflight[index]
            self._requeue(index)

    def _requeue(self, index: int) -> None:
        if index not in self._queued:
            self._queued.add(index)
            heapq.heappush(self._todo, index)

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

    def _pick(self, index: int) -> str | None:
        cap = self.max_inflight_per_peer
        free = [p for p in self._providers if self._load[p] < cap]
        if not free:
            return None
        tried = self._failed_at.get(index)
        if tried:
            fresh = [p for p in free if p not in tried]
            free = fresh or free
        least = min(self._load[p] for p in free)
        best = [p for p in free if self._load[p] == least]
        return best[index % len(best)]

    def _pump(self) -> list[FetchCmd]:
        if self.done or not self._started:
            return []
        if self.failed_reason is not None and self.failed_reason != "no providers":
            return []
        if not self._providers:
            if not self._inflight and not self.partial.complete():
                self.failed_reason = "no providers"
            return []
        cmds: list[FetchCmd] = []
        ref, todo = self.ref, self._todo
        while todo and len(self._inflight) < self.max_inflight:
            index = todo[0]
            if self.partial.has_chunk(index) or index in self._inflight:
                heapq.heappop(todo)  # stale: arrived meanwhile, or asked already
                self._queued.discard(index)
                continue
            peer = self._pick(index)
            if peer is None:
                break
            heapq.heappop(todo)
            self._queued.discard(index)
            self._inflight[index] = peer
            self._load[peer] += 1
            offset, length = ref.chunk_range(index)
            cmds.append(FetchCmd(peer, ref.cid, index, offset, length))
        return cmds
