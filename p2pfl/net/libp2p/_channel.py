"""Bulk channels: keys handed over an authenticated libp2p stream once, then many ranges
requested and answered on one TCP connection.

The bulk session (_bulk, BULK_SESSION_PROTOCOL) negotiates every range on a libp2p
stream: a request and an offer, two yamux frames through Noise, which in pure Python cost
the event loop about a third of a 512 KiB range's fetch (benchmarks/blob.py: 1.2 ms
of loop time per range on a channel, 1.7-1.9 ms on a session). A channel negotiates
once:

1. fetcher -> server, on a "/p2pfl/bulk/1.2.0" stream (Noise: the peer is authenticated,
   the answer is secret): a frame "channel".
2. server -> fetcher: status byte, length, msgpack [port, token, up, down]: a fresh
   one-time 16-byte token and two fresh AES-256-GCM keys, one per direction. Or "busy"
   when the server already holds MAX_KEPT_CONNECTIONS connections, or this peer
   CHANNELS_PER_PEER channels (the fetcher then negotiates per range on a session
   stream, as before).
3. fetcher connects to the server's IP (that of the libp2p connection) at `port` and sends
   the token (within COLLECT_TIMEOUT_S); from then on the connection is the channel,
   bound to the peer the keys were given to. Each exchange, one at a time:
   fetcher: 4-byte length, AESGCM(up).encrypt(nonce i, request, CHANNEL_AAD)
   server: status byte, 4-byte length, AESGCM(down).encrypt(nonce i, body, request +
   status byte), where body is the range (OK) or a reason, and i counts the channel's
   exchanges from 0.
   Each key is used once per nonce (a counter, one key per direction), so nonces never
   repeat under a key. The tags bind each answer to its request and its status, and the
   counter to its place: a replayed, reordered, swapped, truncated or forged frame
   fails to open and ends the channel.

The server checks every request as a session does: may_serve(peer, cid) for the peer the
keys went to, then one of that peer's serve slots (held while the range is sealed and
sent), then the store. A channel with no request for SESSION_IDLE_S is closed; channels
count towards the server's MAX_KEPT_CONNECTIONS; the peer's channels close when its
libp2p connection does (BulkServer.drop_peer).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2pfl.errors import RemoteProtocolError
from p2pfl.net.base import NOT_ALLOWED, MayServe
from p2pfl.net.libp2p import _bulk
from p2pfl.net.libp2p._blob import (
    _MAX_REQUEST,
    FORBIDDEN,
    NOT_FOUND,
    OK,
    SERVER_ERROR,
    FetchRefused,
    allowed,
    decode_request,
    encode_request,
)
from p2pfl.net.libp2p._framing import (
    StageTimeout,
    close_quietly,
    deadline,
    frame,
    read_exactly,
    read_frame,
    reset_on_error,
    serve_slot,
    transfer_deadline,
)

LOG = logging.getLogger("p2pfl.net.libp2p")

BULK_CHANNEL_PROTOCOL = "/p2pfl/bulk/1.2.0"
_HELLO = b"channel"
CHANNEL_AAD = b"p2pfl bulk channel request"
_MAX_REASON = 4096
# Channels a fetcher keeps idle per peer: one per range it fetches from that peer at once.
KEEP_PER_PEER = _bulk.KEEP_PER_PEER
# Peers remembered as not speaking the channel protocol (they get session streams).
_MAX_NO_CHANNEL = 4096


def _nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")


# --- server ----------------------------------------------------------------------------


async def serve_channel_request(
    stream: Any,
    peer: str,
    server: _bulk.BulkServer,
    reader: Any,
    limit: trio.Semaphore,
    count: Callable[[int, int], None],
    may_serve: MayServe,
) -> None:
    """Answer a channel request on a libp2p stream (BULK_CHANNEL_PROTOCOL): hand `peer`
    a token and keys, and hold them until its TCP connection claims them (at most
    COLLECT_TIMEOUT_S)."""
    up, down = AESGCM.generate_key(bit_length=256), AESGCM.generate_key(bit_length=256)
    served = _Served(peer, AESGCM(up), AESGCM(down), reader, limit, count, may_serve)
    await hand_out(stream, peer, server, _HELLO, [up, down], served.serve)


async def hand_out(
    stream: Any,
    peer: str,
    server: _bulk.BulkServer,
    hello: bytes,
    keys: list[bytes],
    serve: Callable[[trio.SocketStream], Awaitable[None]],
    drop_with_peer: bool = True,
) -> None:
    """The server's half of a channel's negotiation on a libp2p stream: read `hello`,
    answer [port, token, *keys] (or "busy"), and hold the token until the peer's TCP
    connection claims it (at most COLLECT_TIMEOUT_S); `serve` then runs on it."""
    async with reset_on_error(stream, f"channel stream from {peer}"):
        with trio.fail_after(_bulk.COLLECT_TIMEOUT_S):
            raw = await read_frame(stream, len(hello))
        if raw != hello:
            raise RemoteProtocolError(f"channel stream: expected {hello.decode()!r}")
        claim = server.offer_channel(peer, serve, drop_with_peer)
        if claim is None:
            await _bulk._answer(stream, SERVER_ERROR, b"busy")
            return
        token, claimed = claim
        try:
            body = msgpack.packb([server.port, token, *keys])
            with trio.fail_after(_bulk.COLLECT_TIMEOUT_S):
                await _bulk._answer(stream, OK, body)
            with trio.move_on_after(_bulk.COLLECT_TIMEOUT_S):
                await claimed.wait()
        finally:
            server.withdraw_channel(token)
        with trio.move_on_after(2):
            await close_quietly(stream)


@dataclass
class _Served:
    """The server's side of one channel: whom it serves, and how."""

    peer: str
    up: AESGCM
    down: AESGCM
    reader: Any
    limit: trio.Semaphore
    count: Callable[[int, int], None]
    may_serve: MayServe

    async def serve(self, sock: trio.SocketStream) -> None:
        """Answer requests one at a time until the fetcher closes the channel, stays
        silent SESSION_IDLE_S, or sends a frame that fails (which ends it)."""
        i = 0
        while True:
            head: bytes | None = None
            with trio.move_on_after(_bulk.SESSION_IDLE_S):
                head = await _receive_head(sock, _bulk._LEN.size)
            if head is None:
                return
            (size,) = _bulk._LEN.unpack(head)
            if not _bulk._TAG < size <= _MAX_REQUEST + _bulk._TAG:
                raise RemoteProtocolError(f"bulk channel request of {size} bytes")
            with trio.fail_after(_bulk.COLLECT_TIMEOUT_S):
                sealed = await _bulk._receive_exactly(sock, size)
            try:
                raw = self.up.decrypt(_nonce(i), sealed, CHANNEL_AAD)
            except InvalidTag:
                raise RemoteProtocolError("bulk channel request failed authentication") from None
            sent = await self._answer(sock, i, raw)
            self.count(len(head) + size, sent)
            i += 1

    async def _answer(self, sock: trio.SocketStream, i: int, raw: bytes) -> int:
        cid, offset, length = decode_request(raw)
        if not allowed(self.may_serve, self.peer, cid):
            return await self._send(sock, i, raw, FORBIDDEN, NOT_ALLOWED.encode())
        # The slot is held while the range is read, sealed and sent: it bounds this
        # peer's share of our memory, as on the other paths.
        async with serve_slot(self.limit, _bulk.SLOT_TIMEOUT_S) as got:
            if not got:
                return await self._send(sock, i, raw, SERVER_ERROR, b"busy")
            try:
                data = self.reader(cid, offset, length)
            except Exception:
                LOG.exception("blob reader failed for %s@%d+%d", cid, offset, length)
                return await self._send(sock, i, raw, SERVER_ERROR, b"server error")
            if data is None:
                return await self._send(sock, i, raw, NOT_FOUND, b"not found")
            return await self._send(sock, i, raw, OK, bytes(data[:length]))

    async def _send(
        self, sock: trio.SocketStream, i: int, raw: bytes, status: int, body: bytes
    ) -> int:
        with trio.fail_after(transfer_deadline(len(body))):
            sealed = await _bulk.seal_with(self.down, _nonce(i), body, raw + bytes([status]))
            await sock.send_all(_bulk._RESP.pack(status, len(sealed)))
            view = memoryview(sealed)
            for off in range(0, len(view), _bulk._IO_CHUNK):
                await sock.send_all(view[off : off + _bulk._IO_CHUNK])
        return _bulk._RESP.size + len(sealed)


