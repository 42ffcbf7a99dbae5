"""Content-addressed blob store, on disk (``root/blobs/<cid>``) or in memory (root=None).

Invariants:
- A file under ``blobs/`` is always complete and its bytes hash to its name: it is written
  to a temp file in the same directory, fsynced, then renamed into place (os.replace is
  atomic). Leftover temp files from a crash are removed when the store opens.
- Partial downloads live under ``partial/<cid>`` (data written at chunk offsets) plus
  ``partial/<cid>.state`` (which chunks are present); a chunk is marked present only after
  its bytes are fsynced, so a restarted node resumes without trusting torn writes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import msgpack

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.store.blobref import BlobRef, single_chunk, validate_ref
from p2pfl.store.cid import _CID_RE, cid_from_sha256, cid_of

# Files at least this large are returned by get() as an mmap view instead of being read.
MMAP_THRESHOLD = 4 * 1024 * 1024
_TMP_PREFIX = ".tmp-"
_STATE_SUFFIX = ".state"


def _check_cid(cid: str) -> None:
    # Cheap and enough for a path: CIDs come from peers and become file names.
    if type(cid) is not str or not _CID_RE.fullmatch(cid):
        raise RemoteProtocolError(f"not a content id: {str(cid)[:80]!r}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | bytearray | memoryview) -> None:
    tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def encode_bitmap(have: bytes | bytearray | list[int] | set[int], n: int | None = None) -> bytes:
    """A chunk bitmap: chunk i is bit (7 - i % 8) of byte i // 8 (BitTorrent's order).

    `have` is either one truthy/falsy entry per chunk, or a set of indices with `n` chunks.
    """
    if isinstance(have, set):
        assert n is not None
        out = bytearray((n + 7) // 8)
        for i in have:
            out[i >> 3] |= 0x80 >> (i & 7)
        return bytes(out)
    out = bytearray((len(have) + 7) // 8)
    for i, h in enumerate(have):
        if h:
            out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def decode_bitmap(bitmap: bytes, n: int) -> set[int] | None:
    """The chunk indices a bitmap of `n` chunks names; None for b"" (every chunk).

    RemoteProtocolError if its length is not ceil(n / 8) or a bit past chunk n-1 is set.
    """
    if not bitmap:
        return None
    if type(bitmap) is not bytes or len(bitmap) != (n + 7) // 8:
        raise RemoteProtocolError(f"chunk bitmap of {len(bitmap)} bytes for {n} chunks")
    if n % 8 and bitmap[-1] & (0xFF >> (n % 8)):
        raise RemoteProtocolError("chunk bitmap has bits set past the last chunk")
    return {
        (k << 3) + b
        for k, byte in enumerate(bitmap)
        if byte
        for b in range(8)
        if byte & (0x80 >> b)
    }


def _hash_mismatch(cid: str, got: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"hash-mismatch: expected {cid}, data hashes to {got}")


class BlobStore:
    """Blobs by CID. `root=None` keeps everything in memory (simulations, tests)."""

    def __init__(self, root: Path | str | None) -> None:
        self.root = Path(root) if root is not None else None
        self._mem: dict[str, bytes] = {}
        self._mem_partials: dict[str, MemoryPartialBlob] = {}
        # The download in progress per cid (the latest opened), so `read` can serve its
        # verified chunks to other peers before the whole blob is in.
        self._open: dict[str, PartialBlob] = {}
        if self.root is not None:
            self._blobs = self.root / "blobs"
            self._partial = self.root / "partial"
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._partial.mkdir(parents=True, exist_ok=True)
            for d in (self._blobs, self._partial):
                for p in d.glob(_TMP_PREFIX + "*"):
                    p.unlink(missing_ok=True)  # torn writes from a crash

    # --- whole blobs -------------------------------------------------------------------

    def _path(self, cid: str) -> Path:
        _check_cid(cid)
        return self._blobs / cid

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store `data`; returns its CID. Storing the same bytes twice is a no-op."""
        cid = cid_of(data)
        self._store(cid, data)
        return cid

    def put_hashed(self, ref: BlobRef, data: bytes | bytearray | memoryview) -> None:
        """Store `data` under `ref`, which the caller made from these very bytes
        (make_blob_ref): they are not hashed again. Never for a peer's ref and bytes."""
        self._store(ref.cid, data)

    def put_verified(self, cid: str, data: bytes | bytearray | memoryview) -> None:
        """Store `data` under `cid`; RemoteProtocolError("hash-mismatch...") if it is not."""
        _check_cid(cid)
        got = cid_of(data)
        if got != cid:
            raise _hash_mismatch(cid, got)
        self._store(cid, data)

    def put_file(self, path: Path | str) -> str:
        """Store a file's contents, hashing while copying (no need to fit it in memory)."""
        h = hashlib.sha256()
        if self.root is None:
            data = Path(path).read_bytes()
            return self.put(data)
        tmp = self._blobs / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    h.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            cid = cid_from_sha256(h.digest())
            os.replace(tmp, self._blobs / cid)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self._blobs)
        return cid

    def _store(self, cid: str, data: bytes | bytearray | memoryview) -> None:
        if self.root is None:
            if cid not in self._mem:
                self._mem[cid] = bytes(data)
            return
        path = self._blobs / cid
        if not path.exists():
            _atomic_write(path, data)

    def has(self, cid: str) -> bool:
        if self.root is None:
            return cid in self._mem
        return type(cid) is str and bool(_CID_RE.fullmatch(cid)) and (self._blobs / cid).exists()

    def get(self, cid: str) -> bytes | memoryview:
        """The whole blob (large files as a read-only mmap view); KeyError if absent."""
        if self.root is None:
            try:
                return self._mem[cid]
            except KeyError:
                raise KeyError(cid) from None
        path = self._path(cid)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < MMAP_THRESHOLD:
                    return f.read()
                # The mapping outlives the file object (and even an unlink of the file).
                return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except FileNotFoundError:
            raise KeyError(cid) from None

    def read(self, cid: str, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset+length) of a blob, short at its end; None if not held.

        This is the network's BlobReader: `cid`, `offset` and `length` come from a peer.
        """
        if type(cid) is not str or not _CID_RE.fullmatch(cid) or offset < 0 or length < 0:
            return None
        if self.root is None:
            data = self._mem.get(cid)
            if data is not None:
                return data[offset : offset + length]
        else:
            try:
                with open(self._blobs / cid, "rb") as f:
                    return os.pread(f.fileno(), length, offset)
            except FileNotFoundError:
                pass
        # Being downloaded: serve the verified chunks we already hold (swarming).
        partial = self._open.get(cid)
        return None if partial is None else partial.read_verified(offset, length)

    def size(self, cid: str) -> int | None:
        """Size in bytes, or None if not held."""
        if self.root is None:
            data = self._mem.get(cid)
            return None if data is None else len(data)
        try:
            return self._path(cid).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, cid: str) -> bool:
        """Remove a blob; True if it was there."""
        if self.root is None:
            return self._mem.pop(cid, None) is not None
        try:
            self._path(cid).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self) -> list[str]:
        """CIDs of all complete blobs, sorted."""
        if self.root is None:
            return sorted(self._mem)
        return sorted(p.name for p in self._blobs.iterdir() if _CID_RE.fullmatch(p.name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    # --- partial downloads -------------------------------------------------------------

    def open_partial(self, ref: BlobRef) -> PartialBlob:
        """A download of `ref` in progress, resumed from disk if one was started before.

        RemoteProtocolError if `ref` is inconsistent (it may come from a peer).
        """
        validate_ref(ref)
        if self.has(ref.cid):
            return HeldPartialBlob(self, ref)
        if self.root is None:
            p: PartialBlob | None = self._mem_partials.get(ref.cid)
            if p is None or p.ref != ref:
                p = self._mem_partials[ref.cid] = MemoryPartialBlob(self, ref)
        else:
            p = DiskPartialBlob(self, ref)
        self._open[ref.cid] = p
        return p


class PartialBlob:
    """Chunks of one blob arriving in any order, each verified against `ref.chunk_hashes`."""

    def __init__(self, store: BlobStore, ref: BlobRef) -> None:
        self.store = store
        self.ref = ref
        self._have = bytearray(len(ref.chunk_hashes))  # 1 per chunk present

    def missing(self) -> list[int]:
        """Indices of the chunks still needed, ascending."""
        return [i for i, h in enumerate(self._have) if not h]

    def has_chunk(self, index: int) -> bool:
        return bool(self._have[index])

    def complete(self) -> bool:
        return all(self._have)

    def have_count(self) -> int:
        return sum(self._have)

    def bitmap(self) -> bytes:
        """Chunks held as a bitmap: chunk i is bit (7 - i % 8) of byte i // 8."""
        return encode_bitmap(self._have)

    def read_verified(self, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset+length) (short at the blob's end) if every chunk they
        touch is verified and written, else None. `offset`/`length` come from a peer.

        Safe against a reader racing a writer: a chunk's bit is set only after its bytes
        are in place (and fsynced on disk), and bits are never cleared except by discard.
        """
        ref = self.ref
        if offset < 0 or length < 0 or offset >= ref.size:
            return None
        end = min(offset + length, ref.size)
        if end <= offset:
            return b""
        have = self._have
        for i in range(offset // ref.chunk_size, (end - 1) // ref.chunk_size + 1):
            if not have[i]:
                return None
        return self._read(offset, end - offset)

    def _read(self, offset: int, length: int) -> bytes | None:
        return None

    def bytes_have(self) -> int:
        ref = self.ref
        n = sum(self._have)
        if n and self._have[-1]:  # the last chunk may be short
            return (n - 1) * ref.chunk_size + ref.chunk_range(len(self._have) - 1)[1]
        return n * ref.chunk_size

    def _check(self, index: int, data: bytes | bytearray | memoryview) -> None:
        ref = self.ref
        if not 0 <= index < len(ref.chunk_hashes):
            raise LocalProtocolError(f"blob {ref.cid}: no chunk {index}")
        want = ref.chunk_range(index)[1]
        if len(data) != want:
            raise RemoteProtocolError(
                f"hash-mismatch: blob {ref.cid} chunk {index} is {len(data)} bytes, not {want}"
            )
        if hashlib.sha256(data).digest() != ref.chunk_hashes[index]:
            raise RemoteProtocolError(f"hash-mismatch: blob {ref.cid} chunk {index}")

    def write_chunk(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Verify and store chunk `index`; RemoteProtocolError("hash-mismatch...") if wrong."""
        self._check(index, data)
        if not self._have[index]:
            self._write(index, data)
            self._have[index] = 1

    def finish(self) -> str:
        """Verify the whole blob's CID and move it into the store; returns the CID.

        On a mismatch the partial is discarded and RemoteProtocolError is raised.
        """
        if not self.complete():
            raise LocalProtocolError(f"blob {self.ref.cid}: {len(self.missing())} chunks missing")
        return self._finish()

    def discard(self) -> None:
        """Forget the download and delete what it wrote."""
        self._have = bytearray(len(self.ref.chunk_hashes))
        self._close()

    def _close(self) -> None:
        # No longer served as a partial (finished: the store serves the blob; discarded).
        if self.store._open.get(self.ref.cid) is self:
            del self.store._open[self.ref.cid]

    def _write(self, index: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def _finish(self) -> str:
        raise NotImplementedError


class HeldPartialBlob(PartialBlob):
    """The store already holds the whole blob: nothing to fetch, finish() is immediate."""

    def __init__(self, store: BlobStore, ref: BlobRef) -> None:
        super().__init__(store, ref)
        self._have = bytearray(b"\x01" * len(ref.chunk_hashes))

    def _write(self, index: int, data: bytes | bytearray | memoryview) -> None:
        pass

    def _finish(self) -> str:
        return self.ref.cid


class MemoryPartialBlob(PartialBlob):
    """A download held in memory. A one-chunk blob (a reduce-scatter slice usually is) is
    kept as its chunk arrived, without a buffer to copy it into and out of again."""

    def __init__(self, store: BlobStore, ref: BlobRef) -> None:
        super().__init__(store, ref)
        self._buf: bytearray | bytes = b""  # sized at the first write

    def _write(self, index: int, data: bytes | bytearray | memoryview) -> None:
        if len(self.ref.chunk_hashes) == 1:
            self._buf = bytes(data)  # the same object when `data` is bytes
            return
        buf = self._buf
        if not isinstance(buf, bytearray):
            buf = self._buf = bytearray(self.ref.size)
        offset = index * self.ref.chunk_size
        buf[offset : offset + len(data)] = data

    def _finish(self) -> str:
        cid = self.ref.cid
        # A one-chunk blob whose chunk hash is its CID's digest was verified whole when
        # its chunk was: no second pass.
        if not single_chunk(self.ref):
            got = cid_of(self._buf)
            if got != cid:
                self.discard()
                raise _hash_mismatch(cid, got)
        self.store._mem.setdefault(cid, bytes(self._buf))
        self.store._mem_partials.pop(cid, None)
        self._close()
        return cid

    def _read(self, offset: int, length: int) -> bytes | None:
        return bytes(self._buf[offset : offset + length])

    def discard(self) -> None:
        super().discard()
        self._buf = b""
        self.store._mem_partials.pop(self.ref.cid, None)


class DiskPartialBlob(PartialBlob):
    def __init__(self, store: BlobStore, ref: BlobRef) -> None:
        super().__init__(store, ref)
        assert store.root is not None
        self._data_path = store._partial / ref.cid
        self._state_path = store._partial / (ref.cid + _STATE_SUFFIX)
        self._load_state()

    def _state_header(self) -> dict[str, object]:
        # What the bitmap means; a different chunking of the same blob starts over.
        return {"size": self.ref.size, "chunk_size": self.ref.chunk_size}

    def _load_state(self) -> None:
        try:
            state = msgpack.unpackb(self._state_path.read_bytes(), raw=False)
            have = state["have"]
            ok = (
                type(state) is dict
                and {k: state.get(k) for k in ("size", "chunk_size")} == self._state_header()
                and type(have) is bytes
                and len(have) == len(self._have)
                and self._data_path.exists()
            )
        except Exception:
            ok = False
        if ok:
            self._have = bytearray(1 if b else 0 for b in have)
        else:
            self._have = bytearray(len(self.ref.chunk_hashes))
            self._state_path.unlink(missing_ok=True)
            self._data_path.unlink(missing_ok=True)

    def _save_state(self) -> None:
        state = dict(self._state_header(), have=bytes(self._have))
        _atomic_write(self._state_path, msgpack.packb(state, use_bin_type=True))

    def _write(self, index: int, data: bytes | bytearray | memoryview) -> None:
        fd = os.open(self._data_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, index * self.ref.chunk_size)
            os.fsync(fd)  # the bytes are durable before the bitmap says they are there
        finally:
            os.close(fd)
        self._have[index] = 1
        self._save_state()

    def _finish(self) -> str:
        cid = self.ref.cid
        h = hashlib.sha256()
        if self.ref.size == 0:
            self._data_path.touch()
        with open(self._data_path, "r+b") as f:
            f.truncate(self.ref.size)
            while block := f.read(1 << 20):
                h.update(block)
            f.flush()
            os.fsync(f.fileno())
        got = cid_from_sha256(h.digest())
        if got != cid:
            self.discard()
            raise _hash_mismatch(cid, got)
        os.replace(self._data_path, self.store._blobs / cid)
        _fsync_dir(self.store._blobs)
        self._state_path.unlink(missing_ok=True)
        self._close()
        return cid

    def _read(self, offset: int, length: int) -> bytes | None:
        try:
            with open(self._data_path, "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            # Finished (moved into blobs/) or discarded meanwhile by another thread.
            try:
                with open(self.store._blobs / self.ref.cid, "rb") as f:
                    return os.pread(f.fileno(), length, offset)
            except FileNotFoundError:
                return None

    def discard(self) -> None:
        super().discard()
        self._state_path.unlink(missing_ok=True)
        self._data_path.unlink(missing_ok=True)
