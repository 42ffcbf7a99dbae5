"""Append-only msgpack journal: one per node, for state that must survive a restart.

Each record on disk is ``u32 length | u32 crc32 | msgpack map`` (little-endian). Records
are appended and fsynced one by one; a crash can only tear the last one, so opening the
journal drops (truncates) a torn or corrupt tail and keeps every record before it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from p2pfl.errors import LocalProtocolError

_HEAD = struct.Struct("<II")
MAX_RECORD_BYTES = 16 * 1024 * 1024


def _scan(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(end offset, record) for each intact record, stopping at the first bad one."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, pos)
        start, end = pos + _HEAD.size, pos + _HEAD.size + length
        if length > MAX_RECORD_BYTES or end > len(data):
            return
        body = data[start:end]
        if zlib.crc32(body) != crc:
            return
        try:
            rec = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception:
            return
        if type(rec) is not dict:
            return
        yield end, rec
        pos = end


class Journal:
    """`Journal(path).append({...})`; `.replay()` yields the records in order."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        good = 0
        for end, _rec in _scan(self.path):
            good = end
        if good != self.path.stat().st_size:
            # A torn or corrupt tail (crash mid-append): cut it off so appends continue
            # from the last intact record.
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (fsync before returning)."""
        if type(record) is not dict:
            raise LocalProtocolError("a journal record is a dict")
        try:
            body = msgpack.packb(record, use_bin_type=True)
        except Exception as e:
            raise LocalProtocolError(f"journal record cannot be packed: {e}") from e
        if len(body) > MAX_RECORD_BYTES:
            raise LocalProtocolError(f"journal record of {len(body)} bytes is too large")
        os.write(self._fd, _HEAD.pack(len(body), zlib.crc32(body)) + body)
        os.fsync(self._fd)

    def replay(self) -> Iterator[dict[str, Any]]:
        """Every intact record, oldest first."""
        for _end, rec in _scan(self.path):
            yield rec

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