async def _receive_head(sock: trio.SocketStream, n: int) -> bytes | None:
    """`n` bytes, or None if the other side closed the connection before the first."""
    first = await sock.receive_some(n)
    if not first:
        return None
    return first + await _bulk._receive_exactly(sock, n - len(first))


# --- fetcher ---------------------------------------------------------------------------


class ChannelBroken(Exception):
    """A kept channel ended before its answer began (the server closed it while idle):
    the request was never answered, so it may go on a fresh channel."""


@dataclass
class Channel:
    """The fetcher's side of one channel."""

    sock: trio.SocketStream
    up: AESGCM
    down: AESGCM
    sent: int = 0  # exchanges so far: the next nonce

    async def fetch(self, cid: str, offset: int, length: int) -> tuple[bytes, int]:
        """One range; (data, wire bytes received). Raises FetchRefused for an error
        answer (the channel stays good), StageTimeout, ChannelBroken, or
        RemoteProtocolError (the channel is then unusable)."""
        raw = encode_request(cid, offset, length)[_bulk._LEN.size :]
        i = self.sent
        self.sent += 1
        request = self.up.encrypt(_nonce(i), raw, CHANNEL_AAD)
        # The answer's header waits for the server's serve slot and its sealing.
        with deadline("bulk channel answer", _bulk.OFFER_TIMEOUT_S):
            try:
                await self.sock.send_all(_bulk._LEN.pack(len(request)) + request)
                head = await _receive_head(self.sock, _bulk._RESP.size)
            except (trio.BrokenResourceError, OSError) as exc:
                if i == 0:
                    raise
                raise ChannelBroken(str(exc)) from None
            if head is None:
                if i == 0:
                    raise RemoteProtocolError("bulk channel closed before its first answer")
                raise ChannelBroken("closed by the server")
        status, size = _bulk._RESP.unpack(head)
        limit = (length if status == OK else _MAX_REASON) + _bulk._TAG
        if not _bulk._TAG <= size <= limit:
            raise RemoteProtocolError(f"bulk channel answer of {size} bytes, at most {limit}")
        with deadline(f"bulk channel transfer of {size} bytes", transfer_deadline(size)):
            sealed = await _bulk._receive_exactly(self.sock, size)
        try:
            body = await _bulk.open_with(self.down, _nonce(i), sealed, raw + bytes([status]))
        except InvalidTag:
            raise RemoteProtocolError("bulk channel answer failed authentication") from None
        if status != OK:
            raise FetchRefused(body.decode("utf-8", "replace") or f"status {status}")
        return body, _bulk._RESP.size + size

    async def aclose(self) -> None:
        await _bulk._aclose(self.sock)


class ChannelBusy(Exception):
    """The server holds as many connections as it keeps: negotiate per range instead."""


async def open_channel(stream: Any) -> Channel:
    """Ask for a channel on `stream` (a BULK_CHANNEL_PROTOCOL stream, closed here) and
    connect it. Raises ChannelBusy, BulkUnreachable (the port cannot be reached),
    StageTimeout or RemoteProtocolError."""
    sock, (up, down) = await negotiate(stream, _HELLO, 2)
    return Channel(sock, AESGCM(up), AESGCM(down))


async def negotiate(
    stream: Any, hello: bytes, n_keys: int
) -> tuple[trio.SocketStream, list[bytes]]:
    """The fetcher's (or sender's) half of hand_out: ask on `stream` (closed here), check
    the offer, connect to the port at the libp2p connection's address and present the
    token. The connection and the `n_keys` 32-byte keys. Raises ChannelBusy,
    BulkUnreachable, StageTimeout or RemoteProtocolError."""
    try:
        with deadline("bulk channel offer", _bulk.OFFER_TIMEOUT_S):
            await stream.write(frame(hello))
            status, size = _bulk._RESP.unpack(await read_exactly(stream, _bulk._RESP.size))
            if size > (_bulk._MAX_OFFER if status == OK else _MAX_REASON):
                raise RemoteProtocolError(f"bulk channel answer of {size} bytes is too long")
            body = await read_exactly(stream, size)
        remote = stream.muxed_conn.get_remote_address()
    finally:
        with trio.move_on_after(2):
            await close_quietly(stream)
    if status != OK:
        raise ChannelBusy(body.decode("utf-8", "replace") or f"status {status}")
    try:
        port, token, *keys = msgpack.unpackb(body)
    except Exception:
        raise RemoteProtocolError("malformed bulk channel offer") from None
    if not (
        isinstance(port, int)
        and 0 < port < 65536
        and isinstance(token, bytes)
        and len(token) == _bulk.TOKEN_LEN
        and len(keys) == n_keys
        and all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    ):
        raise RemoteProtocolError("malformed bulk channel offer")
    if not remote:
        raise RemoteProtocolError("no remote address for the bulk channel")
    address = (str(remote[0]), port)
    try:
        with deadline("bulk channel connect", _bulk.CONNECT_TIMEOUT_S):
            sock = await trio.open_tcp_stream(*address)
    except (StageTimeout, OSError) as exc:
        raise _bulk.BulkUnreachable(f"{address[0]}:{port}: {exc}") from None
    try:
        with deadline("bulk channel token", _bulk.CONNECT_TIMEOUT_S):
            await sock.send_all(token)
    except BaseException:
        await _bulk._aclose(sock)
        raise
    return sock, keys


class Channels:
    """Channels idle between two ranges, per peer (KEEP_PER_PEER each; see IdlePool),
    and the peers that do not speak the channel protocol."""

    def __init__(self) -> None:
        self._idle = _bulk.IdlePool[str, Channel](KEEP_PER_PEER, _bulk.MAX_KEPT_PEERS)
        self.unsupported: set[str] = set()

    async def take(self, peer: str) -> Channel | None:
        channel, stale = self._idle.take(peer)
        for old in stale:
            await old.aclose()
        return channel

    def give(self, peer: str, channel: Channel) -> bool:
        return self._idle.give(peer, channel)

    def lacks(self, peer: str) -> None:
        if len(self.unsupported) < _MAX_NO_CHANNEL:
            self.unsupported.add(peer)

    def forget(self, peer: str) -> None:
        """The peer is gone: close its channels."""
        for channel in self._idle.pop(peer):
            channel.sock.socket.close()

    def idle(self, peer: str) -> int:
        return self._idle.count(peer)

    def close(self) -> None:
        for peer in self._idle.keys():
            self.forget(peer)
