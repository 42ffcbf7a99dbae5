"""Message channels: direct messages to a peer over a TCP connection keyed over libp2p.

Every direct message on a libp2p stream goes through py-libp2p's yamux and Noise in pure
Python on both ends: per message, a task wake to write, a frame header and a Noise message
each way, a read task woken at the other end (benchmarks/round.py: a reduce-scatter round
over 8 hosts moves about 300 messages, and that path was a fifth of the event loop's
time). A message channel is the bulk channel's scheme (_channel.py) carrying messages one
way:

1. sender -> receiver, on a "/p2pfl/msg-channel/1.0.0" stream (Noise: the receiver knows
   who asks, and the answer is secret): a frame "messages".
2. receiver -> sender: status byte, length, msgpack [port, token, key]: a one-time
   16-byte token and a fresh AES-256-GCM key; "busy" when the receiver's bulk server
   holds as many connections as it keeps or this peer as many channels
   (BulkServer.offer_channel: message and fetch channels share the caps).
3. The sender connects to the receiver's bulk port at the libp2p connection's address
   and presents the token; the connection is then bound to the peer the key went to.
   Each write: a 4-byte length, then AESGCM(key).encrypt(nonce i, batch, AAD), where the
   batch is one or more length-prefixed messages (those queued together) and i counts
   the channel's writes. A key is used once per nonce; a replayed, reordered, truncated
   or forged write fails to open and ends the channel; so does a batch over
   MAX_BATCH_BYTES or a message over MAX_DIRECT_BYTES in it (nothing of it is delivered).

The sender opens a channel at its first message to a peer, which waits for it (about
as long as opening a libp2p stream: a stream, then a local TCP connect). A libp2p stream
is the fallback: when a channel write fails, or the peer has no channel to give (an
older peer, no bulk port, a firewall; remembered) or is busy (tried again after
SESSION_IDLE_S). On a stream a message goes without any blob riding along with it
(Network.send's `plain`): py-libp2p's yamux can deadlock a connection both sides write
bulk on. The two paths do not keep order between them at a switch: the protocol never
relies on the order of direct messages (it runs as well over gossip). A write would be
lost if it went into a connection the receiver had closed (it lands in the kernel's buffer; only the next
write fails), so: a channel idle SENDER_IDLE_S is closed by its sender, before the
receiver's SESSION_IDLE_S; before each write the sender checks that the receiver has not
closed it (the receiver never writes, so anything readable is its close); and the
receiver keeps a message channel when the peer's libp2p connection goes (its fetch
channels close then, BulkServer.drop_peer): what the peer wrote is still its own.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2pfl.errors import RemoteProtocolError
from p2pfl.limits import MAX_DIRECT_BYTES
from p2pfl.net.libp2p import _bulk
from p2pfl.net.libp2p._channel import _nonce, _receive_head, hand_out, negotiate
from p2pfl.net.libp2p._framing import deadline, transfer_deadline

MSG_CHANNEL_PROTOCOL = "/p2pfl/msg-channel/1.0.0"
_HELLO = b"messages"
AAD = b"p2pfl message channel"
# One write's batch of framed messages, at most: a sender's batch stops growing past
# WRITE_BATCH_BYTES (256 KiB) plus one message (MAX_DIRECT_BYTES and its length).
MAX_BATCH_BYTES = 1024 * 1024
SENDER_IDLE_S = _bulk.FETCHER_IDLE_S  # below the receiver's SESSION_IDLE_S
OPEN_TIMEOUT_S = 10.0
_LEN = _bulk._LEN


def split_batch(batch: bytes | bytearray) -> list[bytes]:
    """The messages of a batch (4-byte big-endian length, then the message, repeated);
    RemoteProtocolError if it does not split exactly or a message is over
    MAX_DIRECT_BYTES."""
    out, at, end = [], 0, len(batch)
    view = memoryview(batch)
    while at < end:
        if end - at < _LEN.size:
            raise RemoteProtocolError("message channel batch ends inside a length")
        (n,) = _LEN.unpack_from(batch, at)
        at += _LEN.size
        if n > MAX_DIRECT_BYTES:
            raise RemoteProtocolError(f"message of {n} bytes exceeds {MAX_DIRECT_BYTES}")
        if n > end - at:
            raise RemoteProtocolError("message channel batch ends inside a message")
        out.append(bytes(view[at : at + n]))
        at += n
    return out


# --- receiver --------------------------------------------------------------------------


async def serve_request(
    stream: Any,
    peer: str,
    server: _bulk.BulkServer,
    deliver: Callable[[str, list[bytes]], None],
) -> None:
    """Answer a message channel request from `peer` (MSG_CHANNEL_PROTOCOL stream)."""
    key = AESGCM.generate_key(bit_length=256)
    reader = _Reader(peer, AESGCM(key), deliver)
    await hand_out(stream, peer, server, _HELLO, [key], reader.serve, drop_with_peer=False)


@dataclass
class _Reader:
    """The receiver's side of one message channel."""

    peer: str
    key: AESGCM
    deliver: Callable[[str, list[bytes]], None]

    async def serve(self, sock: trio.SocketStream) -> None:
        """Deliver each batch until the sender closes the channel or stays silent
        SESSION_IDLE_S; a write that fails to open or split ends it (RemoteProtocolError,
        logged by the bulk server, which closes the connection)."""
        i = 0
        while True:
            head: bytes | None = None
            with trio.move_on_after(_bulk.SESSION_IDLE_S):
                head = await _receive_head(sock, _LEN.size)
            if head is None:
                return
            (size,) = _LEN.unpack(head)
            if not _bulk._TAG < size <= MAX_BATCH_BYTES + _bulk._TAG:
                raise RemoteProtocolError(f"message channel write of {size} bytes")
            with trio.fail_after(transfer_deadline(size)):
                sealed = await _bulk.receive_buffer(sock, size)
            batch = bytearray(size - _bulk._TAG)
            try:
                self.key.decrypt_into(_nonce(i), sealed, AAD, batch)
            except InvalidTag:
                raise RemoteProtocolError("message channel write failed authentication") from None
            i += 1
            self.deliver(self.peer, split_batch(batch))


