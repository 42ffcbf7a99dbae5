"""Libp2pNetwork: the real Network (TCP, Noise, yamux, GossipSub, our stream protocols).

Every public method returns at once: work goes on an unbounded trio channel drained by
`_command_loop`, and outcomes come back as events handed to the sink. All tasks live in
the nursery of `run()`, so cancelling it stops everything and closes the host.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL, perform_ping_roundtrip
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as L2PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.identity import Identity
from p2pfl.limits import MAX_INBOUND_STREAMS_PER_PEER, OUTBOUND_DIRECT_PEER_BYTES
from p2pfl.net.base import (
    MAX_DIRECT_BYTES,
    MAX_FETCH_BYTES,
    MAX_GOSSIP_BYTES,
    BlobReader,
    EventSink,
    FetchDone,
    FetchFailed,
    MayServe,
    Message,
    NetEvent,
    NetStats,
    PeerConnected,
    PeerDisconnected,
    PeerInfo,
    allow_all,
)
from p2pfl.net.inbound import InboundBudget
from p2pfl.net.libp2p import (
    _addrs,
    _blob,
    _bulk,
    _channel,
    _discovery,
    _fetch,
    _msgchan,
    _px,
    _relay,
)
from p2pfl.net.libp2p._config import Libp2pConfig
from p2pfl.net.libp2p._framing import (
    FrameReader,
    StageTimeout,
    close_quietly as _close,
    frame,
    read_frame,
    reset_on_error,
    reset_quietly as _reset,
)
from p2pfl.net.libp2p._host import ConnNotifee, build_host, build_pubsub
from p2pfl.net.libp2p._logging import route_libp2p_logs
from p2pfl.net.libp2p._peers import PeerBook

LOG = logging.getLogger("p2pfl.net.libp2p")

MSG_PROTOCOL = "/p2pfl/msg/1.0.0"
# The peer-exchange handshake that also marks a connection as usable (PeerConnected).
HANDSHAKE_TIMEOUT_S = 10.0
# A write to a peer that stopped reading fails after this (the message is dropped).
WRITE_TIMEOUT_S = 30.0
# Direct messages queued for one peer leave in one write up to about this many bytes.
WRITE_BATCH_BYTES = 256 * 1024
# First peer-exchange re-ask after a new connection; doubles up to px_interval_s.
PX_FAST_S = 0.5
# One gossip RPC read from a peer: one message at the cap plus its envelope (ids,
# signature, topic, a sender record, control messages).
MAX_GOSSIP_RPC_BYTES = MAX_GOSSIP_BYTES + 64 * 1024
# Per-peer bookkeeping (bad gossip counts, protocols a peer lacks) remembers at most
# this many peers.
_MAX_TRACKED_PEERS = 4096

# A direct message queued for a peer: its bytes, and the same without any blob riding
# along (Network.send's `plain`), which is what goes if it ends up on a yamux stream.
_Outgoing = tuple[bytes, bytes | None]


@asynccontextmanager
async def _listening(host: Any, listen: list[Any], texts: list[str]) -> AsyncIterator[None]:
    """host.run(), listening on every address or failing with one clear error.

    py-libp2p's Swarm.listen logs a bind failure and carries on (it returns False), so a
    node on a port in use would run without listening at all; each address is therefore
    listened on here, one at a time, and the first failure is raised with its cause.
    """
    network = host.get_network()
    async with host.run(listen_addrs=[]):
        try:
            for maddr, text in zip(listen, texts, strict=True):
                if not await network.listen(maddr):
                    problem = _addrs.bind_problem(text)
                    raise LocalProtocolError(f"cannot listen on {text}: {problem}")
            yield
        finally:
            # py-libp2p leaves its listening sockets open after the host stops (with
            # exclusive binds, a node restarted in one process could not listen again).
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for listener in list(network.listeners.values()):
                    try:
                        await listener.close()
                    except Exception as exc:
                        LOG.debug("closing a listener failed: %r", exc)


def _remember(peers: set[str], peer: str) -> None:
    """Add to a per-peer set, bounded: a peer's behaviour is remembered for at most
    _MAX_TRACKED_PEERS peers (forgetting one only costs a repeated question)."""
    if len(peers) >= _MAX_TRACKED_PEERS:
        peers.clear()
    peers.add(peer)


class Libp2pNetwork:
    """A p2pfl Network over py-libp2p. Construct, then `await nursery.start(net.run)`."""

    def __init__(
        self,
        identity: Identity,
        config: Libp2pConfig,
        sink: EventSink,
        blob_reader: BlobReader | None = None,
        may_serve: MayServe = allow_all,
        inbound: InboundBudget | None = None,
    ) -> None:
        """`inbound`, when given, is the budget the consumer charges received messages to
        (io_trio.TrioIO.deliver): gossip from an originator over it is dropped before it
        is verified, cached or relayed, and drops of oversized messages are counted in it."""
        self._identity = identity
        self._config = config
        self._sink = sink
        self._blob_reader: BlobReader = blob_reader or (lambda cid, off, n: None)
        self._may_serve = may_serve  # asked before every range served (see net.base)
        self._inbound = inbound
        self._inbound_streams: dict[str, int] = {}  # peer -> direct streams open to us
        self._send_bytes: dict[str, int] = {}  # peer -> bytes of direct messages queued
        self._cmd_send, self._cmd_recv = trio.open_memory_channel[tuple[Any, ...]](math.inf)
        self._book = PeerBook(
            identity.peer_id,
            config.dial_backoff_min_s,
            config.dial_backoff_max_s,
            config.max_dial_failures,
        )
        for addr in config.bootstrap:
            self._book.add_bootstrap(addr.rsplit("/p2p/", 1)[1], addr)
        # Relays we reserve at are kept connected like bootstrap peers.
        self._relays = {addr.rsplit("/p2p/", 1)[1]: addr for addr in config.relay_via}
        for relay, addr in self._relays.items():
            self._book.add_bootstrap(relay, addr)
        self._stats = NetStats(
            extra={
                "fetch_done": 0,
                "fetch_failed": 0,
                "direct_dropped": 0,
                "blob_served": 0,
                "gossip_refused": 0,
                "direct_streams_refused": 0,
                "gossip_bad_signature": 0,
                "msg_channels_opened": 0,
                "msg_channel_failed": 0,
                "direct_via_channel": 0,
                "attachments_left_off": 0,
            }
        )
        # Neighbour -> gossip messages it sent us unsigned or badly signed (each dropped).
        self._bad_gossip: dict[str, int] = {}
        self._host: Any = None
        self._pubsub: Any = None
        self._nursery: trio.Nursery | None = None
        self._kick: trio.Event | None = None
        self._px_wake = trio.Event()
        self._stopped = False
        self._topics: set[str] = set()
        self._own_addrs: list[str] = []
        self._own_transport: set[str] = set()  # every address that reaches us, no /p2p/
        # Peers announced with PeerConnected, with the addresses they advertise.
        self._connected: dict[str, tuple[str, ...]] = {}
        self._handshaking: set[str] = set()
        self._pinging: set[str] = set()
        # One long-lived ping stream per peer: a fresh stream per ping (yamux open and
        # close, a multistream-select round trip) was most of an idle node's CPU.
        self._ping_streams: dict[str, Any] = {}
        self._last_alive: dict[str, float] = {}
        self._senders: dict[str, trio.MemorySendChannel[_Outgoing]] = {}
        self._serve_limits: dict[str, trio.Semaphore] = {}
        self._sender_ids: dict[bytes, str] = {}
        self._bulk: _bulk.BulkServer | None = None
        # Peers found not to speak a protocol (multistream-select answered "na"): any
        # libp2p peer may connect to us (a bootstrap node, a DHT peer), and asking it
        # again on every connect or timer would only cost both sides.
        self._no_px: set[str] = set()
        # No ping protocol: its "na" answer to each ping stream is the sign of life.
        self._no_ping: set[str] = set()
        self._no_bulk: set[str] = set()  # also: bulk port unreachable (_fetch)
        self._no_msg_channel: set[str] = set()
        # Peers that close a ping stream after each ping (js-libp2p does): a fresh stream
        # per ping, instead of failing on the kept one first every time.
        self._ping_oneshot: set[str] = set()
        self._reacher: _fetch.Reacher | None = None
        self._bulk_streams = _fetch.BulkStreams()  # session streams kept between ranges
        self._dht: _discovery.DhtDiscovery | None = None
        self._relay: _relay.Relay | None = None
        self._relay_wake = trio.Event()

    # --- the Network interface ----------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._identity.peer_id

    def listen_addrs(self) -> list[str]:
        return list(self._own_addrs)

    def connected_peers(self) -> list[PeerInfo]:
        return [PeerInfo(p, a) for p, a in self._connected.items()]

    def subscribe(self, topic: str) -> None:
        if topic not in self._topics:
            self._topics.add(topic)
            self._put(("sub", topic))

    def publish(self, topic: str, data: bytes) -> None:
        if len(data) > MAX_GOSSIP_BYTES:
            raise LocalProtocolError(
                f"publish of {len(data)} bytes exceeds MAX_GOSSIP_BYTES ({MAX_GOSSIP_BYTES});"
                " send large data as a blob"
            )
        self._put(("pub", topic, bytes(data)))

    def send(self, peer: str, data: bytes, plain: bytes | None = None) -> None:
        if len(data) > MAX_DIRECT_BYTES:
            raise LocalProtocolError(
                f"direct message of {len(data)} bytes exceeds MAX_DIRECT_BYTES ({MAX_DIRECT_BYTES})"
            )
        self._put(("send", peer, bytes(data), plain))

    def fetch(self, peer: str, cid: str, offset: int, length: int, token: object) -> None:
        if offset < 0 or not 0 < length <= MAX_FETCH_BYTES:
            raise LocalProtocolError(
                f"fetch range offset={offset} length={length}: need offset >= 0 and"
                f" 0 < length <= MAX_FETCH_BYTES ({MAX_FETCH_BYTES})"
            )
        self._put(("fetch", peer, cid, offset, length, token))

    def stats(self) -> NetStats:
        s = self._stats
        return NetStats(
            s.bytes_sent, s.bytes_received, s.messages_sent, s.messages_received, dict(s.extra)
        )

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, start gossip, start dialling; started() once listening. Runs until
        cancelled; cancellation closes the host."""
        route_libp2p_logs(self._config.libp2p_log_level)
        host = build_host(self._identity.libp2p_keypair(), self._config)
        pubsub, gossipsub = build_pubsub(
            host,
            self._config,
            self._on_gossip,
            self._admit_gossip,
            MAX_GOSSIP_RPC_BYTES,
            self._on_bad_gossip,
        )
        self._host, self._pubsub = host, pubsub
        self._reacher = _fetch.Reacher(host, self._book.addrs, self._connect)
        host.set_stream_handler(TProtocol(MSG_PROTOCOL), self._handle_msg_stream)
        host.set_stream_handler(TProtocol(_blob.BLOB_PROTOCOL), self._handle_blob_stream)
        host.set_stream_handler(TProtocol(_px.PX_PROTOCOL), self._handle_px_stream)
        host.get_network().register_notifee(ConnNotifee(self._on_conn_up, self._on_conn_down))
        listen = [multiaddr.Multiaddr(a) for a in self._config.listen]
        try:
            async with _listening(host, listen, list(self._config.listen)):
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    await pubsub.wait_until_ready()
                    # What the host advertises (identify, signed records): the announce
                    # list, or the listen addresses with wildcards expanded (_addrs).
                    self._own_addrs = [str(a) for a in host.get_addrs()]
                    self._own_transport = _addrs.local_addrs(
                        [str(a) for a in host.get_transport_addrs()], self._own_addrs
                    )
                    # Reachable through each relay we reserve at (py-libp2p's get_addrs
                    # would cut a circuit address at its first /p2p/: peer exchange
                    # carries these).
                    self._own_addrs += [
                        f"{addr}{_relay.CIRCUIT}/p2p/{self.peer_id}"
                        for addr in self._config.relay_via
                    ]
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        self._kick = trio.Event()
                        await self._start_bulk(nursery)
                        self._relay = _relay.Relay(host, self._config.relay_service)
                        await nursery.start(self._relay.run)
                        if self._relays:
                            nursery.start_soon(self._reserve_loop)
                        if self._config.dht:
                            self._dht = _discovery.DhtDiscovery(
                                host, self._on_dht_found, self._config.dht_interval_s
                            )
                            await nursery.start(self._dht.run)
                        nursery.start_soon(self._command_loop)
                        nursery.start_soon(self._dial_loop)
                        nursery.start_soon(self._liveness_loop)
                        nursery.start_soon(self._px_loop)
                        LOG.info("libp2p node %s listening on %s", self.peer_id, self._own_addrs)
                        task_status.started()
        finally:
            self._stopped = True
            self._nursery = None
            self._connected.clear()
            self._bulk_streams.close()

    async def _start_bulk(self, nursery: trio.Nursery) -> None:
        if not self._config.bulk_tcp:
            return
        ip4 = [a.split("/")[2] for a in self._config.listen if a.startswith("/ip4/")]
        if not ip4:
            return
        bulk = _bulk.BulkServer(ip4[0], self._config.bulk_port)
        await nursery.start(bulk.run)
        self._bulk = bulk
        self._host.set_stream_handler(TProtocol(_bulk.BULK_PROTOCOL), self._handle_bulk_stream)
        self._host.set_stream_handler(
            TProtocol(_bulk.BULK_SESSION_PROTOCOL), self._handle_bulk_session
        )
        self._host.set_stream_handler(
            TProtocol(_channel.BULK_CHANNEL_PROTOCOL), self._handle_bulk_channel
        )
        self._host.set_stream_handler(
            TProtocol(_msgchan.MSG_CHANNEL_PROTOCOL), self._handle_msg_channel
        )

    def _put(self, cmd: tuple[Any, ...]) -> None:
        if self._stopped:
            LOG.debug("network stopped; dropping %s", cmd[0])
            return
        self._cmd_send.send_nowait(cmd)

    def _emit(self, event: NetEvent) -> None:
        try:
            self._sink(event)
        except Exception:
            LOG.exception("event sink raised on %s", type(event).__name__)

    def _spawn(self, fn: Any, *args: Any) -> None:
        """Start a task in our nursery; a bug in it is logged, never fatal to the node."""
        if self._nursery is None:
            return

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                LOG.exception("network task %s failed", getattr(fn, "__name__", fn))

        self._nursery.start_soon(guarded)

    def _kick_dialer(self) -> None:
        if self._kick is not None:
            self._kick.set()

    def _alive(self, peer: str) -> None:
        self._last_alive[peer] = trio.current_time()

    # --- commands -----------------------------------------------------------------------

    async def _command_loop(self) -> None:
        async for cmd in self._cmd_recv:
            kind = cmd[0]
            try:
                if kind == "pub":
                    # Inline (not a task per publish) so a topic's messages keep their order.
                    await self._pubsub.publish(cmd[1], cmd[2])
                    self._stats.bytes_sent += len(cmd[2])
                    self._stats.messages_sent += 1
                elif kind == "sub":
                    await self._pubsub.subscribe(cmd[1])
                elif kind == "send":
                    self._queue_direct(cmd[1], cmd[2], cmd[3])
                elif kind == "fetch":
                    self._spawn(self._fetch, *cmd[1:])
            except Exception:
                LOG.exception("network command %s failed", kind)

    def _sender(self, from_id: bytes) -> str:
        sender = self._sender_ids.get(from_id)
        if sender is None:
            try:
                sender = ID(from_id).to_base58()
            except Exception:
                sender = "?"  # not a peer id: strict signing refuses the message anyway
            if len(self._sender_ids) > 10_000:
                self._sender_ids.clear()
            self._sender_ids[from_id] = sender
        return sender

    def _admit_gossip(self, from_id: bytes, n: int) -> bool:
        """Whether a received gossip message is worth verifying, caching and relaying:
        within MAX_GOSSIP_BYTES, from an originator not over its inbound byte budget."""
        sender = self._sender(from_id)
        if sender == self.peer_id:
            return True  # our own publish coming back (publish() already capped it)
        too_big = n > MAX_GOSSIP_BYTES
        if not too_big and (self._inbound is None or self._inbound.room(sender, n)):
            return True
        self._stats.extra["gossip_refused"] += 1
        what = "oversized gossip message" if too_big else "gossip message"
        if self._inbound is not None:
            self._inbound.drop(sender, n, what)
        else:
            LOG.debug("dropped a %s of %d bytes from %s", what, n, sender)
        return False

    def bad_gossip(self) -> dict[str, int]:
        """Per neighbouring peer: gossip messages dropped for a missing or bad signature."""
        return dict(self._bad_gossip)

    def _on_bad_gossip(self, peer: str, reason: str) -> None:
        """Counted per peer; the first from a peer is logged at warning, the rest only
        counted (a peer sending unsigned gossip, such as a libp2p node configured with
        StrictNoSign, would otherwise fill the log, or drop its messages unseen)."""
        self._stats.extra["gossip_bad_signature"] += 1
        count = self._bad_gossip.get(peer, 0)
        if count == 0 and len(self._bad_gossip) >= _MAX_TRACKED_PEERS:
            return  # only counted in the total: a bound on what peers make us remember
        self._bad_gossip[peer] = count + 1
        if count == 0:
            LOG.warning(
                "dropping %s gossip from peer %s: p2pfl requires every message signed by"
                " its originator (StrictSign); further ones from it are only counted",
                reason,
                peer,
            )

    def _on_gossip(self, topic: str, from_id: bytes, data: bytes) -> None:
        sender = self._sender(from_id)
        self._stats.bytes_received += len(data)
        self._stats.messages_received += 1
        self._emit(Message(topic, sender, data))

    # --- direct messages: one long-lived stream per peer, written by one task ------------

    def _queue_direct(self, peer: str, data: bytes, plain: bytes | None) -> None:
        if peer == self.peer_id:
            self._emit(Message(None, peer, data))
            return
        queued = self._send_bytes.get(peer, 0)
        if queued + len(data) > OUTBOUND_DIRECT_PEER_BYTES:
            # The peer reads slower than we write to it: what is queued bounds our memory.
            self._stats.extra["direct_dropped"] += 1
            LOG.debug("dropping a direct message to %s: %d bytes queued for it", peer, queued)
            return
        channel = self._senders.get(peer)
        if channel is None:
            channel, recv = trio.open_memory_channel[_Outgoing](math.inf)
            self._senders[peer] = channel
            self._spawn(self._direct_sender, peer, channel, recv)
        self._send_bytes[peer] = queued + len(data)
        channel.send_nowait((data, plain))

    async def _direct_sender(
        self, peer: str, channel: trio.MemorySendChannel[_Outgoing], recv: Any
    ) -> None:
        stream = None
        slot = _msgchan.Slot()
        try:
            async for item in recv:
                queued = self._batch(peer, item, recv)
                batch = [data for data, _ in queued]
                sent = await self._send_on_channel(peer, slot, batch)
                if not sent:  # on a stream: no bulk (Network.send's `plain`)
                    batch = [data if plain is None else plain for data, plain in queued]
                    self._stats.extra["attachments_left_off"] += sum(
                        plain is not None for _, plain in queued
                    )
                for _attempt in range(0 if sent else 2):  # a stale stream: one fresh one
                    try:
                        with trio.fail_after(WRITE_TIMEOUT_S):
                            if stream is None:
                                stream = await self._host.new_stream(
                                    ID.from_base58(peer), [TProtocol(MSG_PROTOCOL)]
                                )
                            await stream.write(b"".join(frame(item) for item in batch))
                        sent = True
                        break
                    except Exception as exc:
                        LOG.debug("direct message to %s failed: %r", peer, exc)
                        await _reset(stream)
                        stream = None
                if sent:
                    self._stats.bytes_sent += sum(len(item) + 4 for item in batch)
                    self._stats.messages_sent += len(batch)
                else:
                    self._stats.extra["direct_dropped"] += len(batch)
                    if peer not in self._connected:
                        break  # unreachable: drop what is queued and let the task end
        finally:
            if self._senders.get(peer) is channel:
                del self._senders[peer]
            channel.close()
            while True:
                try:
                    self._unqueue(peer, len(recv.receive_nowait()[0]))
                    self._stats.extra["direct_dropped"] += 1
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                if stream is not None:
                    await _close(stream)
                if slot.channel is not None:
                    await slot.channel.aclose()

    async def _send_on_channel(self, peer: str, slot: _msgchan.Slot, batch: list[bytes]) -> bool:
        """`batch` in one write on `peer`'s message channel (_msgchan.py), opened first
        when there is none: the batch waits for it, so a peer's messages keep one path and
        their order, and bulk rides along from the first. False when none can be had now
        or the write failed: the batch then goes on a stream."""
        channel = slot.channel
        if channel is not None and channel.idle():
            slot.channel = None
            await channel.aclose()
            channel = None
        if channel is None:
            if not self._may_open_msg_channel(peer, slot):
                return False
            await self._open_msg_channel(peer, slot)
            channel = slot.channel
            if channel is None:
                return False
        try:
            with trio.fail_after(WRITE_TIMEOUT_S):
                await channel.send(batch)
        except Exception as exc:
            LOG.debug("message channel to %s failed: %r", peer, exc)
            self._stats.extra["msg_channel_failed"] += 1
            slot.channel = None
            await channel.aclose()
            return False
        self._stats.extra["direct_via_channel"] += len(batch)
        return True

    def _may_open_msg_channel(self, peer: str, slot: _msgchan.Slot) -> bool:
        return (
            self._config.bulk_tcp  # else no TCP side paths on this node
            and peer not in self._no_msg_channel
            and peer not in self._no_bulk
            and trio.current_time() >= slot.retry_at
        )

    async def _open_msg_channel(self, peer: str, slot: _msgchan.Slot) -> None:
        try:
            channel = await _msgchan.open_message_channel(self._host, peer)
        except Exception as exc:
            if _fetch.lacks_protocol(exc):
                _remember(self._no_msg_channel, peer)
            elif isinstance(exc, _bulk.BulkUnreachable):
                _remember(self._no_bulk, peer)
            else:  # busy, a timeout, a bad answer: the stream until a later try
                slot.retry_at = trio.current_time() + _bulk.SESSION_IDLE_S
            LOG.debug("no message channel to %s: %r", peer, exc)
            return
        slot.channel = channel
        self._stats.extra["msg_channels_opened"] += 1

    def _batch(self, peer: str, first: _Outgoing, recv: Any) -> list[_Outgoing]:
        """`first` and whatever else is queued for `peer` now, up to WRITE_BATCH_BYTES:
        one write, so one muxer frame where each message was one (an update and its
        slice offer leave together; each write is a pass through py-libp2p's yamux,
        noise and locks)."""
        batch, size = [first], len(first[0])
        self._unqueue(peer, size)
        while size < WRITE_BATCH_BYTES:
            try:
                item = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            self._unqueue(peer, len(item[0]))
            batch.append(item)
            size += len(item[0])
        return batch

    def _unqueue(self, peer: str, n: int) -> None:
        left = self._send_bytes.get(peer, 0) - n
        if left > 0:
            self._send_bytes[peer] = left
        else:
            self._send_bytes.pop(peer, None)

    async def _handle_msg_stream(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        # A sender uses one stream; each open stream can buffer a yamux window, so a peer
        # opening many at once is refused past a few.
        if self._inbound_streams.get(peer, 0) >= MAX_INBOUND_STREAMS_PER_PEER:
            self._stats.extra["direct_streams_refused"] += 1
            LOG.debug("refusing another direct stream from %s", peer)
            await _reset(stream)
            return
        self._inbound_streams[peer] = self._inbound_streams.get(peer, 0) + 1
        try:
            await self._read_msg_stream(peer, stream)
        finally:
            left = self._inbound_streams.get(peer, 1) - 1
            if left > 0:
                self._inbound_streams[peer] = left
            else:
                self._inbound_streams.pop(peer, None)

    async def _read_msg_stream(self, peer: str, stream: Any) -> None:
        async with reset_on_error(stream, f"direct stream from {peer}"):
            frames = FrameReader(stream, MAX_DIRECT_BYTES)
            while True:
                data = await frames.next()
                if data is None:
                    break
                self._deliver_direct(peer, [data])
            await _close(stream)

    def _deliver_direct(self, peer: str, messages: list[bytes]) -> None:
        """Direct messages from `peer` (a stream's frames, a message channel's batch)."""
        self._alive(peer)
        for data in messages:
            self._stats.bytes_received += len(data) + 4
            self._stats.messages_received += 1
            self._emit(Message(None, peer, data))

    async def _handle_msg_channel(self, stream: Any) -> None:
        assert self._bulk is not None
        peer = str(stream.muxed_conn.peer_id)
        self._alive(peer)
        await _msgchan.serve_request(stream, peer, self._bulk, self._deliver_direct)

    # --- blobs --------------------------------------------------------------------------

    async def _handle_blob_stream(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        self._alive(peer)
        await _blob.serve_blob_stream(
            stream,
            peer,
            self._blob_reader,
            self._serve_limit(peer),
            self._count_serve,
            self._may_serve,
        )

    async def _handle_bulk_stream(self, stream: Any) -> None:
        assert self._bulk is not None
        peer = str(stream.muxed_conn.peer_id)
        self._alive(peer)
        # The serve counts its own bytes: serves overlap, so the server's shared counter
        # would charge each serve with the others' bytes as well.
        got, sent = await _bulk.serve_bulk_stream(
            stream, peer, self._bulk, self._blob_reader, self._serve_limit(peer), self._may_serve
        )
        self._count_serve(got, sent)

    async def _handle_bulk_session(self, stream: Any) -> None:
        await self._serve_bulk(stream, _bulk.serve_bulk_session)

    async def _handle_bulk_channel(self, stream: Any) -> None:
        await self._serve_bulk(stream, _channel.serve_channel_request)

    async def _serve_bulk(self, stream: Any, serve: Callable[..., Awaitable[None]]) -> None:
        """A bulk session or channel stream from a peer, served with that peer's slots."""
        assert self._bulk is not None
        peer = str(stream.muxed_conn.peer_id)
        self._alive(peer)
        await serve(
            stream,
            peer,
            self._bulk,
            self._blob_reader,
            self._serve_limit(peer),
            self._count_serve,
            self._may_serve,
        )

    def _serve_limit(self, peer: str) -> trio.Semaphore:
        limit = self._serve_limits.get(peer)
        if limit is None:
            limit = trio.Semaphore(self._config.max_blob_serves_per_peer)
            self._serve_limits[peer] = limit
        return limit

    def _count_serve(self, received: int, sent: int) -> None:
        self._stats.bytes_received += received
        self._stats.bytes_sent += sent
        self._stats.extra["blob_served"] += 1

    async def _reach_and_fetch(
        self, peer: str, cid: str, offset: int, length: int
    ) -> tuple[bytes, int]:
        assert self._reacher is not None
        for attempt in range(2):
            await self._reacher.reach(peer, self._config.dial_timeout_s)
            try:
                return await _fetch.fetch_range(
                    self._host,
                    peer,
                    cid,
                    offset,
                    length,
                    self._bulk is not None,
                    self._stats.extra,
                    self._no_bulk,
                    self._bulk_streams,
                )
            except SwarmException as exc:
                # The connection we reached was the one dropped of two crossed dials
                # (one connection per peer): reach the one that stays, once.
                if attempt or "connection" not in str(exc).lower():
                    raise
                await trio.sleep(_fetch.REACH_POLL_S)
        raise AssertionError("unreachable")

    async def _fetch(self, peer: str, cid: str, offset: int, length: int, token: object) -> None:
        reason = ""
        try:
            with trio.fail_after(self._config.fetch_timeout_s):
                if self._reacher is None:
                    raise _fetch.Unreachable("network not running")
                data, wire = await self._reach_and_fetch(peer, cid, offset, length)
        except trio.TooSlowError:
            reason = f"timeout after {self._config.fetch_timeout_s:.0f} s"
        except _blob.FetchRefused as exc:
            reason = str(exc)
        except (_fetch.Unreachable, StageTimeout) as exc:
            reason = str(exc)
        except RemoteProtocolError as exc:
            reason = f"bad answer: {exc}"
            LOG.warning("blob answer from %s rejected: %s", peer, exc)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if reason:
            LOG.debug("fetch %s@%d from %s failed: %s", cid[:16], offset, peer, reason)
            self._stats.extra["fetch_failed"] += 1
            self._emit(FetchFailed(token, peer, cid, offset, reason))
            return
        self._alive(peer)
        self._stats.bytes_received += wire
        self._stats.bytes_sent += len(_blob.encode_request(cid, offset, length))
        self._stats.extra["fetch_done"] += 1
        self._emit(FetchDone(token, peer, cid, offset, data))

    # --- connections, peer exchange, dialling, liveness ---------------------------------

    def _on_conn_up(self, peer: str) -> None:
        if peer in self._connected or peer in self._handshaking or self._nursery is None:
            return
        self._handshaking.add(peer)
        self._spawn(self._handshake, peer)

    def _on_conn_down(self, pid: ID) -> None:
        if self._host is None or self._host.get_network().get_connections(pid):
            return  # a duplicate connection was trimmed; the peer is still there
        self._peer_gone(str(pid), "connection closed")

    def _peer_gone(self, peer: str, reason: str) -> None:
        self._book.on_disconnected(peer, trio.current_time())
        self._last_alive.pop(peer, None)
        self._serve_limits.pop(peer, None)
        self._ping_streams.pop(peer, None)  # dies with the connection
        self._bulk_streams.forget(peer)
        if self._bulk is not None:
            self._bulk.drop_peer(peer)
        sender = self._senders.pop(peer, None)
        if sender is not None:
            sender.close()
        if peer in self._relays:
            self._relay_wake.set()
        if self._connected.pop(peer, None) is not None:
            LOG.info("peer %s disconnected: %s", peer, reason)
            self._emit(PeerDisconnected(peer, reason))
        self._kick_dialer()

    async def _handshake(self, peer: str) -> None:
        """Peer exchange with a newly connected peer; then it counts as connected."""
        pid = ID.from_base58(peer)
        try:
            if peer not in self._no_px:
                with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                    await self._ask_px(peer)
        finally:
            self._handshaking.discard(peer)
        if not self._host.get_network().get_connections(pid) or peer in self._connected:
            return
        if (
            self._dht is not None
            and peer in self._no_px
            and len(self._connected) < self._config.target_peers
        ):
            # A new peer that does not speak peer exchange (a DHT or bootstrap node of
            # another implementation) may know others: look up soon, while we need more.
            # A p2pfl peer has just told us its peers by peer exchange; waking for it too
            # put a lookup burst (a stream to every peer, each) behind every connection,
            # 7-11% of 8 local hosts' CPU through their first rounds.
            self._dht.wake()
        if peer in self._relays:
            self._relay_wake.set()
        if peer in self._no_px and not self._book.is_bootstrap(peer):
            # Not a p2pfl node (a DHT peer, say): useful to libp2p, not to the core, and
            # never a dial target of ours again.
            self._book.forget(peer)
            return
        addrs = self._book.addrs(peer)
        if not addrs:  # a peer that does not speak px (or failed it): what libp2p knows
            try:
                addrs = tuple(f"{a}/p2p/{peer}" for a in self._host.get_peerstore().addrs(pid))
            except Exception:
                addrs = ()
        self._connected[peer] = addrs
        self._book.on_connected(peer)
        self._alive(peer)
        LOG.info("peer %s connected", peer)
        self._pubsub.resend_subscriptions(pid)
        self._emit(PeerConnected(peer, addrs))
        self._kick_dialer()
        self._px_wake.set()

    async def _ask_px(self, peer: str) -> None:
        stream = None
        try:
            stream = await self._host.new_stream(ID.from_base58(peer), [TProtocol(_px.PX_PROTOCOL)])
            raw = await read_frame(stream, _px.MAX_PX_BYTES)
            await _close(stream)
            if raw is None:
                raise RemoteProtocolError("px stream closed without an answer")
            own, peers = _px.decode_px(peer, raw)
        except RemoteProtocolError as exc:
            LOG.warning("peer exchange with %s failed: %s", peer, exc)
            await _reset(stream)
            return
        except Exception as exc:
            await _reset(stream)
            if _fetch.lacks_protocol(exc):
                _remember(self._no_px, peer)
                LOG.info("peer %s does not speak p2pfl peer exchange; not asked again", peer)
            else:
                LOG.debug("peer exchange with %s failed: %r", peer, exc)
            return
        self._alive(peer)
        self._book.learn(peer, own)
        if any(self._book.learn(p, a) for p, a in peers.items()):
            self._kick_dialer()

    def _on_dht_found(self, peer: str, addrs: list[str]) -> None:
        """A peer found through the DHT: a dial candidate like a peer-exchange answer."""
        if peer in self._no_px or peer in self._connected:
            return
        if self._book.learn(peer, _px.clean_addrs(peer, addrs)):
            self._kick_dialer()

    async def _handle_px_stream(self, stream: Any) -> None:
        try:
            known = {p: self._connected[p] for p in self._connected if self._connected[p]}
            await stream.write(frame(_px.encode_px(self._own_addrs, known)))
            await _close(stream)
        except Exception as exc:
            LOG.debug("px answer failed: %r", exc)
            await _reset(stream)

    async def _px_loop(self) -> None:
        """Ask a random connected peer for its peers: soon after each new connection (a
        peer that joined at the same time as us is not in the answers we got on connect),
        then backing off to px_interval_s while below target_peers."""
        delay = self._config.px_interval_s
        while True:
            wake = self._px_wake
            with trio.move_on_after(delay):
                await wake.wait()
            if wake.is_set():
                self._px_wake = trio.Event()
                delay = PX_FAST_S
                continue
            peers = list(self._connected)
            askable = [p for p in peers if p not in self._no_px]
            if askable:
                self._spawn(self._ask_px, self._book.rng.choice(askable))
            if len(peers) < self._config.target_peers:
                delay = min(delay * 2, self._config.px_interval_s)
            else:
                delay = self._config.px_interval_s

    async def _dial_loop(self) -> None:
        while True:
            self._kick = trio.Event()
            to_dial, next_at = self._book.due(trio.current_time(), self._config.target_peers)
            for peer in to_dial:
                self._book.dial_started(peer)
                self._spawn(self._dial, peer)
            with trio.move_on_at(math.inf if next_at is None else next_at):
                await self._kick.wait()

    async def _dial(self, peer: str) -> None:
        try:
            ok = await self._connect(peer)
        except Exception as exc:
            LOG.debug("dial %s failed: %r", peer, exc)
            ok = False
        self._book.dial_finished(peer, ok, trio.current_time())
        if ok and peer not in self._connected:
            self._on_conn_up(peer)  # in case the notifee ran before we knew the peer
        self._kick_dialer()

    async def _connect(self, peer: str) -> bool:
        """Dial `peer` at its direct addresses, then through the relays it advertises."""
        pid = ID.from_base58(peer)
        direct: list[Any] = []
        relayed: list[str] = []
        for a in self._book.addrs(peer):
            if _relay.is_circuit(a):
                relayed.append(a)
                continue
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(a))
            except Exception:
                continue
            if info.peer_id == pid:
                # Never one of our own addresses: that would dial ourselves (a peer may
                # advertise 127.0.0.1, which is us on our machine).
                direct.extend(x for x in info.addrs if str(x) not in self._own_transport)
        if self._host.get_network().get_connections(pid):
            return True
        if direct:
            # A peer that failed before is in the swarm's 60 s negative cache; it may
            # have come back, and our own backoff already paces the attempts.
            self._host.get_network().unblock_peer(pid)
            with trio.move_on_after(self._config.dial_timeout_s):
                try:
                    await self._host.connect(L2PeerInfo(pid, direct))
                    return True
                except Exception as exc:
                    LOG.debug("direct dial %s failed: %r", peer, exc)
        for addr in relayed:
            if self._relay is None:
                break
            if self._host.get_network().get_connections(pid):
                return True  # it dialled us meanwhile: a second, relayed connection
                # would only compete with that one (one connection per peer)
            with trio.move_on_after(self._config.dial_timeout_s):
                try:
                    await self._relay.dial(addr)
                    # Its only route is the relay: the bulk port is out of reach.
                    _remember(self._no_bulk, peer)
                    LOG.info("connected to %s through a relay", peer)
                    return True
                except Exception as exc:
                    LOG.debug("relayed dial %s via %s failed: %r", peer, addr, exc)
        # A dial of ours can fail because the peer dialled us at the same moment (one
        # connection per peer): connected is what counts.
        return bool(self._host.get_network().get_connections(pid))

    async def _reserve_loop(self) -> None:
        """Hold a reservation at each --relay-via relay: asked once connected to it,
        renewed before it expires, asked again after the relay comes back."""
        assert self._relay is not None
        while True:
            wake = self._relay_wake
            now = trio.current_time()
            next_at = math.inf
            for relay in self._relays:
                connected = relay in self._connected
                at = self._relay.reserved.get(relay)
                if not connected:
                    self._relay.reserved.pop(relay, None)
                    continue
                if at is None or now - at >= _relay.RENEW_EVERY_S:
                    if await self._relay.reserve(relay):
                        LOG.info("relay slot reserved at %s: reachable through it", relay)
                        at = self._relay.reserved[relay]
                    else:
                        LOG.info("relay %s refused or did not answer a reservation", relay)
                        # Often only too early (identify has not told it the relay's
                        # protocols yet): again soon.
                        at = now - _relay.RENEW_EVERY_S + _relay.RETRY_S
                next_at = min(next_at, at + _relay.RENEW_EVERY_S)
            with trio.move_on_at(next_at):
                await wake.wait()
            if wake.is_set():
                self._relay_wake = trio.Event()

    async def _liveness_loop(self) -> None:
        cfg = self._config
        while True:
            await trio.sleep(cfg.liveness_interval_s)
            now = trio.current_time()
            for peer in list(self._connected):
                silent = now - self._last_alive.get(peer, now)
                if silent > cfg.liveness_timeout_s:
                    self._peer_gone(peer, f"no answer for {silent:.1f} s")
                    self._spawn(self._disconnect, peer)
                elif peer not in self._pinging:
                    self._pinging.add(peer)
                    self._spawn(self._ping, peer)

    async def _ping(self, peer: str) -> None:
        stream = None
        try:
            with trio.move_on_after(self._config.liveness_timeout_s):
                for _attempt in range(2):  # a stale reused stream gets one fresh replacement
                    stream = self._ping_streams.pop(peer, None)
                    fresh = stream is None
                    try:
                        if stream is None:
                            stream = await self._host.new_stream(
                                ID.from_base58(peer), [PING_PROTOCOL]
                            )
                        await perform_ping_roundtrip(stream)
                    except Exception as exc:
                        LOG.debug("ping %s failed: %r", peer, exc)
                        await _reset(stream)
                        stream = None
                        if fresh:
                            if _fetch.lacks_protocol(exc):
                                # It answered "na" just now: that is the sign of life.
                                self._alive(peer)
                                if peer not in self._no_ping:
                                    _remember(self._no_ping, peer)
                                    LOG.info("peer %s has no ping protocol", peer)
                            return
                        # The kept stream was closed by the peer after its last pong:
                        # some implementations do that every time.
                        _remember(self._ping_oneshot, peer)
                        continue
                    self._alive(peer)
                    if peer in self._connected and peer not in self._ping_oneshot:
                        self._ping_streams[peer] = stream
                        stream = None  # kept for the next ping
                    else:
                        with trio.move_on_after(1):
                            await _close(stream)
                        stream = None
                    return
        finally:
            self._pinging.discard(peer)
            # Cancelled mid-ping or the peer left: the stream may hold half a pong.
            await _reset(stream)

    async def _disconnect(self, peer: str) -> None:
        try:
            with trio.move_on_after(5):
                await self._host.disconnect(ID.from_base58(peer))
        except Exception as exc:
            LOG.debug("disconnect %s failed: %r", peer, exc)
