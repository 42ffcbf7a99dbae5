"""Build the py-libp2p host and pubsub the way p2pfl needs them.

Everything here corrects a py-libp2p 0.8.1 default that would hurt us (measured, see
shared/LIBP2P-NOTES.md): plaintext accepted, 250 ms dial stalls with three connections per
peer, GossipSub rate limits that drop silently, a 32-message subscription queue that drops
when full, a 120 s heartbeat.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import libp2p.pubsub.gossipsub as _gossipsub_mod
import libp2p.pubsub.pubsub as _pubsub_mod
import multiaddr
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.x25519 import create_new_key_pair as x25519_keypair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import PriorityQueue
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID, Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID, Yamux

from p2pfl.limits import LOG_EVERY_S, OUTBOUND_GOSSIP_PEER_BYTES
from p2pfl.net.libp2p import _gossip_io, _yamux
from p2pfl.net.libp2p._addrs import addrs_factory, exclusive_tcp_bind
from p2pfl.net.libp2p._config import Libp2pConfig

# A WINDOW_UPDATE per half window consumed, not per read (see _yamux); gossip RPCs read
# in whole pieces, not a byte at a time (see _gossip_io).
_yamux.install()
_gossip_io.install()

# Called for every gossip message we accept: (topic, originator peer id bytes, data).
GossipHandler = Callable[[str, bytes, bytes], None]
# Called for every gossip message dropped for its signature: (forwarding peer, reason).
BadGossip = Callable[[str, str], None]
# Asked first for every gossip message received: (originator peer id bytes, data length)
# -> whether to go on. False drops it before signature checks, the message cache, relaying
# and delivery (an oversized message, or its originator over its inbound byte budget).
GossipAdmit = Callable[[bytes, int], bool]


def build_host(keypair: Any, config: Libp2pConfig) -> Any:
    """A BasicHost with Noise as the only security, yamux as the only muxer."""
    exclusive_tcp_bind()
    host = new_host(
        key_pair=keypair,
        # Noise only: a host offering plaintext would otherwise be accepted.
        sec_opt={NOISE_ID: Noise(keypair, noise_privkey=x25519_keypair().private_key)},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        # One connection per peer: with the default of 3 every dial waits 250 ms.
        connection_config=ConnectionConfig(
            max_connections_per_peer=1, dial_timeout=config.dial_timeout_s
        ),
        listen_addrs=[multiaddr.Multiaddr(a) for a in config.listen],
        # Identify's observed addresses on loopback or behind NAT are ephemeral ports
        # nobody can dial: we advertise the announce list, or our interfaces' addresses.
        disable_identify_address_discovery=True,
        addrs_factory=addrs_factory(config.announce),
    )

    # The swarm's AutoConnector dials every peerstore peer until ~150 connections; our own
    # discovery decides whom to dial (target_peers), so switch it off for this host.
    async def _no_auto_connect() -> None:
        return None

    network: Any = host.get_network()  # the Swarm: its interface type lacks the connector
    network.auto_connector.maybe_connect = _no_auto_connect
    return host


# Outbound RPCs queued per peer before py-libp2p drops new ones. Its default of 32 lost
# two thirds of a 200-message burst (logged at debug level only), so the count is raised
# and the queue is bounded in bytes instead (OUTBOUND_GOSSIP_PEER_BYTES, p2pfl.limits): a
# slow peer costs us at most that much, however many messages wait for it.
OUTBOUND_QUEUE_RPCS = 8192
_LOG = logging.getLogger("p2pfl.net.libp2p")


class _BytePriorityQueue(PriorityQueue):
    """py-libp2p's per-peer outbound queue, refusing an RPC past `max_bytes` queued."""

    def __init__(self, max_size: int, max_bytes: int) -> None:
        super().__init__(max_size)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0
        self._logged_at = float("-inf")

    def push(self, rpc: rpc_pb2.RPC, priority: bool = False) -> bool:
        n = rpc.ByteSize()
        if self.bytes + n > self.max_bytes:
            self.dropped += 1
            now = time.monotonic()
            if now - self._logged_at >= LOG_EVERY_S:
                self._logged_at = now
                _LOG.warning(
                    "a peer is not reading its gossip: %d bytes queued for it, %d RPCs dropped",
                    self.bytes,
                    self.dropped,
                )
            return False
        ok = super().push(rpc, priority)
        if ok:
            self.bytes += n
        return ok

    def pop(self) -> rpc_pb2.RPC | None:
        rpc = super().pop()
        if rpc is not None:
            self.bytes = max(0, self.bytes - rpc.ByteSize())
        return rpc


class _DeepQueues(dict[Any, Any]):
    """pubsub.peer_queues, replacing each per-peer queue's store as pubsub creates it."""

    def __setitem__(self, peer: Any, queue: Any) -> None:
        if isinstance(getattr(queue, "_queue", None), PriorityQueue):
            queue._queue = _BytePriorityQueue(OUTBOUND_QUEUE_RPCS, OUTBOUND_GOSSIP_PEER_BYTES)
        else:  # a py-libp2p upgrade moved it: say so rather than silently drop messages
            _LOG.warning("cannot replace the pubsub queue; bursts over 32 messages may be lost")
        super().__setitem__(peer, queue)


