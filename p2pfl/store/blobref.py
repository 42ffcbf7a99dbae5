"""BlobRef: everything needed to fetch a blob in verified chunks from untrusted peers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.store.cid import cid_from_sha256, cid_of, digest_of_cid
from p2pfl.wire import record

DEFAULT_CHUNK_SIZE = 1024 * 1024
# A chunk is one fetch() range, so it may not exceed the network's MAX_FETCH_BYTES (4 MiB).
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 1024


@record
@dataclass(frozen=True, slots=True)
class BlobRef:
    cid: str  # CID of the whole blob
    size: int  # bytes
    chunk_size: int  # every chunk but the last is exactly this long
    chunk_hashes: tuple[bytes, ...]  # sha256 of each chunk, in order

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_hashes)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index`."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)


def n_chunks_for(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)  # an empty blob has no chunks


def whole_chunk_size(size: int) -> int:
    """The chunk size that makes a blob of `size` bytes one chunk when it fits a fetch
    range (its one hash is then also the CID's: hashed once, not twice); the default
    above that."""
    return MAX_CHUNK_SIZE if size <= MAX_CHUNK_SIZE else DEFAULT_CHUNK_SIZE


def make_blob_ref(
    data: bytes | bytearray | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> BlobRef:
    """The BlobRef of `data` (whole-blob CID plus the sha256 of each chunk)."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise LocalProtocolError(
            f"chunk_size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        )
    mv = memoryview(data).cast("B")
    hashes = tuple(
        hashlib.sha256(mv[i : i + chunk_size]).digest() for i in range(0, len(mv), chunk_size)
    )
    # One chunk: its hash is the whole blob's (one pass over the bytes, not two).
    cid = cid_from_sha256(hashes[0]) if len(hashes) == 1 else cid_of(mv)
    return BlobRef(cid=cid, size=len(mv), chunk_size=chunk_size, chunk_hashes=hashes)


def single_chunk(ref: BlobRef) -> bool:
    """`ref` names one chunk whose hash is the blob's own digest: a verified chunk is then
    a verified blob. (A peer's ref may pair a CID with other hashes: checked here.)"""
    return len(ref.chunk_hashes) == 1 and ref.chunk_hashes[0] == digest_of_cid(ref.cid)


def validate_ref(ref: BlobRef) -> None:
    """RemoteProtocolError unless `ref` is self-consistent (a peer may have sent it)."""
    digest_of_cid(ref.cid)
    if ref.size < 0:
        raise RemoteProtocolError(f"blob {ref.cid}: negative size")
    if not MIN_CHUNK_SIZE <= ref.chunk_size <= MAX_CHUNK_SIZE:
        raise RemoteProtocolError(f"blob {ref.cid}: chunk_size {ref.chunk_size} out of range")
    want = n_chunks_for(ref.size, ref.chunk_size)
    if len(ref.chunk_hashes) != want:
        raise RemoteProtocolError(
            f"blob {ref.cid}: {len(ref.chunk_hashes)} chunk hashes for {want} chunks"
        )
    for h in ref.chunk_hashes:
        if len(h) != 32:
            raise RemoteProtocolError(f"blob {ref.cid}: chunk hash of {len(h)} bytes")


def check_chunk(ref: BlobRef, index: int, data: bytes | bytearray | memoryview) -> bool:
    """True when `data` is exactly chunk `index` of the blob `ref` describes."""
    if not 0 <= index < len(ref.chunk_hashes):
        return False
    if len(data) != ref.chunk_range(index)[1]:
        return False
    return hashlib.sha256(data).digest() == ref.chunk_hashes[index]
