"""Per-node state kept by the hub, and the link model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.net.base import BlobReader, EventSink, MayServe, NetEvent, NetStats, allow_all

if TYPE_CHECKING:
    from p2pfl.net.sim._network import SimNetwork

log = logging.getLogger("p2pfl.net.sim")


@dataclass(frozen=True, slots=True)
class LinkModel:
    """A node's access link. Between two nodes: latency is the mean of both ends, the
    byte rate is each end's uplink/downlink (FIFO queues), loss is the worse end's.

    ``bandwidth_mbps`` is megabits per second, each direction.
    """

    latency_ms: float = 20.0
    bandwidth_mbps: float = 100.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not self.latency_ms >= 0:
            raise LocalProtocolError(f"LinkModel.latency_ms must be >= 0, got {self.latency_ms}")
        if not self.bandwidth_mbps > 0:
            raise LocalProtocolError(
                f"LinkModel.bandwidth_mbps must be > 0, got {self.bandwidth_mbps}"
            )
        if not 0.0 <= self.loss < 1.0:
            raise LocalProtocolError(f"LinkModel.loss must be in [0, 1), got {self.loss}")

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000.0

    @property
    def seconds_per_byte(self) -> float:
        return 8.0 / (self.bandwidth_mbps * 1e6)


def _null_reader(cid: str, offset: int, length: int) -> bytes | None:
    return None


class Node:
    """Everything the hub knows about one peer. ``serial`` names the incarnation: it
    changes on restart, and events scheduled for an older incarnation are dropped."""

    __slots__ = (
        "idx",
        "peer",
        "addr",
        "alive",
        "serial",
        "net",
        "sink",
        "reader",
        "may_serve",
        "topics",
        "known",
        "link",
        "lat",
        "inv",
        "loss",
        "up_busy",
        "down_busy",
        "dead_at",
        "group",
        "group_at",
        "g_sent",
        "g_recv",
        "g_msent",
        "g_mrecv",
        "d_sent",
        "d_recv",
        "d_msent",
        "d_mrecv",
        "f_sent",
        "f_recv",
        "f_msent",
        "f_mrecv",
        "dropped",
    )

    def __init__(self, idx: int, peer: str, link: LinkModel) -> None:
        self.idx = idx
        self.peer = peer
        self.addr = f"/sim/{idx}/p2p/{peer}"
        self.alive = True
        self.serial = 0
        self.net: SimNetwork | None = None
        self.sink: EventSink = _drop
        self.reader: BlobReader = _null_reader
        self.may_serve: MayServe = allow_all
        self.topics: set[str] = set()
        # neighbour index -> the serial of that neighbour we were told about (PeerConnected)
        self.known: dict[int, int] = {}
        self.set_link(link)
        self.up_busy = 0.0
        self.down_busy = 0.0
        self.dead_at = 0.0
        self.group = 0
        self.group_at = 0.0
        # byte/message counters per traffic kind: gossip, direct, fetch
        self.g_sent = self.g_recv = self.g_msent = self.g_mrecv = 0
        self.d_sent = self.d_recv = self.d_msent = self.d_mrecv = 0
        self.f_sent = self.f_recv = self.f_msent = self.f_mrecv = 0
        self.dropped = 0

    def set_link(self, link: LinkModel) -> None:
        self.link = link
        self.lat = link.latency_s
        self.inv = link.seconds_per_byte
        self.loss = link.loss

    def emit(self, serial: int, event: NetEvent) -> None:
        """Hand `event` to the sink if this incarnation is still the live one.

        A sink's RemoteProtocolError (a peer's bad input) is logged and swallowed, as a
        real node does; any other exception is a bug and propagates out of hub.run().
        """
        if not self.alive or self.serial != serial:
            return
        try:
            self.sink(event)
        except RemoteProtocolError as exc:
            log.warning("%s rejected %s: %s", self.peer, type(event).__name__, exc)

    def stats(self) -> NetStats:
        return NetStats(
            bytes_sent=self.g_sent + self.d_sent + self.f_sent,
            bytes_received=self.g_recv + self.d_recv + self.f_recv,
            messages_sent=self.g_msent + self.d_msent + self.f_msent,
            messages_received=self.g_mrecv + self.d_mrecv + self.f_mrecv,
            extra={
                "gossip_bytes_sent": self.g_sent,
                "gossip_bytes_received": self.g_recv,
                "direct_bytes_sent": self.d_sent,
                "direct_bytes_received": self.d_recv,
                "fetch_bytes_sent": self.f_sent,
                "fetch_bytes_received": self.f_recv,
                "dropped": self.dropped,
            },
        )


def _drop(event: NetEvent) -> None:
    pass