# py-libp2p drops a message whose signature is missing or wrong with a debug log line
# only. Its check is wrapped (once, for the process) to tell the Pubsub that is handling
# the message, and from which neighbour: a context variable, so concurrent messages on
# other trio tasks never see each other's.
_handling: contextvars.ContextVar[tuple[SinkPubsub, Any] | None] = contextvars.ContextVar(
    "p2pfl_gossip_handling", default=None
)
_original_signature_validator = _pubsub_mod.signature_validator


def _counting_signature_validator(msg: rpc_pb2.Message) -> bool:
    try:
        ok = bool(_original_signature_validator(msg))
    except Exception:
        ok = False  # a malformed key or id: as bad as a wrong signature
    if not ok:
        handling = _handling.get()
        if handling is not None:
            pubsub, forwarder = handling
            pubsub.bad_signature(forwarder, "unsigned" if not msg.signature else "badly signed")
    return ok


_pubsub_mod.signature_validator = _counting_signature_validator


class SinkPubsub(Pubsub):
    """Pubsub that hands accepted messages straight to a callback.

    The stock class queues them on a 32-slot channel per topic and drops on overflow; a
    synchronous callback cannot overflow, so nothing is lost however bursty the topic.
    """

    def __init__(
        self,
        host: Any,
        router: Any,
        on_message: GossipHandler,
        admit: GossipAdmit | None = None,
        max_rpc_bytes: int = 1 << 20,
        on_bad: BadGossip | None = None,
    ) -> None:
        # strict_signing: every message carries the originator's signature, so `from_id`
        # is authenticated, not just the forwarding neighbour's claim.
        super().__init__(host, router, strict_signing=True)
        self._on_message = on_message
        self._admit = admit
        self._on_bad = on_bad
        self.peer_queues = _DeepQueues()
        # One RPC read from a peer holds at most this much (py-libp2p's own outbound limit
        # is about 1 MiB, so an honest peer never sends more); a larger one ends its stream.
        self.max_inbound_rpc_size = max_rpc_bytes

    async def push_msg(self, msg_forwarder: Any, msg: rpc_pb2.Message) -> None:
        # Before anything costs: an oversized message or a flooding originator's message
        # is neither verified, nor cached for gossip, nor relayed, nor delivered.
        if self._admit is not None and not self._admit(msg.from_id, len(msg.data)):
            return
        token = _handling.set((self, msg_forwarder))
        try:
            await super().push_msg(msg_forwarder, msg)
        finally:
            _handling.reset(token)

    def _is_subscribed_to_msg(self, msg: rpc_pb2.Message) -> bool:
        """Asked by the RPC read loop for each received message before it starts a task
        (with a uuid4 id) for push_msg. GossipSub hands a node each message about D times
        (every mesh peer relays it); a copy already seen is skipped here, which is what
        push_msg does with it first thing anyway (it neither scores nor relays it)."""
        return super()._is_subscribed_to_msg(msg) and not self._is_msg_seen(msg)

    def resend_subscriptions(self, peer_id: Any) -> bool:
        """Tell a peer our topics again, through its outbound queue (never a second writer
        on the stream). py-libp2p sends them once per pubsub stream, and a peer that does
        not know them sends us nothing on those topics (flood publish included); when two
        nodes dial each other at once, one connection and its streams are dropped. Sent
        once per new p2pfl peer; idempotent on the receiving side."""
        queue = self.peer_queues.get(peer_id)
        if queue is None:
            return False  # not registered yet: its hello is still to come
        return bool(queue.push(self.get_hello_packet(), priority=True))

    def bad_signature(self, forwarder: Any, reason: str) -> None:
        if self._on_bad is not None:
            self._on_bad(str(forwarder), reason)

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        for topic in publish_message.topicIDs:
            if topic in self.topic_ids:
                self._on_message(topic, publish_message.from_id, publish_message.data)


