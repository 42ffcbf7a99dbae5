"""Length-prefixed frames on libp2p streams, read in bounded chunks.

py-libp2p's own ``read_varint_prefixed_bytes`` fails on frames over about 6.5 MB, so every
protocol of ours frames with a fixed 4-byte big-endian length and reads it back with
``read_exactly``, which loops over ``stream.read`` in chunks of at most ``READ_CHUNK``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

import trio

from p2pfl.errors import RemoteProtocolError

LOG = logging.getLogger("p2pfl.net.libp2p")

# One read asks for at most this much: big enough to keep the per-call overhead of the
# Python stack low, small enough that a read never holds a huge temporary.
READ_CHUNK = 1024 * 1024
_LEN = struct.Struct(">I")


class ByteStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


class StreamClosedEarly(RemoteProtocolError):
    """The peer closed the stream in the middle of a frame."""


async def read_exactly(stream: Any, n: int) -> bytes:
    """Exactly `n` bytes from `stream`, or StreamClosedEarly if it ends first."""
    if n == 0:
        return b""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(min(n - len(buf), READ_CHUNK))
        except EOFError:
            # libp2p's StreamEOF subclasses EOFError.
            chunk = b""
        if not chunk:
            raise StreamClosedEarly(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: Any, limit: int) -> bytes | None:
    """One frame; None on a clean end of stream *between* frames.

    A length over `limit` is the peer's fault (RemoteProtocolError): the caller resets.
    """
    try:
        head = await stream.read(_LEN.size)
    except EOFError:
        return None
    if not head:
        return None
    if len(head) < _LEN.size:
        head += await read_exactly(stream, _LEN.size - len(head))
    (length,) = _LEN.unpack(head)
    if length > limit:
        raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
    return await read_exactly(stream, length)


class FrameReader:
    """Frames from a stream that carries many small ones (direct messages), read ahead:
    one `stream.read` of up to READ_AHEAD bytes yields every frame it holds, where
    read_frame makes two reads per frame (a header, then a body), each a pass through
    py-libp2p's muxer and its locks. Never holds more than one frame past `limit`:
    a frame's length is checked before its body is read."""

    READ_AHEAD = 64 * 1024

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buf = bytearray()
        self._at = 0  # where the next frame starts in _buf

    async def next(self) -> bytes | None:
        """The next frame; None on a clean end of stream between frames."""
        while True:
            data = self._take()
            if data is not None:
                return data
            try:
                chunk = await self._stream.read(
                    max(self.READ_AHEAD, min(self._wanted(), READ_CHUNK))
                )
            except EOFError:
                chunk = b""
            if not chunk:
                held = len(self._buf) - self._at
                if held == 0:
                    return None
                raise StreamClosedEarly(f"stream ended inside a frame ({held} bytes held)")
            if self._at:
                del self._buf[: self._at]
                self._at = 0
            self._buf += chunk

    def _wanted(self) -> int:
        """Bytes still missing from the frame under way (at least a header's)."""
        held = len(self._buf) - self._at
        if held < _LEN.size:
            return _LEN.size - held
        return _LEN.size + self._length() - held

    def _length(self) -> int:
        (length,) = _LEN.unpack_from(self._buf, self._at)
        if length > self._limit:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {self._limit}")
        return int(length)

    def _take(self) -> bytes | None:
        held = len(self._buf) - self._at
        if held < _LEN.size:
            return None
        end = self._at + _LEN.size + self._length()
        if end > len(self._buf):
            return None
        data = bytes(self._buf[self._at + _LEN.size : end])
        self._at = end
        return data


def frame(data: bytes) -> bytes:
    """`data` with its 4-byte length prefix."""
    return _LEN.pack(len(data)) + data


def frame_header(length: int) -> bytes:
    return _LEN.pack(length)


async def close_quietly(stream: Any) -> None:
    """Close a stream whose peer may already be gone."""
    if stream is None:
        return
    try:
        await stream.close()
    except Exception:
        pass


async def reset_quietly(stream: Any) -> None:
    """Reset a stream (bad input, failure); shielded so it also runs while cancelled."""
    if stream is None:
        return
    try:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.reset()
    except Exception:
        pass


@asynccontextmanager
async def reset_on_error(stream: Any, what: str) -> AsyncIterator[None]:
    """Run a stream's handler; a peer's bad input (RemoteProtocolError, logged as a
    warning) or any other failure (logged at debug: a peer gone) resets the stream."""
    try:
        yield
    except RemoteProtocolError as exc:
        LOG.warning("%s reset: %s", what, exc)
        await reset_quietly(stream)
    except Exception as exc:
        LOG.debug("%s failed: %r", what, exc)
        await reset_quietly(stream)


# Deadlines. Every stage of a transfer is bounded, so a stuck stage fails in seconds (and
# the fetcher asks elsewhere) instead of holding the fetch until fetch_timeout_s. A stage
# that moves data gets time in proportion to its size: STAGE_BASE_S plus the size at
# MIN_RATE_BPS, a rate far below any working link (loopback moves GB/s, a starved loop of
# eight in-process hosts still moves tens of MB/s).
STAGE_BASE_S = 10.0
MIN_RATE_BPS = 512 * 1024


class StageTimeout(Exception):
    """A stage of a transfer missed its deadline; str() names the stage."""


def transfer_deadline(nbytes: int) -> float:
    """Seconds allowed for a stage that moves `nbytes`."""
    return STAGE_BASE_S + nbytes / MIN_RATE_BPS


@contextmanager
def deadline(stage: str, seconds: float) -> Iterator[None]:
    """`trio.fail_after`, raising StageTimeout naming `stage` (an ordinary Exception)."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise StageTimeout(f"{stage} timed out after {seconds:.1f} s") from None


@asynccontextmanager
async def serve_slot(limit: trio.Semaphore, timeout: float) -> AsyncIterator[bool]:
    """Hold one of `limit`'s slots if it frees up within `timeout`; yields whether it did."""
    got = False
    with trio.move_on_after(timeout):
        await limit.acquire()
        got = True
    try:
        yield got
    finally:
        if got:
            limit.release()
