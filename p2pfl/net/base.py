"""The network interface every transport implements, and the events it delivers.

Two implementations pass the same conformance suite (tests/net/):

* ``p2pfl.net.libp2p`` -- real hosts: TCP, Noise, yamux, GossipSub, a blob stream protocol.
* ``p2pfl.net.sim``    -- many nodes in one process under virtual time (a discrete-event
  hub), deterministic for a seed, with a link model and byte counters.

The interface is *non-blocking*: every method returns at once and its outcome, if any,
arrives later as an event handed to the ``sink`` callback given at construction. That is
what lets the same sans-IO core and the same driver run over trio (real network) and over
the discrete-event simulator (no trio at all, so a 1,000-node run is cheap and
deterministic).

Events are delivered one at a time to ``sink``; a sink must not block (it feeds the core,
which only returns commands).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# Message and range caps live with every other bound in p2pfl.limits; re-exported here
# because every transport checks them. Gossip carries small control messages only: we
# refuse bigger publishes ourselves (LocalProtocolError), drop bigger ones received, and
# move anything large as a blob.
from p2pfl.limits import MAX_DIRECT_BYTES, MAX_FETCH_BYTES, MAX_GOSSIP_BYTES

__all__ = [
    "MAX_DIRECT_BYTES",
    "MAX_FETCH_BYTES",
    "MAX_GOSSIP_BYTES",
    "NOT_ALLOWED",
    "BlobReader",
    "EventSink",
    "FetchDone",
    "FetchFailed",
    "MayServe",
    "Message",
    "NetEvent",
    "NetStats",
    "Network",
    "PeerConnected",
    "PeerDisconnected",
    "PeerInfo",
    "allow_all",
]


@dataclass(frozen=True, slots=True)
class PeerInfo:
    peer_id: str
    addrs: tuple[str, ...] = ()


# --- events (network -> driver) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerConnected:
    peer: str
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    """A peer is gone: closed, crashed (detected by liveness checks) or partitioned away."""

    peer: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    """A message received on a gossip ``topic``, or a direct message when topic is None.

    ``sender`` is the authenticated peer id of the *originator* (GossipSub signing / the
    Noise session), not the neighbour that forwarded it.
    """

    topic: str | None
    sender: str
    data: bytes


@dataclass(frozen=True, slots=True)
class FetchDone:
    token: object
    peer: str
    cid: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FetchFailed:
    token: object
    peer: str
    cid: str
    offset: int
    reason: str


NetEvent = PeerConnected | PeerDisconnected | Message | FetchDone | FetchFailed
EventSink = Callable[[NetEvent], None]
# Serves a byte range of a locally held blob: (cid, offset, length) -> bytes, or None when
# this node does not hold that blob. Returning fewer bytes than asked means end of blob.
BlobReader = Callable[[str, int, int], bytes | None]
# Whether this node serves blob `cid` to `peer`: (peer id, cid) -> bool, asked before every
# range is read. A refused peer gets a FetchFailed whose reason starts with NOT_ALLOWED
# (at once, not a timeout). The node decides (e.g. a task's updates only to its roster).
MayServe = Callable[[str, str], bool]
NOT_ALLOWED = "not allowed"


def allow_all(peer: str, cid: str) -> bool:
    """The default MayServe: every peer may fetch every blob this node holds."""
    return True


@dataclass
class NetStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Network(Protocol):
    """What the driver needs from a transport. All methods return immediately."""

    @property
    def peer_id(self) -> str: ...

    def listen_addrs(self) -> list[str]:
        """Addresses others can dial (multiaddrs ending in /p2p/<peer id>)."""
        ...

    def connected_peers(self) -> list[PeerInfo]: ...

    def subscribe(self, topic: str) -> None: ...

    def publish(self, topic: str, data: bytes) -> None:
        """Gossip `data` to every subscriber of `topic` (ourselves included, as GossipSub
        does). Raises LocalProtocolError if len(data) > MAX_GOSSIP_BYTES."""
        ...

    def send(self, peer: str, data: bytes, plain: bytes | None = None) -> None:
        """A direct message to one peer; dialled if needed. Lost if the peer is gone
        (a PeerDisconnected follows). Raises LocalProtocolError if oversize.

        `plain`: `data` without the blob riding along with it (p2pfl/attached.py), sent
        instead where bulk must not go. Over libp2p that is a yamux stream, the fallback
        when no message channel can be had: py-libp2p's yamux reader writes
        acknowledgements under the connection's write lock, so two sides writing bulk at
        once can deadlock the connection (slice offers both ways in round 1, on streams
        while channels opened, did so in about one of twenty 8-host runs, until liveness
        dropped the connection 30 s later). The receiver then fetches the blob."""
        ...

    def fetch(self, peer: str, cid: str, offset: int, length: int, token: object) -> None:
        """Ask `peer` for bytes [offset, offset+length) of blob `cid`; the answer is one
        FetchDone (possibly short at the end of the blob) or FetchFailed, carrying `token`.
        Verification is the caller's job (the store's fetcher checks chunk hashes)."""
        ...

    def stats(self) -> NetStats: ...
