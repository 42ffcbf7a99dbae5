"""SimNetwork: one node's face of the hub (implements ``p2pfl.net.base.Network``), and the
data plane: gossip, direct sends and blob fetches.

Timing model, per transfer of L bytes from a to b (sends and fetches):
  * a's uplink and b's downlink are FIFO queues of the node's bandwidth (``busy_until``);
  * the bytes leave a during [s, s + L/up_a] with s = max(now, a.up_busy);
  * they reach b after the link latency; b's downlink is booked when the first byte
    arrives: b takes them during [r, r + L/down_b] with r = max(s + latency, b.down_busy
    at that moment), and never before the last byte arrived;
  * delivery happens when the last byte is in.
So ten peers fetching from one node share its uplink (each waits its turn), and one
node fetching from ten shares its downlink.

Gossip is lighter: a message travels the publisher's BFS tree (``_gossip.py``) and takes,
per hop, the latency plus its transmission time, without queueing (control messages are
small), and it is never lost: GossipSub repairs a lost frame through its mesh and IHAVE/
IWANT gossip, so loss only applies to direct sends and fetches. A tree is fixed when the
message is published: a node that dies mid-flight does not cut off its subtree (the real
mesh has redundant paths), but a receiver that is dead, restarted or partitioned away
from the publisher on arrival gets nothing. Unsubscribed nodes relay (and count bytes)
but get no event; GossipSub would route around them inside the topic mesh.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.net.base import (
    MAX_DIRECT_BYTES,
    MAX_FETCH_BYTES,
    MAX_GOSSIP_BYTES,
    NOT_ALLOWED,
    FetchDone,
    FetchFailed,
    Message,
    NetStats,
    PeerInfo,
)
from p2pfl.net.sim._loop import TimerHandle
from p2pfl.net.sim._node import Node

if TYPE_CHECKING:
    from p2pfl.net.sim._hub import SimHub

log = logging.getLogger("p2pfl.net.sim")

# Bytes counted for a fetch request (plus the cid) and a fetch response header: a
# stand-in for the stream protocol's framing.
FETCH_REQUEST_BYTES = 64
FETCH_RESPONSE_BYTES = 16

NOT_FOUND = "not found"
# The serving node's may_serve hook refused this peer (same reason text as libp2p).
FORBIDDEN = NOT_ALLOWED
UNREACHABLE = "unreachable"
LOST = "lost"


class SimNetwork:
    """The Network of one incarnation of a simulated node. After a crash it goes inert:
    its calls do nothing (the driver of a dead node must not bring it down)."""

    def __init__(self, hub: SimHub, node: Node, serial: int) -> None:
        self._hub = hub
        self._node = node
        self._serial = serial

    @property
    def peer_id(self) -> str:
        return self._node.peer

    @property
    def hub(self) -> SimHub:
        return self._hub

    @property
    def alive(self) -> bool:
        """True while this incarnation runs (False after a crash, also after the restart)."""
        return self._node.alive and self._node.serial == self._serial

    def listen_addrs(self) -> list[str]:
        return [self._node.addr]

    def connected_peers(self) -> list[PeerInfo]:
        """The peers this node was told are connected (PeerConnected, no Disconnected since)."""
        if not self.alive:
            return []
        nodes = self._hub._nodes
        return [PeerInfo(nodes[j].peer, (nodes[j].addr,)) for j in sorted(self._node.known)]

    def subscribe(self, topic: str) -> None:
        if self.alive:
            self._node.topics.add(topic)

    def unsubscribe(self, topic: str) -> None:
        if self.alive:
            self._node.topics.discard(topic)

    def stats(self) -> NetStats:
        return self._node.stats()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        """A timer that dies with this incarnation (see SimHub.call_at)."""
        return self._hub.call_at(when, _owned(self._node, self._serial, callback))

    # --- gossip --------------------------------------------------------------------------

    def publish(self, topic: str, data: bytes) -> None:
        if len(data) > MAX_GOSSIP_BYTES:
            raise LocalProtocolError(
                f"publish: {len(data)} bytes on {topic!r} exceeds MAX_GOSSIP_BYTES "
                f"({MAX_GOSSIP_BYTES}); move large data as a blob"
            )
        if not self.alive:
            return
        hub, node = self._hub, self._node
        msg = Message(topic, node.peer, bytes(data))
        now, size = hub.now, len(msg.data)
        # Our own copy, at once (after what is already due now), as GossipSub does.
        hub._push(now, _deliver_own, node, self._serial, msg)
        for cum_lat, cum_inv, receivers, parents in hub._planner_now().plan(node.idx):
            hub._push(
                now + cum_lat + size * cum_inv,
                _deliver_gossip,
                hub,
                node,
                hub._serial,
                msg,
                receivers,
                parents,
            )

    # --- direct messages ---------------------------------------------------------------------

    def send(self, peer: str, data: bytes, plain: bytes | None = None) -> None:
        # `plain` is never needed: the simulated link has no shared muxer to block.
        if len(data) > MAX_DIRECT_BYTES:
            raise LocalProtocolError(
                f"send: {len(data)} bytes to {peer} exceeds MAX_DIRECT_BYTES ({MAX_DIRECT_BYTES})"
            )
        if not self.alive:
            return
        hub, src = self._hub, self._node
        idx = hub._index.get(peer)
        if idx is None:
            src.dropped += 1
            return
        dst = hub._nodes[idx]
        if hub._cut_since(src, dst) is not None:
            src.dropped += 1  # unreachable: lost; the driver learns through PeerDisconnected
            return
        size = len(data)
        src.d_sent += size
        src.d_msent += 1
        lost = _lost(hub, src, dst)
        if lost:
            src.dropped += 1
        msg = Message(None, src.peer, bytes(data))
        _transfer(hub, src, dst, size, lost, _deliver_direct, hub, src, dst, dst.serial, msg)

    # --- blob fetches ------------------------------------------------------------------------

    def fetch(self, peer: str, cid: str, offset: int, length: int, token: object) -> None:
        if offset < 0 or not 0 < length <= MAX_FETCH_BYTES:
            raise LocalProtocolError(
                f"fetch: need offset >= 0 and 0 < length <= MAX_FETCH_BYTES ({MAX_FETCH_BYTES}),"
                f" got offset={offset} length={length}"
            )
        if not self.alive:
            return
        hub, src = self._hub, self._node
        req = _Fetch(src, self._serial, peer, cid, offset, length, token)
        idx = hub._index.get(peer)
        if idx is None:
            hub._push(hub.now, _fetch_failed, req, UNREACHABLE)
            return
        dst = hub._nodes[idx]
        req.server, req.server_serial = dst, dst.serial
        since = hub._cut_since(src, dst)
        if since is not None:
            # Known dead (detected) -> at once; otherwise when detection would tell.
            hub._push(max(hub.now, since + hub.detect_s), _fetch_failed, req, UNREACHABLE)
            return
        size = FETCH_REQUEST_BYTES + len(cid)
        src.f_sent += size
        src.f_msent += 1
        lost = _lost(hub, src, dst)
        if lost:
            src.dropped += 1
            hub._push(hub.now + hub.detect_s, _fetch_failed, req, LOST)
        _transfer(hub, src, dst, size, lost, _serve_fetch, hub, req, size)


class _Fetch:
    """One fetch in flight: who asked (which incarnation), whom, and what."""

    __slots__ = (
        "client",
        "client_serial",
        "peer",
        "cid",
        "offset",
        "length",
        "token",
        "server",
        "server_serial",
    )

    def __init__(
        self,
        client: Node,
        serial: int,
        peer: str,
        cid: str,
        offset: int,
        length: int,
        token: object,
    ) -> None:
        self.client, self.client_serial = client, serial
        self.peer, self.cid, self.offset, self.length, self.token = peer, cid, offset, length, token
        self.server: Node | None = None
        self.server_serial = 0


# --- event handlers (run from the heap) ------------------------------------------------------


def _owned(node: Node, serial: int, callback: Callable[[], None]) -> Callable[[], None]:
    """`callback` guarded so it only runs while that incarnation lives."""

    def fire() -> None:
        if node.alive and node.serial == serial:
            callback()

    return fire


def _transfer(
    hub: SimHub, a: Node, b: Node, size: int, lost: bool, then: Callable[..., None], *args: object
) -> None:
    """Send `size` bytes from a to b, then call `then(*args)` when the last byte is in.

    a's uplink is booked now (FIFO). b's downlink is booked only when the first byte gets
    there (an event at start + latency): booking it at send time would let a transfer
    still queued behind a busy uplink block b's idle downlink for everything else."""
    start = max(hub.now, a.up_busy)
    sent = start + size * a.inv
    a.up_busy = sent
    if lost:
        return  # the bytes left a (its uplink was used) but never reach b
    latency = (a.lat + b.lat) * 0.5
    hub._push(start + latency, _arrive, hub, b, size, sent + latency, then, args)


