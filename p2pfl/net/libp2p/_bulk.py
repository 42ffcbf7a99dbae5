"""The fast bulk path: a blob range over plain TCP, keyed over an authenticated libp2p stream.

py-libp2p's Noise + yamux moves about 60-120 MB/s; a TCP socket with AES-GCM moves GB/s
(shared/LIBP2P-NOTES.md). So a range is *negotiated* on the libp2p stream
"/p2pfl/bulk/1.0.0" (Noise: the peer is authenticated and the reply is secret) and the
bytes travel on a TCP connection, which the fetcher keeps for its next range from that
server (KeptSockets: a connect and an accept saved per range):

1. fetcher -> server, on the stream: the same request as the blob protocol.
2. server -> fetcher, on the stream: status byte, length, msgpack [port, token, key, size]
   (or an error reason, as the blob protocol). `key` is a fresh AES-256-GCM key, `token`
   a fresh 16-byte one-time ticket; the server holds the range until it is collected.
3. fetcher connects to the server's IP (that of the libp2p connection) at `port`, or
   takes a connection it kept from an earlier range, and sends `token`; the server
   answers with a 4-byte length and AESGCM(key).encrypt(nonce 0, data, aad = token +
   request). A key is used for exactly one message, so a zero nonce is safe; the
   tag detects truncation, tampering and a replayed or swapped range.
   A kept connection carries only tokens, each good once: keeping it grants nothing. An
   unknown token ends it; so does the server's idle limit or its cap on kept
   connections, and then the fetcher sends the same token on a fresh connection (the
   server never read it).

Any failure of this path (no route to the port, a firewall, an old peer) makes the caller
fall back to the blob stream protocol; a stage that misses its deadline (StageTimeout: the
server is overloaded) fails the fetch instead, so the fetcher asks another provider rather
than loading the same server with the costlier stream path.

Every stage has a deadline (see _framing.deadline): the offer (server side: waiting for a
serve slot, then "busy"), the TCP connect and token, and the range itself in proportion to
its size. Sealing and opening a large range run in a worker thread: `cryptography`'s AEAD
releases the GIL, and the event loop keeps serving pings and other transfers meanwhile.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.net.base import NOT_ALLOWED, MayServe, allow_all
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
    read_exactly,
    read_frame,
    reset_on_error,
    serve_slot,
    transfer_deadline,
)

LOG = logging.getLogger("p2pfl.net.libp2p")

K = TypeVar("K")
V = TypeVar("V")

BULK_PROTOCOL = "/p2pfl/bulk/1.0.0"
# The same exchange, several times on one stream, one request at a time: a fetcher keeps
# the stream for its next range from that peer (see BulkStreams). Opening a stream costs
# yamux frames both ways and a multistream-select exchange, which in pure Python was as
# much event-loop time as the range's bytes for 1 MiB ranges. 1.0.0 is one range per stream.
BULK_SESSION_PROTOCOL = "/p2pfl/bulk/1.1.0"
# A kept stream with no request for this long is closed by the server; a fetcher reuses
# one only while it has been idle for less than FETCHER_IDLE_S.
SESSION_IDLE_S = 30.0
FETCHER_IDLE_S = 15.0
# Idle streams a fetcher keeps per peer (a blob fetch asks a peer for at most 2 ranges at
# once, and a round fetches a few blobs from one peer), and peers it keeps them for.
KEEP_PER_PEER = 4
MAX_KEPT_PEERS = 1024
TOKEN_LEN = 16
# TCP connections a server keeps open between ranges, at most (each is a socket and a
# task), and idle ones a fetcher keeps per server address.
MAX_KEPT_CONNECTIONS = 256
# Channels (_channel.py) one peer may hold, connected or handed out: its fetches at once
# (KEEP_PER_PEER kept, and as many being opened). One peer cannot take the server's cap.
CHANNELS_PER_PEER = 2 * KEEP_PER_PEER
KEEP_SOCKETS_PER_SERVER = 4
MAX_KEPT_SERVERS = 1024
_NONCE = bytes(12)
_TAG = 16
_RESP = struct.Struct(">BI")
_LEN = struct.Struct(">I")
_MAX_OFFER = 256
# How long a prepared range waits for its fetcher's TCP connection and token (the fetcher
# gives itself CONNECT_TIMEOUT_S for that, counted from a later moment: a late fetcher
# finds its token withdrawn, and falls back).
COLLECT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# How long a request waits for one of the peer's serve slots before it is answered "busy".
SLOT_TIMEOUT_S = 10.0
# The fetcher's deadline for the offer: the server's slot wait plus the answer's trip.
OFFER_TIMEOUT_S = SLOT_TIMEOUT_S + 5.0
# Ranges at least this large are sealed and opened in a worker thread. AES-GCM takes
# about 0.14 ms per MiB here (0.6 ms for a 4 MiB range, MAX_FETCH_BYTES), less than a
# round trip to a worker thread costs the event loop, which under load is most of a
# small range's latency: ranges up to a MiB, the default chunk, stay on the loop.
THREAD_CRYPTO_BYTES = 1024 * 1024 + 1
# Copying in bounded slices keeps each socket call reasonable and lets trio interleave.
_IO_CHUNK = 1024 * 1024


class IdlePool(Generic[K, V]):
    """What a fetcher keeps idle between two ranges (session streams, TCP connections),
    per key: at most `per_key` per key and `max_keys` keys. One idle for FETCHER_IDLE_S
    or more is not handed out again (the server closes its side after SESSION_IDLE_S):
    take() returns it among the stale ones, for the caller to close."""

    def __init__(self, per_key: int, max_keys: int) -> None:
        self._per_key = per_key
        self._max_keys = max_keys
        self._idle: dict[K, list[tuple[V, float]]] = {}

    def take(self, key: K) -> tuple[V | None, list[V]]:
        """(an item idle for less than FETCHER_IDLE_S or None, the stale ones passed)."""
        kept = self._idle.get(key)
        now = trio.current_time()
        stale: list[V] = []
        while kept:
            item, at = kept.pop()
            if not kept:
                del self._idle[key]
            if now - at < FETCHER_IDLE_S:
                return item, stale
            stale.append(item)
        return None, stale

    def give(self, key: K, item: V) -> bool:
        """Keep `item` for the next range under `key`; False: the caller closes it."""
        kept = self._idle.get(key)
        if kept is None:
            if len(self._idle) >= self._max_keys:
                return False
            kept = self._idle[key] = []
        if len(kept) >= self._per_key:
            return False
        kept.append((item, trio.current_time()))
        return True

    def pop(self, key: K) -> list[V]:
        """Everything kept under `key`, no longer kept."""
        return [item for item, _at in self._idle.pop(key, ())]

    def keys(self) -> list[K]:
        return list(self._idle)

    def count(self, key: K | None = None) -> int:
        """Items kept under `key` (all of them: None)."""
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(kept) for kept in self._idle.values())


class KeptSockets:
    """TCP connections to bulk servers, idle between two ranges, per server address
    (KEEP_SOCKETS_PER_SERVER each, MAX_KEPT_SERVERS addresses; see IdlePool)."""

    def __init__(self) -> None:
        self.pool = IdlePool[tuple[str, int], trio.SocketStream](
            KEEP_SOCKETS_PER_SERVER, MAX_KEPT_SERVERS
        )

    def take(self, address: tuple[str, int]) -> trio.SocketStream | None:
        sock, stale = self.pool.take(address)
        for old in stale:
            old.socket.close()
        return sock

    def give(self, address: tuple[str, int], sock: trio.SocketStream) -> bool:
        return self.pool.give(address, sock)

    def close(self) -> None:
        for address in self.pool.keys():
            for sock in self.pool.pop(address):
                sock.socket.close()


class BulkUnreachable(Exception):
    """The server's bulk port cannot be reached from here (a firewall, NAT, relay)."""


