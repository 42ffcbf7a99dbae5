"""The blob protocol: one stream per range request.

Request:  frame(msgpack [cid, offset, length])            (length <= MAX_FETCH_BYTES)
Response: status byte, 4-byte big-endian length, body.    status 0: body is the data
                                                          (short at the end of the blob);
                                                          otherwise body is a reason text
                                                          (status 4: "not allowed", this
                                                          peer may not have this blob).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import trio

from p2pfl.errors import RemoteProtocolError
from p2pfl.net.base import MAX_FETCH_BYTES, NOT_ALLOWED, BlobReader, MayServe, allow_all
from p2pfl.net.libp2p._framing import (
    deadline,
    frame,
    read_exactly,
    read_frame,
    serve_slot,
    transfer_deadline,
)

LOG = logging.getLogger("p2pfl.net.libp2p")

BLOB_PROTOCOL = "/p2pfl/blob/1.0.0"
OK, NOT_FOUND, BAD_REQUEST, SERVER_ERROR, FORBIDDEN = 0, 1, 2, 3, 4
_RESP = struct.Struct(">BI")
_MAX_REQUEST = 1024
_MAX_REASON = 4096
_MAX_CID = 256
# A requester that does not finish sending its (tiny) request by then is dropped.
REQUEST_TIMEOUT_S = 10.0
# How long a request waits for one of the peer's serve slots before it is answered "busy".
SLOT_TIMEOUT_S = 10.0
# The fetcher's deadline for the answer's header: the server's slot wait plus the trip.
HEADER_TIMEOUT_S = SLOT_TIMEOUT_S + 5.0


class FetchRefused(Exception):
    """The serving peer answered with an error status; str() is its reason."""


class _Busy(Exception):
    """No serve slot came free in time."""


def allowed(may_serve: MayServe, peer: str, cid: str) -> bool:
    """`may_serve(peer, cid)`, failing closed: a hook that raises refuses (and says so)."""
    try:
        return bool(may_serve(peer, cid))
    except Exception:
        LOG.exception("may_serve failed for %s / %s: refusing", peer, cid[:80])
        return False


def encode_request(cid: str, offset: int, length: int) -> bytes:
    return frame(msgpack.packb([cid, offset, length]))


def decode_request(raw: bytes) -> tuple[str, int, int]:
    """Parse and check a request; RemoteProtocolError names what is wrong."""
    try:
        value = msgpack.unpackb(raw)
    except Exception as exc:
        raise RemoteProtocolError(f"blob request is not msgpack: {exc}") from None
    if not (isinstance(value, list) and len(value) == 3):
        raise RemoteProtocolError("blob request must be [cid, offset, length]")
    cid, offset, length = value
    if not isinstance(cid, str) or not 0 < len(cid) <= _MAX_CID:
        raise RemoteProtocolError("blob request: cid must be a non-empty string <= 256 chars")
    if not isinstance(offset, int) or offset < 0:
        raise RemoteProtocolError("blob request: offset must be an int >= 0")
    if not isinstance(length, int) or not 0 < length <= MAX_FETCH_BYTES:
        raise RemoteProtocolError(f"blob request: length must be in 1..{MAX_FETCH_BYTES}")
    return cid, offset, length


async def serve_blob_stream(
    stream: Any,
    peer: str,
    reader: BlobReader,
    limit: trio.Semaphore,
    count: Callable[[int, int], None],
    may_serve: MayServe = allow_all,
) -> None:
    """Answer one request on `stream`. Never raises: bad input resets the stream.

    `may_serve(peer, cid)` is asked before anything is read: a refused peer gets a
    FORBIDDEN answer at once (the fetcher fails with "not allowed", no timeout)."""
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            raw = await read_frame(stream, _MAX_REQUEST)
        if raw is None:
            raise RemoteProtocolError("blob stream closed before a request")
        cid, offset, length = decode_request(raw)
        if not allowed(may_serve, peer, cid):
            # Refused before a slot or a read: costs this node one small answer.
            status, body = FORBIDDEN, NOT_ALLOWED.encode()
            with trio.fail_after(transfer_deadline(len(body))):
                await stream.write(_RESP.pack(status, len(body)) + body)
        else:
            status, body = await _answer_range(stream, reader, limit, cid, offset, length)
        count(len(raw) + 4, _RESP.size + len(body))
        with trio.move_on_after(2):  # the answer is out: never hold the task long here
            await stream.close()
    except RemoteProtocolError as exc:
        LOG.warning("blob stream from %s reset: %s", peer, exc)
        await _reset(stream)
    except trio.TooSlowError:
        LOG.warning("blob stream from %s reset: request or answer past its deadline", peer)
        await _reset(stream)
    except Exception as exc:  # the peer went away mid-answer, most likely
        LOG.debug("blob stream from %s failed: %r", peer, exc)
        await _reset(stream)


async def _answer_range(
    stream: Any, reader: BlobReader, limit: trio.Semaphore, cid: str, offset: int, length: int
) -> tuple[int, bytes]:
    """Read the range under one of the peer's serve slots and write the answer."""
    # Bounds how many ranges one peer has us read at once; every holder is bounded in
    # time (the write below), so the wait is too, and past it the answer is "busy".
    async with serve_slot(limit, SLOT_TIMEOUT_S) as got:
        try:
            if not got:
                raise _Busy
            data = reader(cid, offset, length)
        except _Busy:
            status, body = SERVER_ERROR, b"busy"
        except Exception:
            LOG.exception("blob reader failed for %s@%d+%d", cid, offset, length)
            status, body = SERVER_ERROR, b"server error"
        else:
            if data is None:
                status, body = NOT_FOUND, b"not found"
            elif len(data) > length:
                LOG.error("blob reader returned %d bytes for %d asked", len(data), length)
                status, body = SERVER_ERROR, b"server error"
            else:
                status, body = OK, data
        with trio.fail_after(transfer_deadline(len(body))):
            await stream.write(_RESP.pack(status, len(body)))
            if body:
                await stream.write(body)
    return status, body


async def request_range(stream: Any, cid: str, offset: int, length: int) -> tuple[bytes, int]:
    """Ask for one range on a fresh stream; (data, bytes read on the wire).

    Raises FetchRefused for an error answer, RemoteProtocolError for a malformed one,
    StageTimeout for a stage past its deadline.
    """
    with deadline("blob request", HEADER_TIMEOUT_S):
        await stream.write(encode_request(cid, offset, length))
        head = await read_exactly(stream, _RESP.size)
    status, size = _RESP.unpack(head)
    limit = length if status == OK else _MAX_REASON
    if size > limit:
        raise RemoteProtocolError(f"blob answer of {size} bytes exceeds {limit}")
    with deadline(f"blob transfer of {size} bytes", transfer_deadline(size)):
        body = await read_exactly(stream, size)
    if status != OK:
        raise FetchRefused(body.decode("utf-8", "replace") or f"status {status}")
    return body, _RESP.size + size


async def _reset(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