class _GossipSub(GossipSub):
    """GossipSub without py-libp2p 0.8.1's GRAFT ping-pong.

    Its handle_prune records "PRUNEd at" for the peer that pruned *us*, and handle_graft
    treats a GRAFT from a peer so recorded (within 10 s) as a flood: it answers PRUNE
    without a backoff of its own. So when A prunes B and later grafts it (A's mesh fell
    below degree_low), B prunes A, A records B, B grafts A, and so on: 16 local nodes
    logged ~220 "GRAFT flood detected" and churned their meshes. Flood tracking belongs to
    peers *we* pruned (py-libp2p records those too, in its mesh maintenance); here the
    record made for the pruner is undone.
    """

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        """py-libp2p keeps the first copy of each of the last 500-1000 messages, whole, to
        spot a peer sending two contents under one (from, seqno): with gossip messages of up
        to MAX_GOSSIP_BYTES that held 260 MB after a flood of 600 junk messages. Same check,
        keeping a 32-byte digest of the content instead of the message."""
        key = msg.from_id + msg.seqno
        h = hashlib.sha256(msg.data)
        for topic in msg.topicIDs:
            h.update(b"\0" + topic.encode())
        digest = h.digest()
        first = self.equivocation_detection.get(key)
        if first is None:
            self.equivocation_detection[key] = digest  # type: ignore[assignment]
            return True
        if first != digest:
            _LOG.warning("equivocation: %s sent two contents under one seqno", ID(msg.from_id))
            if self.scorer is not None:
                self.scorer.penalize_equivocation(ID(msg.from_id), 100.0)
            return False
        return True

    def _get_peers_to_send(
        self, topic_ids: Any, msg_forwarder: Any, origin: Any, msg_id: bytes | None = None
    ) -> Any:
        """Flood-publish our own messages (go-libp2p's default, floodPublish): to every
        peer subscribed to the topic, not only our mesh. py-libp2p sends to the mesh
        alone, and a mesh still forming, or emptied by a PRUNE backoff, lost a node's
        messages to peers it was connected to (a task's volunteers never reached its
        publisher). Relayed messages still follow the mesh."""
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        pubsub = self.pubsub
        if pubsub is not None and origin == pubsub.my_id:
            for topic in topic_ids:
                peers |= set(pubsub.peer_topics.get(topic, ()))
            peers.discard(origin)
        return peers

    async def handle_prune(self, prune_msg: Any, sender_peer_id: Any) -> None:
        topic = prune_msg.topicID
        before = self.graft_flood_tracking.get(sender_peer_id, {}).get(topic)
        await super().handle_prune(prune_msg, sender_peer_id)
        tracked = self.graft_flood_tracking.get(sender_peer_id)
        if tracked is not None:
            if before is None:
                tracked.pop(topic, None)
                if not tracked:
                    del self.graft_flood_tracking[sender_peer_id]
            else:
                tracked[topic] = before


# Every pubsub RPC carries the sender's signed peer record, and py-libp2p verifies it
# (Ed25519, protobuf, peerstore update) on each one received: 5-9% of a node's CPU while a
# taskpack spreads. A peer resends the same bytes until its addresses change, so a record
# already accepted from that peer is accepted again without the work, for a while.
_RECORD_TTL_S = 600.0
_accepted_records: dict[Any, tuple[bytes, float]] = {}
_original_consume = _pubsub_mod.maybe_consume_signed_record


def _consume_signed_record_once(msg: Any, host: Any, peer_id: Any) -> bool:
    record = msg.senderRecord if msg.HasField("senderRecord") else b""
    if not record:
        return True
    now = time.monotonic()
    seen = _accepted_records.get(peer_id)
    if seen is not None and seen[0] == record and now - seen[1] < _RECORD_TTL_S:
        return True
    ok = bool(_original_consume(msg, host, peer_id))
    if ok:
        if len(_accepted_records) > 4096:
            _accepted_records.clear()
        _accepted_records[peer_id] = (bytes(record), now)
    return ok


_pubsub_mod.maybe_consume_signed_record = _consume_signed_record_once
_gossipsub_mod.maybe_consume_signed_record = _consume_signed_record_once


def build_pubsub(
    host: Any,
    config: Libp2pConfig,
    on_message: GossipHandler,
    admit: GossipAdmit | None = None,
    max_rpc_bytes: int = 1 << 20,
    on_bad: BadGossip | None = None,
) -> tuple[Any, Any]:
    gossipsub = _GossipSub(
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=config.gossip_degree,
        degree_low=config.gossip_degree_low,
        degree_high=config.gossip_degree_high,
        heartbeat_interval=config.heartbeat_s,  # type: ignore[arg-type]  # float works
        # Rate limiting dropped a fifth of messages at 100 msg/s, logging only a warning.
        spam_protection_enabled=False,
        # Needs peers on >= 3 distinct IPs to graft; on one host (tests, a lab) it starves
        # the mesh.
        eclipse_protection_enabled=False,
        # Keep the heartbeat where we set it.
        adaptive_gossip_enabled=False,
    )
    pubsub = SinkPubsub(host, gossipsub, on_message, admit, max_rpc_bytes, on_bad)
    return pubsub, gossipsub


class ConnNotifee(INotifee):
    """Swarm connection callbacks -> ours. They run inside libp2p's tasks: never block."""

    def __init__(self, on_up: Callable[[str], None], on_down: Callable[[Any], None]) -> None:
        self._on_up, self._on_down = on_up, on_down

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def connected(self, network: Any, conn: Any) -> None:
        self._on_up(str(conn.muxed_conn.peer_id))

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._on_down(conn.muxed_conn.peer_id)  # the ID: the swarm is asked about it

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass
