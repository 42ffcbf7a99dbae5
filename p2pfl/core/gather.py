"""Fetch every blob an aggregation needs, then hand the Aggregate command over."""

from __future__ import annotations

from dataclasses import replace

from p2pfl.core.commands import Aggregate, Command, FetchBlob


class Gather:
    """One pending aggregation: the blobs still missing, and who announced each."""

    def __init__(self, agg: Aggregate, authors: dict[str, str], me: str) -> None:
        self.agg = agg
        self.authors = authors  # cid -> the participant that announced it
        self.waiting = {ref.cid for ref in agg.refs}
        self.me = me

    def start(self) -> list[Command]:
        out: list[Command] = []
        for ref in self.agg.refs:
            author = self.authors.get(ref.cid)
            out.append(FetchBlob(ref, (author,) if author and author != self.me else ()))
        return out

    def refetch(self, cid: str) -> list[Command]:
        ref = next((r for r in self.agg.refs if r.cid == cid), None)
        author = self.authors.get(cid)
        if ref is None or cid not in self.waiting or not author:
            return []
        return [FetchBlob(ref, (author,))]

    def arrived(self, cid: str) -> Aggregate | None:
        """The blob is here; the Aggregate command once nothing is missing."""
        self.waiting.discard(cid)
        return None if self.waiting else self.agg

    def leave_out(self, cid: str) -> Aggregate | None:
        """Aggregate without blob `cid` (gossip: a share that cannot be fetched)."""
        kept = [
            (r, w) for r, w in zip(self.agg.refs, self.agg.weights, strict=True) if r.cid != cid
        ]
        self.agg = replace(
            self.agg, refs=tuple(r for r, _ in kept), weights=tuple(w for _, w in kept)
        )
        return self.arrived(cid)

    @property
    def empty(self) -> bool:
        return not self.agg.refs