def _arrive(
    hub: SimHub, b: Node, size: int, last_byte_at: float, then: Callable[..., None], args: tuple
) -> None:
    begin = max(hub.now, b.down_busy)
    done = max(begin + size * b.inv, last_byte_at)
    b.down_busy = done
    hub._push(done, then, *args)


def _lost(hub: SimHub, a: Node, b: Node) -> bool:
    if a.loss == 0.0 and b.loss == 0.0:
        return False  # no rng draw: adding loss elsewhere does not shift this run's draws
    # The worse end decides, so a hub-wide LinkModel(loss=p) loses exactly p.
    return hub.rng.random() < max(a.loss, b.loss)


def _deliver_own(node: Node, serial: int, msg: Message) -> None:
    if msg.topic in node.topics:
        node.emit(serial, msg)


def _deliver_gossip(
    hub: SimHub,
    src: Node,
    pub_serial: int,
    msg: Message,
    receivers: np.ndarray,
    parents: np.ndarray,
) -> None:
    """One arrival group of a publish. Hot path: about a microsecond per receiver."""
    nodes = hub._nodes
    group, topic, size = src.group, msg.topic, len(msg.data)
    rl, pl = receivers.tolist(), parents.tolist()
    for k in range(len(rl)):
        n = nodes[rl[k]]
        # Skip the dead, incarnations born after the publish, and the partitioned-away.
        if not n.alive or n.serial > pub_serial or n.group != group:
            continue
        n.g_recv += size
        n.g_mrecv += 1
        p = nodes[pl[k]]
        p.g_sent += size
        p.g_msent += 1
        if topic in n.topics:
            try:
                n.sink(msg)
            except RemoteProtocolError as exc:
                log.warning("%s rejected a gossip message: %s", n.peer, exc)
            except BaseException:
                # A bug: keep the rest of this group on the heap so the hub stays coherent.
                if k + 1 < len(rl):
                    hub._push(
                        hub.now,
                        _deliver_gossip,
                        hub,
                        src,
                        pub_serial,
                        msg,
                        receivers[k + 1 :],
                        parents[k + 1 :],
                    )
                raise