@dataclass
class _Pending:
    key: bytes
    data: bytes
    aad: bytes
    claimed: trio.Event = field(default_factory=trio.Event)  # the token was presented
    collected: trio.Event = field(default_factory=trio.Event)
    # Bytes this range put on its TCP connection: each serve counts its own, because
    # serves of one server overlap (a shared counter's growth would count the others').
    sent: int = 0


@dataclass
class _ChannelClaim:
    """A channel handed out (_channel.py) whose TCP connection has not come yet."""

    peer: str
    serve: Callable[[trio.SocketStream], Awaitable[None]]
    claimed: trio.Event = field(default_factory=trio.Event)
    # Closed when the peer's libp2p connection goes (a fetch channel serves our blobs to
    # it). A message channel is not: what the peer wrote before it went is still its
    # own, authenticated, and its sender only learns of a close at a later write.
    drop_with_peer: bool = True


class BulkServer:
    """The TCP side of the bulk path: one listener, one-time tickets for ranges and for
    channels (_channel.py)."""

    def __init__(self, bind_host: str, port: int = 0) -> None:
        self.bind_host = bind_host
        self.port = port  # 0: a free one, chosen at start
        self._pending: dict[bytes, _Pending] = {}
        self._channels: dict[bytes, _ChannelClaim] = {}
        # Channels being served, per peer (to close them when the peer goes).
        self._serving: dict[str, set[trio.CancelScope]] = {}
        self._kept_past_peer: set[trio.CancelScope] = set()  # not closed by drop_peer
        self._kept = 0  # connections waiting for a further token
        self.accepted = 0  # TCP connections accepted (fetchers keep theirs between ranges)
        self.bytes_sent = 0  # over every connection (each range's own: _Pending.sent)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.bind_host)
        except OSError as exc:
            raise LocalProtocolError(
                f"cannot open the bulk port {self.bind_host}:{self.port}: {exc.strerror}"
                " (--bulk-port picks another, --bulk-port off disables the bulk path)"
            ) from None
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def offer(self, data: bytes, request: bytes) -> tuple[bytes, bytes, _Pending]:
        token, key = os.urandom(TOKEN_LEN), AESGCM.generate_key(bit_length=256)
        pending = _Pending(key, data, token + request)
        self._pending[token] = pending
        return token, key, pending

    def withdraw(self, token: bytes) -> None:
        self._pending.pop(token, None)

    def offer_channel(
        self,
        peer: str,
        serve: Callable[[trio.SocketStream], Awaitable[None]],
        drop_with_peer: bool = True,
    ) -> tuple[bytes, trio.Event] | None:
        """A token for a channel to `peer`, which `serve` answers once its connection
        comes; None when the server already holds MAX_KEPT_CONNECTIONS connections
        (kept, channels, and channels handed out but not yet connected), or `peer`
        CHANNELS_PER_PEER channels."""
        held = self._kept + len(self._channels) + self.channels()
        if held >= MAX_KEPT_CONNECTIONS:
            return None
        handed = sum(1 for claim in self._channels.values() if claim.peer == peer)
        if handed + self.channels(peer) >= CHANNELS_PER_PEER:
            return None
        token = os.urandom(TOKEN_LEN)
        claim = self._channels[token] = _ChannelClaim(peer, serve, drop_with_peer=drop_with_peer)
        return token, claim.claimed

    def withdraw_channel(self, token: bytes) -> None:
        self._channels.pop(token, None)

    def drop_peer(self, peer: str) -> None:
        """`peer`'s libp2p connection is gone: so are its channels."""
        for scope in self._serving.get(peer, ()):
            if scope not in self._kept_past_peer:
                scope.cancel()

    def channels(self, peer: str | None = None) -> int:
        """Channels being served (to `peer`, if given)."""
        if peer is not None:
            return len(self._serving.get(peer, ()))
        return sum(map(len, self._serving.values()))

    async def _serve_channel(self, sock: trio.SocketStream, claim: _ChannelClaim) -> None:
        claim.claimed.set()
        with trio.CancelScope() as scope:
            serving = self._serving.setdefault(claim.peer, set())
            serving.add(scope)
            if not claim.drop_with_peer:
                self._kept_past_peer.add(scope)
            try:
                await claim.serve(sock)
            finally:
                serving.discard(scope)
                self._kept_past_peer.discard(scope)
                if not serving and self._serving.get(claim.peer) is serving:
                    del self._serving[claim.peer]

    async def _handle(self, sock: trio.SocketStream) -> None:
        """Serve the ranges whose tokens come on this connection, one after another: a
        fetcher keeps it for its next range from us (KeptSockets), which saves a TCP
        connect and an accept per range. The first token must come within
        COLLECT_TIMEOUT_S (an unauthenticated connection holds nothing longer); a kept
        connection waits SESSION_IDLE_S for the next, and at most MAX_KEPT_CONNECTIONS
        wait at once (past that, a connection closes after its range)."""
        self.accepted += 1
        try:
            with trio.fail_after(COLLECT_TIMEOUT_S):
                token = await _receive_exactly(sock, TOKEN_LEN)
            claim = self._channels.pop(token, None)  # one-time, like a range's token
            if claim is not None:
                await self._serve_channel(sock, claim)
                return
            while await self._serve_token(sock, token):
                if self._kept >= MAX_KEPT_CONNECTIONS:
                    return
                self._kept += 1
                following: bytes | None = None
                try:
                    with trio.move_on_after(SESSION_IDLE_S):
                        following = await _receive_token(sock)
                finally:
                    self._kept -= 1
                if following is None:
                    return  # idle, or the fetcher closed it between ranges
                token = following
        except RemoteProtocolError as exc:
            LOG.warning("bulk connection closed: %s", exc)
        except Exception as exc:
            LOG.debug("bulk connection failed: %r", exc)
        finally:
            await _aclose(sock)

    async def _serve_token(self, sock: trio.SocketStream, token: bytes) -> bool:
        """Send the range `token` stands for; False if the token is unknown."""
        pending = self._pending.pop(token, None)  # one-time: popped before use
        if pending is None:
            LOG.warning("bulk connection with an unknown token closed")
            return False
        pending.claimed.set()
        with trio.fail_after(transfer_deadline(len(pending.data))):
            sealed = await _seal(pending.key, pending.data, pending.aad)
            await sock.send_all(_LEN.pack(len(sealed)))
            self._sent(pending, _LEN.size)
            view = memoryview(sealed)
            for off in range(0, len(view), _IO_CHUNK):
                chunk = view[off : off + _IO_CHUNK]
                await sock.send_all(chunk)
                self._sent(pending, len(chunk))
        pending.collected.set()
        return True

    def _sent(self, pending: _Pending, n: int) -> None:
        pending.sent += n
        self.bytes_sent += n