# --- sender ----------------------------------------------------------------------------


@dataclass
class Slot:
    """The channel one sender task keeps for one peer: none yet, up, or given up on until
    `retry_at`."""

    channel: MessageChannel | None = None
    retry_at: float = 0.0


class MessageChannel:
    """The sender's side of one message channel."""

    def __init__(self, sock: trio.SocketStream, key: AESGCM) -> None:
        self.sock = sock
        self.key = key
        self.sent = 0  # writes so far: the next nonce
        self.used = trio.current_time()

    def idle(self) -> bool:
        """Unused for SENDER_IDLE_S: the receiver may close it soon, so it is not used."""
        return trio.current_time() - self.used > SENDER_IDLE_S

    async def send(self, messages: list[bytes]) -> None:
        """One write of `messages` (each at most MAX_DIRECT_BYTES, together within
        MAX_BATCH_BYTES framed); ChannelClosed, an OSError or a trio error if the
        connection is gone."""
        if self.closed_by_receiver():
            raise ChannelClosed("closed by the receiver")
        # Each message's bytes are copied twice on the way out: into the batch, then
        # sealed straight after the write's length (a 0.5 MB slice used to take four).
        parts: list[bytes] = []
        for m in messages:
            parts += (_LEN.pack(len(m)), m)
        batch = b"".join(parts)
        write = bytearray(_LEN.size + len(batch) + _bulk._TAG)
        _LEN.pack_into(write, 0, len(batch) + _bulk._TAG)
        self.key.encrypt_into(_nonce(self.sent), batch, AAD, memoryview(write)[_LEN.size :])
        self.sent += 1
        self.used = trio.current_time()
        await self.sock.send_all(memoryview(write))

    def closed_by_receiver(self) -> bool:
        """The receiver never writes on a message channel: anything to read is its close
        (or a reset). Checked before each write, which would otherwise go into the
        kernel's buffer and be lost (only the write after it fails)."""
        readable, _, _ = select.select([self.sock.socket.fileno()], [], [], 0)
        return bool(readable)

    async def aclose(self) -> None:
        await _bulk._aclose(self.sock)


class ChannelClosed(Exception):
    """The receiver closed the message channel (idle, shut down, or a bad write)."""


async def open_message_channel(host: Any, peer: str) -> MessageChannel:
    """A connected channel to `peer`. Raises what negotiate raises, or the failure to
    open the libp2p stream (lacks_protocol says whether the peer lacks the protocol)."""
    with deadline("opening a message channel stream", OPEN_TIMEOUT_S):
        stream = await host.new_stream(ID.from_base58(peer), [TProtocol(MSG_CHANNEL_PROTOCOL)])
    sock, (key,) = await negotiate(stream, _HELLO, 1)
    return MessageChannel(sock, AESGCM(key))
