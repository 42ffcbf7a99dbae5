"""The network conformance suite: every Network implementation must pass these.

Each test takes ``net_harness`` (tests/net/conftest.py), parametrised over the network
kinds, so the simulated and the libp2p networks answer to the same assertions.
Timeouts are virtual seconds for the sim and real seconds for libp2p; they bound loops,
they are not performance limits.
"""

from __future__ import annotations

import pytest

from p2pfl.errors import LocalProtocolError
from p2pfl.net.base import (
    MAX_GOSSIP_BYTES,
    NOT_ALLOWED,
    FetchDone,
    FetchFailed,
    Message,
    NetEvent,
    Network,
    PeerConnected,
    PeerDisconnected,
)

TIMEOUT = 15.0


def _of(events: list[NetEvent], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def _connected_to(events: list[NetEvent]) -> set[str]:
    """Peers currently connected according to the event stream."""
    up: set[str] = set()
    for e in events:
        if isinstance(e, PeerConnected):
            up.add(e.peer)
        elif isinstance(e, PeerDisconnected):
            up.discard(e.peer)
    return up


async def _mesh(h, n: int, **kw) -> list[Network]:
    """Start n fully linked nodes and wait until each knows all the others."""
    nets = await h.start(n, **kw)
    ids = [net.peer_id for net in nets]

    def full() -> bool:
        return all(_connected_to(h.events[i]) >= set(ids) - {ids[i]} for i in range(n))

    await h.wait_for(full, TIMEOUT)
    return nets


async def test_full_mesh_every_node_learns_every_other(net_harness) -> None:
    nets = await _mesh(net_harness, 3)
    ids = [net.peer_id for net in nets]
    for i, net in enumerate(nets):
        assert {e.peer for e in _of(net_harness.events[i], PeerConnected)} == set(ids) - {ids[i]}
        assert {p.peer_id for p in net.connected_peers()} == set(ids) - {ids[i]}
        assert net.listen_addrs() and all(a.endswith("/p2p/" + ids[i]) for a in net.listen_addrs())


async def test_publish_reaches_every_subscriber_once_publisher_included(net_harness) -> None:
    h = net_harness
    nets = await _mesh(h, 3)
    for net in nets:
        net.subscribe("t")
    await h.settle(1.0)  # subscriptions spread (GossipSub meshes form)
    nets[0].publish("t", b"hello")

    def everyone() -> bool:
        return all(_of(h.events[i], Message) for i in range(3))

    await h.wait_for(everyone, TIMEOUT)
    await h.settle(0.5)  # a duplicate would show up now
    for i in range(3):
        msgs = _of(h.events[i], Message)
        assert msgs == [Message("t", nets[0].peer_id, b"hello")], (i, msgs)


async def test_publish_skips_unsubscribed_nodes(net_harness) -> None:
    h = net_harness
    nets = await _mesh(h, 3)
    nets[0].subscribe("t")
    nets[1].subscribe("t")
    await h.settle(1.0)
    nets[1].publish("t", b"x")
    await h.wait_for(lambda: bool(_of(h.events[0], Message)), TIMEOUT)
    await h.settle(0.5)
    assert not _of(h.events[2], Message)


async def test_direct_send_arrives_with_the_right_sender(net_harness) -> None:
    h = net_harness
    nets = await _mesh(h, 3)
    nets[2].send(nets[0].peer_id, b"direct")
    nets[1].send(nets[0].peer_id, b"other")
    await h.wait_for(lambda: len(_of(h.events[0], Message)) == 2, TIMEOUT)
    got = {(m.sender, m.data, m.topic) for m in _of(h.events[0], Message)}
    assert got == {(nets[2].peer_id, b"direct", None), (nets[1].peer_id, b"other", None)}
    assert not _of(h.events[1], Message) and not _of(h.events[2], Message)


async def test_fetch_ranges_short_read_and_unknown_cid(net_harness) -> None:
    h = net_harness
    blob = bytes(range(256)) * 40  # 10,240 bytes
    nets = await _mesh(h, 2, blobs=[{"cid-a": blob}, {}])
    server = nets[0].peer_id
    asks = [(0, 100), (1000, 4096), (10_000, 1000), (5, 1)]  # third one is short
    for k, (off, ln) in enumerate(asks):
        nets[1].fetch(server, "cid-a", off, ln, token=k)
    nets[1].fetch(server, "cid-missing", 0, 10, token="missing")

    def answered() -> bool:
        return len(_of(h.events[1], FetchDone) + _of(h.events[1], FetchFailed)) == len(asks) + 1

    await h.wait_for(answered, TIMEOUT)
    done = {e.token: e for e in _of(h.events[1], FetchDone)}
    assert sorted(done) == list(range(len(asks)))
    for k, (off, ln) in enumerate(asks):
        assert (done[k].peer, done[k].cid, done[k].offset) == (server, "cid-a", off)
        assert done[k].data == blob[off : off + ln]
    assert len(done[2].data) == len(blob) - 10_000
    (failed,) = _of(h.events[1], FetchFailed)
    assert (failed.token, failed.peer, failed.cid) == ("missing", server, "cid-missing")


async def test_fetch_refused_by_may_serve_fails_fast_with_not_allowed(net_harness) -> None:
    h = net_harness
    blob = b"secret update" * 100
    asked: list[tuple[str, str]] = []

    def only_node_2(peer: str, cid: str) -> bool:
        asked.append((peer, cid))
        return peer == ids[2]

    ids: list[str] = []
    nets = await _mesh(h, 3, blobs=[{"cid-u": blob}, {}, {}], may_serve=[only_node_2, None, None])
    ids += [net.peer_id for net in nets]
    server = ids[0]
    nets[1].fetch(server, "cid-u", 0, 100, token="refused")
    nets[2].fetch(server, "cid-u", 0, 100, token="allowed")

    def answered(i: int) -> bool:
        return bool(_of(h.events[i], FetchDone) + _of(h.events[i], FetchFailed))

    # Well inside the fetch timeouts: a refusal is an answer, not a hang.
    await h.wait_for(lambda: answered(1) and answered(2), 5.0)
    (failed,) = _of(h.events[1], FetchFailed)
    assert (failed.token, failed.peer, failed.cid) == ("refused", server, "cid-u")
    assert failed.reason.startswith(NOT_ALLOWED), failed.reason
    assert not _of(h.events[1], FetchDone)
    (done,) = _of(h.events[2], FetchDone)
    assert (done.token, done.data) == ("allowed", blob[:100])
    assert (ids[1], "cid-u") in asked and (ids[2], "cid-u") in asked


async def test_oversize_publish_raises(net_harness) -> None:
    nets = await net_harness.start(1)
    nets[0].publish("t", b"x" * MAX_GOSSIP_BYTES)  # the limit itself is fine
    with pytest.raises(LocalProtocolError):
        nets[0].publish("t", b"x" * (MAX_GOSSIP_BYTES + 1))


async def test_bad_fetch_range_raises(net_harness) -> None:
    nets = await net_harness.start(2)
    with pytest.raises(LocalProtocolError):
        nets[0].fetch(nets[1].peer_id, "cid", -1, 10, token=None)


async def test_stopped_node_is_reported_disconnected(net_harness) -> None:
    h = net_harness
    nets = await _mesh(h, 3)
    gone = nets[2].peer_id
    await h.stop_node(2)

    def noticed() -> bool:
        return all(gone not in _connected_to(h.events[i]) for i in (0, 1))

    await h.wait_for(noticed, TIMEOUT)
    for i in (0, 1):
        assert any(isinstance(e, PeerDisconnected) and e.peer == gone for e in h.events[i])
        assert gone not in {p.peer_id for p in nets[i].connected_peers()}


async def test_stats_count_bytes_both_ways(net_harness) -> None:
    h = net_harness
    nets = await _mesh(h, 2, blobs=[{}, {"c": b"z" * 5000}])
    before = [net.stats() for net in nets]
    nets[0].send(nets[1].peer_id, b"y" * 3000)
    await h.wait_for(lambda: bool(_of(h.events[1], Message)), TIMEOUT)
    nets[0].fetch(nets[1].peer_id, "c", 0, 5000, token=1)
    await h.wait_for(lambda: bool(_of(h.events[0], FetchDone)), TIMEOUT)
    a, b = (net.stats() for net in nets)
    assert a.bytes_sent - before[0].bytes_sent >= 3000
    assert b.bytes_received - before[1].bytes_received >= 3000
    assert b.bytes_sent - before[1].bytes_sent >= 5000
    assert a.bytes_received - before[0].bytes_received >= 5000
    assert a.messages_sent > before[0].messages_sent
    assert b.messages_received > before[1].messages_received
