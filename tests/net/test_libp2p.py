"""Libp2pNetwork on real hosts (127.0.0.1, one trio run per test)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from p2pfl.identity import Identity
from p2pfl.net.base import BlobReader, Message, NetEvent, PeerConnected, PeerDisconnected
from p2pfl.net.libp2p import Libp2pConfig, Libp2pNetwork

WAIT_S = 20.0


class Recorder:
    """An event sink that keeps every event and lets a test wait for a condition."""

    def __init__(self) -> None:
        self.events: list[NetEvent] = []
        self._changed = trio.Event()

    def __call__(self, event: NetEvent) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(
        self, pred: Callable[[list[NetEvent]], bool], timeout: float = WAIT_S
    ) -> None:
        with trio.fail_after(timeout):
            while True:
                changed = self._changed
                if pred(self.events):
                    return
                await changed.wait()

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def connected(self) -> set[str]:
        """Peers whose latest connection event is PeerConnected."""
        state: dict[str, bool] = {}
        for e in self.events:
            if isinstance(e, PeerConnected):
                state[e.peer] = True
            elif isinstance(e, PeerDisconnected):
                state[e.peer] = False
        return {p for p, up in state.items() if up}


@dataclass
class Node:
    net: Libp2pNetwork
    rec: Recorder
    scope: trio.CancelScope
    identity: Identity
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.net.peer_id

    @property
    def addr(self) -> str:
        return self.net.listen_addrs()[0]

    def stop(self) -> None:
        self.scope.cancel()


def fast_config(**kw: object) -> Libp2pConfig:
    base: dict[str, object] = dict(
        listen=["/ip4/127.0.0.1/tcp/0"],
        heartbeat_s=0.2,
        liveness_interval_s=0.5,
        liveness_timeout_s=2.0,
        dial_backoff_min_s=0.2,
        dial_backoff_max_s=2.0,
    )
    base.update(kw)
    return Libp2pConfig(**base)  # type: ignore[arg-type]


async def start_node(
    nursery: trio.Nursery,
    identity: Identity | None = None,
    *,
    reader: BlobReader | None = None,
    **config: object,
) -> Node:
    identity = identity or Identity.generate()
    rec = Recorder()
    blobs: dict[str, bytes] = {}

    def dict_reader(cid: str, offset: int, length: int) -> bytes | None:
        blob = blobs.get(cid)
        return None if blob is None else blob[offset : offset + length]

    net = Libp2pNetwork(identity, fast_config(**config), rec, reader or dict_reader)
    scope = trio.CancelScope()

    async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await net.run(task_status=task_status)

    await nursery.start(runner)
    return Node(net, rec, scope, identity, blobs)


# --- tests ------------------------------------------------------------------------------


async def test_three_nodes_discover_each_other_and_gossip(nursery: trio.Nursery) -> None:
    a = await start_node(nursery)
    b = await start_node(nursery, bootstrap=[a.addr])
    c = await start_node(nursery, bootstrap=[a.addr])
    nodes = [a, b, c]
    for n in nodes:
        others = {m.id for m in nodes} - {n.id}
        await n.rec.wait_for(lambda ev, n=n, others=others: others <= n.rec.connected())
        assert {p.peer_id for p in n.net.connected_peers()} == others
    # b and c learned each other's listen address through peer exchange with a.
    assert any(addr.endswith(f"/p2p/{c.id}") for p in b.net.connected_peers() for addr in p.addrs)

    topic = "p2pfl/test/v1"
    for n in nodes:
        n.net.subscribe(topic)
    # Wait until the mesh carries a probe from every node to every node.
    for n in nodes:
        n.net.publish(topic, b"probe-" + n.id.encode())
    for n in nodes:
        await n.rec.wait_for(
            lambda ev: (
                {e.data for e in ev if isinstance(e, Message) and e.topic == topic}
                >= {b"probe-" + m.id.encode() for m in nodes}
            )
        )
    burst = [f"m{i}".encode() * 10 for i in range(200)]
    for data in burst:
        b.net.publish(topic, data)
    for n in nodes:
        await n.rec.wait_for(
            lambda ev: sum(1 for e in ev if isinstance(e, Message) and e.data in set(burst)) >= 200
        )
        got = [e for e in n.rec.of(Message) if e.data in set(burst)]
        assert [e.data for e in got] == burst  # each exactly once, in order
        assert all(e.sender == b.id and e.topic == topic for e in got)
    for n in nodes:
        n.stop()
