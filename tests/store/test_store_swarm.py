"""Swarming at the store level: partial downloads serve their verified chunks, chunk
bitmaps, and the fetcher's per-provider availability, rarest-first and stripes."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from p2pfl.errors import RemoteProtocolError
from p2pfl.store import BlobFetch, BlobStore, FetchCmd, make_blob_ref
from p2pfl.store.blobs import decode_bitmap, encode_bitmap
from p2pfl.store.fetcher import chunk_order

CHUNK = 1024
DATA = random.Random(20).randbytes(
    CHUNK * 20 + 100
)  # 21 chunks; fixed: tie-break orders derive from the cid
REF = make_blob_ref(DATA, CHUNK)


def chunk(i: int) -> bytes:
    return DATA[i * CHUNK : (i + 1) * CHUNK]


# --- partial serving -----------------------------------------------------------------


@pytest.mark.parametrize("disk", [False, True])
def test_partial_download_serves_its_verified_chunks(tmp_path: Path, disk: bool) -> None:
    store = BlobStore(tmp_path if disk else None)
    assert store.read(REF.cid, 0, CHUNK) is None
    p = store.open_partial(REF)
    assert store.read(REF.cid, 0, CHUNK) is None  # nothing verified yet
    p.write_chunk(3, chunk(3))
    p.write_chunk(4, chunk(4))
    p.write_chunk(20, DATA[20 * CHUNK :])
    assert store.read(REF.cid, 3 * CHUNK, CHUNK) == chunk(3)
    assert (
        store.read(REF.cid, 3 * CHUNK + 10, 2 * CHUNK - 20) == DATA[3 * CHUNK + 10 : 5 * CHUNK - 10]
    )
    assert store.read(REF.cid, 3 * CHUNK, 3 * CHUNK) is None  # chunk 5 is missing
    assert store.read(REF.cid, 2 * CHUNK + 1, 10) is None
    assert store.read(REF.cid, 20 * CHUNK, CHUNK) == DATA[20 * CHUNK :]  # short at the end
    assert store.read(REF.cid, len(DATA) + 5, 10) is None
    assert not store.has(REF.cid)  # serving a range is not holding the blob
    for i in range(REF.n_chunks):
        if not p.has_chunk(i):
            p.write_chunk(i, DATA[i * CHUNK : (i + 1) * CHUNK])
    assert p.finish() == REF.cid
    assert store.read(REF.cid, 5 * CHUNK, CHUNK) == chunk(5)  # now from the store itself


def test_discarded_partial_serves_nothing() -> None:
    store = BlobStore(None)
    p = store.open_partial(REF)
    p.write_chunk(0, chunk(0))
    assert store.read(REF.cid, 0, CHUNK) == chunk(0)
    p.discard()
    assert store.read(REF.cid, 0, CHUNK) is None


def test_bitmaps() -> None:
    assert encode_bitmap([1, 0, 0, 0, 0, 0, 0, 1, 1]) == b"\x81\x80"
    assert encode_bitmap({0, 7, 8}, 9) == b"\x81\x80"
    assert decode_bitmap(b"\x81\x80", 9) == {0, 7, 8}
    assert decode_bitmap(b"", 9) is None  # every chunk
    with pytest.raises(RemoteProtocolError):
        decode_bitmap(b"\x81", 9)  # wrong length
    with pytest.raises(RemoteProtocolError):
        decode_bitmap(b"\x81\x40", 9)  # a bit past the last chunk
    p = BlobStore(None).open_partial(REF)
    p.write_chunk(2, chunk(2))
    assert decode_bitmap(p.bitmap(), REF.n_chunks) == {2} and p.have_count() == 1


# --- fetcher -----------------------------------------------------------------------------


def answer(fetch: BlobFetch, cmds: list[FetchCmd], data: bytes = DATA) -> list[FetchCmd]:
    """Answer every command honestly (in order), collecting the follow-ups."""
    out: list[FetchCmd] = []
    for c in cmds:
        out += fetch.on_done(c.peer, c.index, data[c.offset : c.offset + c.length])
    return out


def test_partial_provider_is_asked_only_for_what_it_has() -> None:
    fetch = BlobFetch(REF, BlobStore(None).open_partial(REF), seed="me")
    fetch.add_provider("half", {0, 1, 2, 3})
    asked: list[FetchCmd] = []
    cmds = fetch.start()
    while cmds:
        asked += cmds
        cmds = answer(fetch, cmds)
    assert {c.index for c in asked} == {0, 1, 2, 3}
    assert not fetch.done and fetch.failed_reason is None  # waits: they may get more
    cmds = fetch.add_provider("half", {4, 5})  # a later announcement
    assert {c.index for c in cmds} == {4, 5}
    more = fetch.add_provider("full")
    while cmds or more:
        cmds = answer(fetch, cmds + more)
        more = []
    assert fetch.done


def test_rarest_chunk_first() -> None:
    fetch = BlobFetch(REF, BlobStore(None).open_partial(REF), max_inflight=1)
    everything_but_7 = set(range(REF.n_chunks)) - {7}
    for p in ("a", "b"):
        fetch.add_provider(p, everything_but_7)
    fetch.add_provider("c")  # the only one with chunk 7
    assert fetch.availability(7) == 1 and fetch.availability(0) == 3
    [first] = fetch.start()
    assert first.index == 7 and first.peer == "c"


def test_seeded_orders_differ_and_are_stable() -> None:
    orders = [chunk_order(REF.cid, REF.n_chunks, f"node-{i}") for i in range(15)]
    assert orders[0] == chunk_order(REF.cid, REF.n_chunks, "node-0")  # not Python's hash()
    assert chunk_order(REF.cid, 5, None) == [0, 1, 2, 3, 4]
    firsts = Counter(o.index(0) for o in orders)  # the chunk each node asks first
    assert len(firsts) >= 8  # spread, not all on the same chunk
    assert sorted(orders[3]) == list(range(REF.n_chunks))


def test_rarest_first_spreads_downloaders_over_the_publisher() -> None:
    """15 downloaders that only know the publisher ask it for different chunks."""
    first: list[int] = []
    for i in range(15):
        fetch = BlobFetch(REF, BlobStore(None).open_partial(REF), seed=f"node-{i}")
        fetch.add_provider("publisher")
        first += [c.index for c in fetch.start()]
    assert len(first) == 30
    assert len(set(first)) >= 15  # random would give ~16.5 distinct of 21; all-same gives 2


def test_stripes_split_the_publisher_upload() -> None:
    """With stripes, downloader k asks the publisher for k, k+m... first, and for other
    stripes' chunks only when idle: the publisher's first requests cover every chunk
    exactly once."""
    m = 7
    first: list[int] = []
    for k in range(m):
        fetch = BlobFetch(REF, BlobStore(None).open_partial(REF), seed=f"n{k}", stripe=(k, m))
        fetch.add_provider("publisher")
        cmds = fetch.start()
        first += [c.index for c in cmds]
        assert all(c.index % m == k for c in cmds)
    assert sorted(first) == list(range(2 * m))  # two home chunks each, none twice
    # A node whose stripe is done asks the seed for another stripe's chunk only when idle.
    fetch = BlobFetch(REF, BlobStore(None).open_partial(REF), stripe=(0, 30))
    fetch.add_provider("publisher")
    fetch.add_provider("peer", {5, 6})
    cmds = fetch.start()
    assert sorted((c.peer, c.index) for c in cmds) == [("peer", 5), ("peer", 6), ("publisher", 0)]
    cmds = answer(fetch, cmds[:1])  # only chunk 0 came back: 5 and 6 still in flight
    assert cmds == []
    cmds = answer(fetch, [c for c in fetch_cmds_inflight(fetch)])
    assert len(cmds) == 1 and cmds[0].peer == "publisher"  # idle: one seed-only chunk


def fetch_cmds_inflight(fetch: BlobFetch) -> list[FetchCmd]:
    out = []
    for index, peer in sorted(fetch.inflight().items()):
        offset, length = fetch.ref.chunk_range(index)
        out.append(FetchCmd(peer, fetch.ref.cid, index, offset, length))
    return out


def test_lying_partial_provider_is_refused_and_refetched_elsewhere() -> None:
    store = BlobStore(None)
    fetch = BlobFetch(REF, store.open_partial(REF), max_inflight=1)
    fetch.add_provider("liar", {9})  # claims the rarest chunk
    fetch.add_provider("honest")
    for p in ("peer1", "peer2"):
        fetch.add_provider(p, set(range(REF.n_chunks)) - {9})
    [cmd] = fetch.start()
    assert (cmd.peer, cmd.index) == ("liar", 9)  # the partial holder before the seed
    bad = os.urandom(cmd.length)
    cmds = fetch.on_done("liar", 9, bad)
    assert not fetch.partial.has_chunk(9) and "liar" not in fetch.providers()
    assert [(c.peer, c.index) for c in cmds] == [("honest", 9)]  # the same chunk, elsewhere
    assert store.read(REF.cid, 9 * CHUNK, CHUNK) is None  # the lie is never served on
    while cmds:
        cmds = answer(fetch, cmds)
    assert fetch.done and bytes(store.get(REF.cid)) == DATA
    assert fetch.add_provider("liar", {1}) == []  # not taken back


def test_availability_only_grows_and_full_overrides() -> None:
    fetch = BlobFetch(REF, BlobStore(None).open_partial(REF))
    fetch.add_provider("p", {1, 2})
    fetch.add_provider("p", {1})  # a stale announcement arriving late
    assert fetch.availability(2) == 1
    fetch.add_provider("p")
    assert all(fetch.availability(i) == 1 for i in range(REF.n_chunks))
    fetch.remove_provider("p")
    assert fetch.availability(2) == 0
