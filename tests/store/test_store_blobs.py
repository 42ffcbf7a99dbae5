"""BlobStore on disk and in memory: atomic puts, reads, partial downloads and resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.store import BlobStore, cid_of, make_blob_ref

DATA = os.urandom(10_000)
CHUNK = 4096


@pytest.fixture(params=["disk", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path if request.param == "disk" else None)


def test_put_get_read(store: BlobStore) -> None:
    cid = store.put(DATA)
    assert cid == cid_of(DATA)
    assert store.put(DATA) == cid  # idempotent
    assert store.has(cid) and store.size(cid) == len(DATA)
    assert bytes(store.get(cid)) == DATA
    assert store.read(cid, 100, 50) == DATA[100:150]
    assert store.read(cid, 9990, 100) == DATA[9990:]  # short at the end
    assert store.read(cid, 20_000, 10) == b""
    assert store.list() == [cid]
    other = cid_of(b"other")
    assert not store.has(other) and store.read(other, 0, 1) is None and store.size(other) is None
    with pytest.raises(KeyError):
        store.get(other)
    assert store.delete(cid) and not store.delete(cid)
    assert store.list() == []


def test_read_rejects_hostile_names(store: BlobStore) -> None:
    store.put(DATA)
    for bad in ("../x", "/etc/passwd", "", "bafkrei" + "." * 52):
        assert store.read(bad, 0, 10) is None
        assert not store.has(bad)
    assert store.read(cid_of(DATA), -1, 10) is None


def test_put_verified(store: BlobStore) -> None:
    cid = cid_of(DATA)
    with pytest.raises(RemoteProtocolError, match="hash-mismatch"):
        store.put_verified(cid, DATA + b"x")
    assert not store.has(cid)
    store.put_verified(cid, DATA)
    assert store.has(cid)


def test_put_file(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    assert store.put_file(src) == cid_of(DATA)
    assert bytes(store.get(cid_of(DATA))) == DATA


def test_large_blob_is_mmapped(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    big = os.urandom(5 * 1024 * 1024)
    cid = store.put(big)
    got = store.get(cid)
    assert isinstance(got, memoryview) and got == big


def test_partial_in_any_order(store: BlobStore) -> None:
    ref = make_blob_ref(DATA, CHUNK)
    p = store.open_partial(ref)
    assert p.missing() == [0, 1, 2] and not p.complete()
    p.write_chunk(2, DATA[8192:])
    p.write_chunk(0, DATA[:4096])
    assert p.missing() == [1] and p.bytes_have() == 4096 + len(DATA) - 8192
    with pytest.raises(RemoteProtocolError, match="hash-mismatch"):
        p.write_chunk(1, DATA[:4096])
    with pytest.raises(RemoteProtocolError, match="hash-mismatch"):
        p.write_chunk(1, DATA[4096:8000])
    with pytest.raises(LocalProtocolError):
        p.write_chunk(3, b"")
    with pytest.raises(LocalProtocolError):
        p.finish()
    p.write_chunk(1, DATA[4096:8192])
    assert p.complete()
    assert p.finish() == ref.cid
    assert bytes(store.get(ref.cid)) == DATA


def test_partial_with_lying_ref_is_discarded(store: BlobStore) -> None:
    # Chunk hashes of other data under this data's CID: every chunk "verifies", the whole not.
    other = os.urandom(len(DATA))
    ref = make_blob_ref(other, CHUNK)
    from dataclasses import replace

    lying = replace(ref, cid=cid_of(DATA))
    p = store.open_partial(lying)
    for i in range(3):
        p.write_chunk(i, other[i * CHUNK : (i + 1) * CHUNK])
    with pytest.raises(RemoteProtocolError, match="hash-mismatch"):
        p.finish()
    assert not store.has(lying.cid)
    assert store.open_partial(lying).missing() == [0, 1, 2]
    if store.root is not None:
        assert list((store.root / "blobs").iterdir()) == []


def test_one_chunk_blob_is_verified_by_its_chunk_and_a_lying_one_is_not(
    store: BlobStore,
) -> None:
    from dataclasses import replace

    ref = make_blob_ref(DATA)  # one chunk: its hash is the CID's digest
    assert ref.n_chunks == 1 and ref.cid == cid_of(DATA)
    p = store.open_partial(ref)
    assert p.read_verified(0, 10) is None
    p.write_chunk(0, DATA)
    assert p.read_verified(5, 10) == DATA[5:15]  # served while not yet finished
    assert p.finish() == ref.cid and bytes(store.get(ref.cid)) == DATA
    if store.root is None:
        assert store.get(ref.cid) is DATA  # kept as it arrived: no copy in, none out
    # One chunk of other data under this data's CID: the chunk "verifies", the whole not.
    other = os.urandom(len(DATA))
    lying = replace(make_blob_ref(other), cid=cid_of(DATA[::-1]))
    q = store.open_partial(lying)
    q.write_chunk(0, other)
    with pytest.raises(RemoteProtocolError, match="hash-mismatch"):
        q.finish()
    assert not store.has(lying.cid)


def test_empty_blob(store: BlobStore) -> None:
    ref = make_blob_ref(b"")
    p = store.open_partial(ref)
    assert p.complete() and p.missing() == []
    assert p.finish() == cid_of(b"")
    assert bytes(store.get(ref.cid)) == b""


def test_resume_after_restart(tmp_path: Path) -> None:
    ref = make_blob_ref(DATA, CHUNK)
    p = BlobStore(tmp_path).open_partial(ref)
    p.write_chunk(1, DATA[4096:8192])
    del p
    # A new store on the same directory (a restarted node) picks up where it left off.
    p2 = BlobStore(tmp_path).open_partial(ref)
    assert p2.missing() == [0, 2]
    p2.write_chunk(0, DATA[:4096])
    p2.write_chunk(2, DATA[8192:])
    assert p2.finish() == ref.cid
    assert list((tmp_path / "partial").iterdir()) == []


def test_resume_with_other_chunking_starts_over(tmp_path: Path) -> None:
    BlobStore(tmp_path).open_partial(make_blob_ref(DATA, CHUNK)).write_chunk(0, DATA[:4096])
    p = BlobStore(tmp_path).open_partial(make_blob_ref(DATA, 2048))
    assert p.missing() == list(range(5))


def test_corrupt_state_file_starts_over(tmp_path: Path) -> None:
    ref = make_blob_ref(DATA, CHUNK)
    BlobStore(tmp_path).open_partial(ref).write_chunk(0, DATA[:4096])
    (tmp_path / "partial" / (ref.cid + ".state")).write_bytes(b"\xc1garbage")
    assert BlobStore(tmp_path).open_partial(ref).missing() == [0, 1, 2]


def test_leftover_temp_files_removed_and_never_listed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    cid = store.put(DATA)
    (tmp_path / "blobs" / ".tmp-deadbeef").write_bytes(b"half")
    assert store.list() == [cid]
    BlobStore(tmp_path)
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [cid]


def test_partial_of_a_held_blob_is_complete(store: BlobStore) -> None:
    cid = store.put(DATA)
    p = store.open_partial(make_blob_ref(DATA, CHUNK))
    assert p.complete() and p.missing() == [] and p.finish() == cid
    assert bytes(store.get(cid)) == DATA


def test_a_blob_made_whole_is_one_chunk_up_to_a_fetch_range() -> None:
    from p2pfl.store.blobref import (
        DEFAULT_CHUNK_SIZE,
        MAX_CHUNK_SIZE,
        single_chunk,
        whole_chunk_size,
    )

    fits = bytes(3 * 1024 * 1024)
    ref = make_blob_ref(fits, whole_chunk_size(len(fits)))
    assert ref.n_chunks == 1 and single_chunk(ref) and ref.cid == cid_of(fits)
    assert whole_chunk_size(MAX_CHUNK_SIZE) == MAX_CHUNK_SIZE
    assert whole_chunk_size(MAX_CHUNK_SIZE + 1) == DEFAULT_CHUNK_SIZE
