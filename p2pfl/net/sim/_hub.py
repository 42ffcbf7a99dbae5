"""SimHub: the simulated world. Nodes, the overlay graph, crashes, partitions, timers.

The data plane (publish, send, fetch) lives in ``_network.py``; this module owns who is
alive, who is linked to whom, and the PeerConnected/PeerDisconnected events that tell
drivers about it.

Link events are *reconciled*, not replayed: a change (connect, crash, partition...)
schedules ``_sync_link(a, b)`` at the time the ends would notice (latency for a new link,
``detect_s`` for a failure). The sync compares what each end was told with the truth at
that moment and emits only the difference, so a partition healed before anyone noticed
produces no events, and a crash followed by a quick restart produces Disconnected then
Connected (the old connection did die).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from p2pfl.errors import LocalProtocolError
from p2pfl.net.base import (
    BlobReader,
    EventSink,
    MayServe,
    NetStats,
    PeerConnected,
    PeerDisconnected,
)
from p2pfl.net.sim._gossip import GossipPlanner
from p2pfl.net.sim._loop import EventLoop, TimerHandle
from p2pfl.net.sim._network import SimNetwork, _owned
from p2pfl.net.sim._node import LinkModel, Node
from p2pfl.net.sim._topology import make_edges


class SimHub(EventLoop):
    """Many nodes in one process under virtual time; deterministic for a seed."""

    def __init__(self, seed: int = 0, link: LinkModel | None = None, detect_s: float = 1.0) -> None:
        super().__init__()
        if not detect_s >= 0:
            raise LocalProtocolError(f"detect_s must be >= 0, got {detect_s}")
        self.rng = random.Random(seed)
        self.link = link if link is not None else LinkModel()
        self.detect_s = float(detect_s)
        self._nodes: list[Node] = []
        self._index: dict[str, int] = {}
        self._adj: list[set[int]] = []
        self._serial = 0  # last incarnation serial handed out (global, increasing)
        self._planner: GossipPlanner | None = None
        # All overlay links as an (m, 2) array, i < j, sorted; None after a link change.
        self._edge_arr: np.ndarray | None = None

    # --- nodes -----------------------------------------------------------------------

    def add_node(
        self,
        peer_id: str,
        sink: EventSink,
        blob_reader: BlobReader | None = None,
        may_serve: MayServe | None = None,
    ) -> SimNetwork:
        if peer_id in self._index:
            raise LocalProtocolError(f"add_node: {peer_id} already exists")
        node = Node(len(self._nodes), peer_id, self.link)
        self._index[peer_id] = node.idx
        self._nodes.append(node)
        self._adj.append(set())
        self._planner = self._edge_arr = None
        return self._incarnate(node, sink, blob_reader, may_serve)

    def _incarnate(
        self,
        node: Node,
        sink: EventSink,
        reader: BlobReader | None,
        may_serve: MayServe | None = None,
    ) -> SimNetwork:
        self._serial += 1
        node.serial = self._serial
        node.alive = True
        node.sink = sink
        if reader is not None:
            node.reader = reader
        if may_serve is not None:
            node.may_serve = may_serve
        node.topics = set()
        node.known = {}
        node.up_busy = node.down_busy = self._now
        node.net = SimNetwork(self, node, node.serial)
        return node.net

    def node(self, peer_id: str) -> Node:
        try:
            return self._nodes[self._index[peer_id]]
        except KeyError:
            raise LocalProtocolError(f"unknown peer {peer_id}") from None

    def network(self, peer_id: str) -> SimNetwork:
        """The current SimNetwork of a peer (its latest incarnation)."""
        net = self.node(peer_id).net
        assert net is not None
        return net

    @property
    def peers(self) -> list[str]:
        """Every peer ever added, in add order."""
        return [n.peer for n in self._nodes]

    def is_alive(self, peer_id: str) -> bool:
        return self.node(peer_id).alive

    def set_link(self, peer_id: str, link: LinkModel) -> None:
        """Give one node its own access link (the hub's `link` is the default)."""
        self.node(peer_id).set_link(link)
        self._planner = None

    # --- overlay ---------------------------------------------------------------------

    def connect(self, a: str, b: str) -> None:
        """Link a and b; both get PeerConnected after the link latency (if alive and in the
        same partition group)."""
        self._add_edge(self._index_of(a), self._index_of(b))

    def disconnect(self, a: str, b: str) -> None:
        """Close the a-b link; both get PeerDisconnected(reason="closed") after latency."""
        i, j = self._index_of(a), self._index_of(b)
        if j in self._adj[i]:
            self._adj[i].discard(j)
            self._adj[j].discard(i)
            self._planner = self._edge_arr = None
            self._push(self._now + self._edge_lat(i, j), self._sync_link, i, j)

    def apply_topology(self, kind: str, degree: int = 4, rewire: float = 0.1) -> None:
        """Add the links of a topology over all nodes added so far (in add order):
        "full", "ring", "line", "star" (hub = first node), "random-regular" (degree),
        "small-world" (Watts-Strogatz: degree, rewire). Existing links are kept."""
        edges = make_edges(kind, len(self._nodes), self.rng, degree=degree, rewire=rewire)
        for i, j in edges:
            self._add_edge(i, j)

    def neighbours(self, peer_id: str) -> list[str]:
        """Overlay neighbours (dead or partitioned ones included), in add order."""
        return [self._nodes[j].peer for j in sorted(self._adj[self._index_of(peer_id)])]

    def edges(self) -> list[tuple[str, str]]:
        return [
            (self._nodes[i].peer, self._nodes[j].peer)
            for i in range(len(self._nodes))
            for j in sorted(self._adj[i])
            if i < j
        ]

    def _index_of(self, peer_id: str) -> int:
        try:
            return self._index[peer_id]
        except KeyError:
            raise LocalProtocolError(f"unknown peer {peer_id}") from None

    def _add_edge(self, i: int, j: int) -> None:
        if i == j:
            raise LocalProtocolError(
                f"connect: a node cannot link to itself ({self._nodes[i].peer})"
            )
        if j in self._adj[i]:
            return
        self._adj[i].add(j)
        self._adj[j].add(i)
        self._planner = self._edge_arr = None
        self._push(self._now + self._edge_lat(i, j), self._sync_link, i, j)

    def _edge_lat(self, i: int, j: int) -> float:
        return (self._nodes[i].lat + self._nodes[j].lat) * 0.5

    def _sync_link(self, i: int, j: int) -> None:
        """Tell each end of link i-j the truth about the other, if it was told otherwise."""
        for x, y in ((i, j), (j, i)):
            nx, ny = self._nodes[x], self._nodes[y]
            if not nx.alive:
                continue
            up = y in self._adj[x] and ny.alive and nx.group == ny.group
            told = nx.known.get(y)
            if up and told == ny.serial:
                continue
            if told is not None:
                if not ny.alive or told != ny.serial:
                    reason = "crashed"
                elif nx.group != ny.group:
                    reason = "partitioned"
                else:
                    reason = "closed"
                del nx.known[y]
                nx.emit(nx.serial, PeerDisconnected(ny.peer, reason))
            if up:
                nx.known[y] = ny.serial
                nx.emit(nx.serial, PeerConnected(ny.peer, (ny.addr,)))

    # --- failures ----------------------------------------------------------------------

    def crash(self, peer_id: str) -> None:
        """The node stops at once: it gets no more events; its in-flight fetches fail; its
        neighbours get PeerDisconnected(peer, "crashed") after detect_s."""
        node = self.node(peer_id)
        if not node.alive:
            raise LocalProtocolError(f"crash: {peer_id} is already down")
        node.alive = False
        node.dead_at = self._now
        node.known = {}
        self._planner = None
        for j in sorted(self._adj[node.idx]):
            self._push(self._now + self.detect_s, self._sync_link, node.idx, j)

    def restart(
        self,
        peer_id: str,
        sink: EventSink,
        blob_reader: BlobReader | None = None,
        may_serve: MayServe | None = None,
    ) -> SimNetwork:
        """Bring a crashed node back as a new incarnation (no subscriptions, fresh sink);
        its old links come back up after their latency. Returns its new SimNetwork.
        `blob_reader=None` keeps the previous reader (the store survived on disk), and
        `may_serve=None` the previous serving rule."""
        node = self.node(peer_id)
        if node.alive:
            raise LocalProtocolError(f"restart: {peer_id} is running; crash it first")
        net = self._incarnate(node, sink, blob_reader, may_serve)
        self._planner = None
        for j in sorted(self._adj[node.idx]):
            self._push(self._now + self._edge_lat(node.idx, j), self._sync_link, node.idx, j)
        return net

    def partition(self, groups: Sequence[Sequence[str]]) -> None:
        """Split the network: peers in different groups cannot reach each other (gossip,
        sends, fetches). Peers named in no group form one more group together. Links across
        the cut are reported down (reason "partitioned") after detect_s."""
        labels = [0] * len(self._nodes)
        seen: set[str] = set()
        for g, members in enumerate(groups, start=1):
            for peer in members:
                if peer in seen:
                    raise LocalProtocolError(f"partition: {peer} is in two groups")
                seen.add(peer)
                labels[self._index_of(peer)] = g
        self._regroup(labels)

    def heal(self) -> None:
        """End every partition; links across old cuts come back after detect_s."""
        self._regroup([0] * len(self._nodes))

    def _regroup(self, labels: list[int]) -> None:
        old = [n.group for n in self._nodes]
        for n, g in zip(self._nodes, labels, strict=True):
            if n.group != g:
                n.group = g
                n.group_at = self._now
        self._planner = None
        for i in range(len(self._nodes)):
            for j in sorted(self._adj[i]):
                if i < j and (old[i] == old[j]) != (labels[i] == labels[j]):
                    self._push(self._now + self.detect_s, self._sync_link, i, j)

    def _cut_since(self, a: Node, b: Node) -> float | None:
        """None if a can reach b now, else since when it cannot."""
        if not b.alive:
            return b.dead_at
        if not a.alive:
            return a.dead_at
        if a.group != b.group:
            return max(a.group_at, b.group_at)
        return None

    def _planner_now(self) -> GossipPlanner:
        if self._planner is None:
            nodes = self._nodes
            if self._edge_arr is None:  # the overlay itself changed
                pairs = [(i, j) for i in range(len(nodes)) for j in self._adj[i] if i < j]
                self._edge_arr = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
            e = self._edge_arr
            alive = np.array([n.alive for n in nodes], dtype=bool)
            group = np.array([n.group for n in nodes], dtype=np.int64)
            a, b = e[:, 0], e[:, 1]
            usable = e[alive[a] & alive[b] & (group[a] == group[b])]
            lat = np.array([n.lat for n in nodes])
            inv = np.array([n.inv for n in nodes])
            self._planner = GossipPlanner(len(nodes), usable, lat, inv)
        return self._planner

    # --- timers and stats -----------------------------------------------------------------

    def call_at(
        self,
        when: float,
        callback: Callable[[], None],
        owner: str | None = None,
        *,
        seq: int | None = None,
    ) -> TimerHandle:
        """A driver timer. With `owner`, it is dropped if that node crashes (or restarts)
        before it fires, like a timer inside a process that died. `seq`: see EventLoop."""
        if owner is None:
            return super().call_at(when, callback, seq=seq)
        node = self.node(owner)
        return super().call_at(when, _owned(node, node.serial, callback), seq=seq)

    def stats(self, peer_id: str) -> NetStats:
        return self.node(peer_id).stats()

    def total_stats(self) -> NetStats:
        total = NetStats(extra={})
        for n in self._nodes:
            s = n.stats()
            total.bytes_sent += s.bytes_sent
            total.bytes_received += s.bytes_received
            total.messages_sent += s.messages_sent
            total.messages_received += s.messages_received
            for k, v in s.extra.items():
                total.extra[k] = total.extra.get(k, 0) + v
        return total