def _deliver_direct(hub: SimHub, src: Node, dst: Node, serial: int, msg: Message) -> None:
    if not dst.alive or dst.serial != serial or dst.group != src.group:
        src.dropped += 1
        return
    dst.d_recv += len(msg.data)
    dst.d_mrecv += 1
    dst.emit(serial, msg)


def _fetch_failed(req: _Fetch, reason: str) -> None:
    req.client.emit(
        req.client_serial, FetchFailed(req.token, req.peer, req.cid, req.offset, reason)
    )


def _server_gone(hub: SimHub, req: _Fetch) -> float | None:
    """None if the server incarnation that got the request can still answer the client."""
    server = req.server
    assert server is not None
    if server.serial != req.server_serial:
        return server.dead_at  # it crashed (and maybe came back as a new incarnation)
    return hub._cut_since(req.client, server)


def _serve_fetch(hub: SimHub, req: _Fetch, req_size: int) -> None:
    server = req.server
    assert server is not None
    since = _server_gone(hub, req)
    if since is not None:
        hub._push(max(hub.now, since + hub.detect_s), _fetch_failed, req, UNREACHABLE)
        return
    server.f_recv += req_size
    server.f_mrecv += 1
    refusal: str | None = None
    data: bytes | None = None
    if not _may_serve(server, req.client.peer, req.cid):
        refusal = FORBIDDEN  # asked before any read, as on a real node
    else:
        data = server.reader(req.cid, req.offset, req.length)
        if data is not None:
            data = bytes(data[: req.length])
        else:
            refusal = NOT_FOUND
    size = FETCH_RESPONSE_BYTES + (len(data) if data is not None else 0)
    server.f_sent += size
    server.f_msent += 1
    _transfer(hub, server, req.client, size, False, _fetch_answer, hub, req, data, size, refusal)


def _may_serve(server: Node, peer: str, cid: str) -> bool:
    """The server's hook, failing closed: a hook that raises refuses (and says so)."""
    try:
        return bool(server.may_serve(peer, cid))
    except Exception:
        log.exception("%s: may_serve failed for %s / %s: refusing", server.peer, peer, cid[:80])
        return False


def _fetch_answer(
    hub: SimHub, req: _Fetch, data: bytes | None, size: int, refusal: str | None = None
) -> None:
    client = req.client
    if not client.alive or client.serial != req.client_serial:
        return
    since = _server_gone(hub, req)
    if since is not None:
        # The server died or was cut off while the response was on its way.
        hub._push(max(hub.now, since + hub.detect_s), _fetch_failed, req, UNREACHABLE)
        return
    client.f_recv += size
    client.f_mrecv += 1
    if data is None:
        _fetch_failed(req, refusal or NOT_FOUND)
    else:
        client.emit(req.client_serial, FetchDone(req.token, req.peer, req.cid, req.offset, data))