async def serve_bulk_stream(
    stream: Any,
    peer: str,
    server: BulkServer,
    reader: Any,
    limit: trio.Semaphore,
    may_serve: MayServe = allow_all,
) -> tuple[int, int]:
    """Answer one bulk request on a libp2p stream (BULK_PROTOCOL).

    Returns (received, sent): the request's bytes, and this serve's own bytes out (the
    answer on the stream, then the range on its TCP connection), which is exactly what
    the fetcher counts as received.
    """
    raw = b""
    sent = 0
    async with reset_on_error(stream, f"bulk stream from {peer}"):
        with trio.fail_after(COLLECT_TIMEOUT_S):
            raw = await read_frame(stream, _MAX_REQUEST) or b""
        if not raw:
            raise RemoteProtocolError("bulk stream closed before a request")
        sent = await _serve_request(stream, peer, server, reader, limit, may_serve, raw)
        with trio.move_on_after(2):
            await close_quietly(stream)
    return len(raw), sent


async def serve_bulk_session(
    stream: Any,
    peer: str,
    server: BulkServer,
    reader: Any,
    limit: trio.Semaphore,
    count: Any,
    may_serve: MayServe = allow_all,
) -> None:
    """Answer bulk requests on one stream (BULK_SESSION_PROTOCOL), one at a time, until
    the fetcher closes it or sends nothing for SESSION_IDLE_S. `count(received, sent)` is
    called per request, with what serve_bulk_stream returns."""
    async with reset_on_error(stream, f"bulk stream from {peer}"):
        while True:
            raw: bytes | None = None
            with trio.move_on_after(SESSION_IDLE_S):
                raw = await read_frame(stream, _MAX_REQUEST)
            if raw is None:
                break  # idle, or the fetcher closed its side between requests
            sent = 0
            try:
                sent = await _serve_request(stream, peer, server, reader, limit, may_serve, raw)
            finally:
                count(len(raw), sent)
        with trio.move_on_after(2):
            await close_quietly(stream)


