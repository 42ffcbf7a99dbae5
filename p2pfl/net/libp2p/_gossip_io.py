"""Gossip RPCs read from a pubsub stream in whole pieces, not a byte at a time.

py-libp2p 0.8.1's pubsub read loop takes each RPC with `read_varint_prefixed_bytes_limited`,
which reads the length prefix with one `stream.read(1)` per byte and then the body; every
read goes through NetStream's state lock, yamux's stream lock and its credit bookkeeping.
Over 8 hosts in one process that was ten reads per RPC, 35,000 in three rounds, 9% of the
event loop (benchmarks/round.py's libp2p part); a GossipSub node receives every message
about D times (its mesh peers relay it), so that cost is paid per copy.

`read_rpc` keeps what a read returned beyond the current RPC for the next one (per stream,
in a WeakKeyDictionary: it goes with the stream). It checks what the original checks, in
the same order, with the same exceptions: a length prefix over 10 bytes is a ParseError,
a length over `max_length` is MessageTooLarge before any of the body is read, and a stream
that ends mid-RPC is an IncompleteReadError. What it holds for a stream is at most one
RPC at the cap plus one read (READ_SIZE).
"""

from __future__ import annotations

import weakref
from typing import Any

import libp2p.pubsub.pubsub as _pubsub_mod
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge

READ_SIZE = 64 * 1024
_MAX_PREFIX = 10  # bytes of a 64-bit uvarint

_pending: weakref.WeakKeyDictionary[Any, bytearray] = weakref.WeakKeyDictionary()
_original = _pubsub_mod.read_varint_prefixed_bytes_limited


def _prefix(buf: bytearray) -> tuple[int, int]:
    """(length, bytes of the prefix) from the start of `buf`; (0, 0) when incomplete."""
    value = 0
    for i in range(min(len(buf), _MAX_PREFIX)):
        byte = buf[i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    if len(buf) >= _MAX_PREFIX:
        raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
    return 0, 0


async def _more(reader: Any, buf: bytearray, want: int, expected: int) -> None:
    chunk = await reader.read(max(want, READ_SIZE) if want > 0 else READ_SIZE)
    if not chunk:
        raise IncompleteReadError(
            f"Incomplete message: expected {expected}, got {len(buf)}",
            expected_bytes=expected,
            received_bytes=len(buf),
        )
    buf += chunk


async def read_rpc(reader: Any, max_length: int) -> bytes:
    """One varint-prefixed RPC of at most `max_length` bytes (see the module doc)."""
    if max_length <= 0:
        raise ValueError("max_length must be greater than 0")
    buf = _pending.get(reader)
    if buf is None:
        buf = _pending[reader] = bytearray()
    length, used = _prefix(buf)
    while not used:
        await _more(reader, buf, 0, 1)
        length, used = _prefix(buf)
    if length > max_length:
        raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {max_length}")
    while len(buf) < used + length:
        await _more(reader, buf, used + length - len(buf), used + length)
    body = bytes(buf[used : used + length])
    del buf[: used + length]
    return body


def install() -> None:
    """Make py-libp2p's pubsub read loop use read_rpc (idempotent)."""
    _pubsub_mod.read_varint_prefixed_bytes_limited = read_rpc


def uninstall() -> None:
    _pubsub_mod.read_varint_prefixed_bytes_limited = _original