async def _serve_request(
    stream: Any,
    peer: str,
    server: BulkServer,
    reader: Any,
    limit: trio.Semaphore,
    may_serve: MayServe,
    raw: bytes,
) -> int:
    """Answer one request (its frame's body `raw`); bytes this serve sent."""
    cid, offset, length = decode_request(raw)
    if not allowed(may_serve, peer, cid):
        # Refused before a slot or a read; FetchRefused on the fetcher (no fallback).
        return await _answer(stream, FORBIDDEN, NOT_ALLOWED.encode())
    # A slot is held until the range is collected: it bounds memory per peer. Every
    # holder is bounded in time, so this wait is too; past it the answer is "busy"
    # (the fetcher then asks another provider rather than this overloaded one again).
    async with serve_slot(limit, SLOT_TIMEOUT_S) as got:
        if not got:
            return await _answer(stream, SERVER_ERROR, b"busy")
        return await _offer_range(stream, server, reader, raw, cid, offset, length)


async def _offer_range(
    stream: Any, server: BulkServer, reader: Any, raw: bytes, cid: str, offset: int, length: int
) -> int:
    """Offer the range, wait until it is collected; bytes this serve sent."""
    try:
        data = reader(cid, offset, length)
    except Exception:
        LOG.exception("blob reader failed for %s@%d+%d", cid, offset, length)
        return await _answer(stream, SERVER_ERROR, b"server error")
    if data is None:
        return await _answer(stream, NOT_FOUND, b"not found")
    token, key, pending = server.offer(bytes(data[:length]), raw)
    sent = 0
    try:
        offer = msgpack.packb([server.port, token, key, len(pending.data)])
        with trio.fail_after(COLLECT_TIMEOUT_S):
            sent = await _answer(stream, OK, offer)
        with trio.move_on_after(COLLECT_TIMEOUT_S):
            await pending.claimed.wait()
        if pending.claimed.is_set():
            # The connection's own deadline bounds the transfer; this one only makes
            # sure the slot comes back whatever happens to it.
            with trio.move_on_after(transfer_deadline(len(pending.data)) + 1):
                await pending.collected.wait()
    finally:
        server.withdraw(token)
        # What went out on the TCP connection so far, even if cut short.
        sent += pending.sent
    return sent


async def fetch_bulk(
    stream: Any, cid: str, offset: int, length: int, sockets: KeptSockets | None = None
) -> tuple[bytes, int]:
    """Fetch one range over the bulk path; (data, wire bytes received). With `sockets`,
    the range comes on a kept TCP connection to the server when one is idle, and the
    connection is kept for the next range.

    Raises FetchRefused for an error answer and StageTimeout for a stage past its
    deadline (an overloaded server: fail, ask elsewhere); anything else means "use the
    stream path".
    """
    request = encode_request(cid, offset, length)
    with deadline("bulk offer", OFFER_TIMEOUT_S):
        await stream.write(request)
        status, size = _RESP.unpack(await read_exactly(stream, _RESP.size))
        if size > (_MAX_OFFER if status == OK else 4096):
            raise RemoteProtocolError(f"bulk answer of {size} bytes is too long")
        body = await read_exactly(stream, size)
    if status != OK:
        raise FetchRefused(body.decode("utf-8", "replace") or f"status {status}")
    try:
        port, token, key, data_len = msgpack.unpackb(body)
    except Exception:
        raise RemoteProtocolError("malformed bulk offer") from None
    if not (
        isinstance(port, int)
        and 0 < port < 65536
        and isinstance(token, bytes)
        and len(token) == TOKEN_LEN
        and isinstance(key, bytes)
        and len(key) == 32
        and isinstance(data_len, int)
        and 0 <= data_len <= length
    ):
        raise RemoteProtocolError("malformed bulk offer")
    remote = stream.muxed_conn.get_remote_address()
    if not remote:
        raise RemoteProtocolError("no remote address for the bulk connection")
    address = (str(remote[0]), port)
    sock = sockets.take(address) if sockets is not None else None
    kept = False
    try:
        sealed_len = 0
        if sock is not None:
            # A kept connection the server has closed meanwhile (idle, restarted) ends
            # before a byte of the answer; the server never read the token, so it is
            # still good on a fresh connection.
            try:
                with deadline(f"bulk transfer of {data_len} bytes", transfer_deadline(data_len)):
                    await sock.send_all(token)
                    sealed_len = await _receive_length(sock)
            except (RemoteProtocolError, trio.BrokenResourceError, OSError):
                await _aclose(sock)
                sock = None
        if sock is None:
            try:
                with deadline("bulk connect", CONNECT_TIMEOUT_S):
                    sock = await trio.open_tcp_stream(*address)
                    await sock.send_all(token)
            except (StageTimeout, OSError) as exc:
                # A firewall that drops the port looks like a timeout, one that refuses it
                # like an error: either way the path is closed, not the server overloaded.
                raise BulkUnreachable(f"{remote[0]}:{port}: {exc}") from None
        # The server seals the range before its length goes out: that is in this stage.
        with deadline(f"bulk transfer of {data_len} bytes", transfer_deadline(data_len)):
            if not sealed_len:
                sealed_len = await _receive_length(sock)
            if sealed_len != data_len + _TAG:
                raise RemoteProtocolError(f"bulk frame of {sealed_len} bytes, {data_len} offered")
            sealed = await _receive_exactly(sock, sealed_len)
        # Only a connection whose exchange ended cleanly is kept: nothing is left on it.
        kept = sockets is not None and sockets.give(address, sock)
    finally:
        if sock is not None and not kept:
            await _aclose(sock)
    try:
        # The server binds the request exactly as received (the frame without its length).
        data = await _open(key, sealed, token + request[4:])
    except InvalidTag:
        raise RemoteProtocolError("bulk data failed authentication") from None
    return data, _RESP.size + size + _LEN.size + sealed_len


async def _seal(key: bytes, data: bytes, aad: bytes) -> bytes:
    return await seal_with(AESGCM(key), _NONCE, data, aad)


async def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return await open_with(AESGCM(key), _NONCE, sealed, aad)


async def seal_with(aead: AESGCM, nonce: bytes, data: bytes, aad: bytes) -> bytes:
    if len(data) < THREAD_CRYPTO_BYTES:
        return aead.encrypt(nonce, data, aad)
    # Abandonable: a cancelled serve must not wait for the thread (it finishes alone).
    # mypy 2.4 rejects any keyword after run_sync's `*args: Unpack[Ts]` (a false positive).
    return await trio.to_thread.run_sync(  # type: ignore[call-arg]
        aead.encrypt, nonce, data, aad, abandon_on_cancel=True
    )


async def open_with(aead: AESGCM, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Raises InvalidTag for anything but what seal_with made under the same inputs."""
    if len(sealed) < THREAD_CRYPTO_BYTES:
        return aead.decrypt(nonce, sealed, aad)
    return await trio.to_thread.run_sync(  # type: ignore[call-arg]
        aead.decrypt, nonce, sealed, aad, abandon_on_cancel=True
    )


async def _receive_length(sock: trio.SocketStream) -> int:
    (n,) = _LEN.unpack(await _receive_exactly(sock, _LEN.size))
    return int(n)


async def _receive_token(sock: trio.SocketStream) -> bytes | None:
    """The next token on a kept connection; None if the fetcher closed it first."""
    first = await sock.receive_some(TOKEN_LEN)
    if not first:
        return None
    return first + await _receive_exactly(sock, TOKEN_LEN - len(first))


async def receive_buffer(sock: trio.SocketStream, n: int) -> bytearray:
    """Exactly `n` bytes, as one buffer (no copy of the whole at the end). It grows as
    the bytes arrive: a peer that announces a length and sends less makes us hold what
    it sent, not what it announced."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.receive_some(min(n - len(buf), _IO_CHUNK))
        if not chunk:
            raise RemoteProtocolError(f"bulk connection ended after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


async def _receive_exactly(sock: trio.SocketStream, n: int) -> bytes:
    return bytes(await receive_buffer(sock, n))


async def _answer(stream: Any, status: int, body: bytes) -> int:
    """Write a status answer; returns the bytes written."""
    message = _RESP.pack(status, len(body)) + body
    await stream.write(message)
    return len(message)


async def _aclose(sock: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await sock.aclose()
        except Exception:
            pass
