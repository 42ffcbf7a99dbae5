"""Sim-only tests: crashes, restarts, partitions and heals, and what drivers see of them."""

from __future__ import annotations

import pytest
from test_sim import World

from p2pfl.errors import LocalProtocolError
from p2pfl.net.base import FetchDone, FetchFailed, Message, PeerConnected, PeerDisconnected

DETECT = 1.0


def _linked(n: int, **kw) -> World:
    w = World(n, latency_ms=10, **kw)
    w.hub.apply_topology("full")
    w.hub.run()
    for net in w.nets:
        net.subscribe("t")
    return w


def _downs(w: World, i: int) -> list[tuple[float, str, str]]:
    return [(t, e.peer, e.reason) for t, e in w.of(i, PeerDisconnected)]


def test_crash_is_detected_by_neighbours_after_detect_s() -> None:
    w = _linked(3)
    t0 = w.hub.now
    w.hub.crash("p2")
    w.nets[0].publish("t", b"after")
    w.nets[0].send("p2", b"lost")  # never raises
    w.hub.run()
    for i in (0, 1):
        assert _downs(w, i) == [(t0 + DETECT, "p2", "crashed")]
        assert "p2" not in {p.peer_id for p in w.nets[i].connected_peers()}
    assert not w.of(2, Message)  # a crashed node gets nothing more
    assert [e.data for _, e in w.of(1, Message)] == [b"after"]
    assert not w.nets[2].alive and w.nets[2].connected_peers() == []
    w.nets[2].publish("t", b"ghost")  # an inert network ignores calls
    w.hub.run()
    assert all(e.data != b"ghost" for i in (0, 1) for _, e in w.of(i, Message))
    with pytest.raises(LocalProtocolError):
        w.hub.crash("p2")


def test_fetch_from_a_crashed_node_fails_when_detected_then_at_once() -> None:
    w = _linked(2, blobs={1: {"c": b"data"}})
    t0 = w.hub.now
    w.hub.crash("p1")
    w.nets[0].fetch("p1", "c", 0, 4, token=1)
    w.hub.run(until=t0 + 0.5)
    assert not w.of(0, FetchFailed)
    w.hub.run()
    assert [(t, e.token, e.reason) for t, e in w.of(0, FetchFailed)] == [
        (t0 + DETECT, 1, "unreachable")
    ]
    t1 = w.hub.now
    w.nets[0].fetch("p1", "c", 0, 4, token=2)  # already known dead: fails at once
    w.hub.run()
    assert w.of(0, FetchFailed)[-1][0] == t1


def test_server_crash_mid_response_fails_the_fetch() -> None:
    w = _linked(2, blobs={1: {"c": bytes(2_000_000)}})  # 160 ms on the wire at 100 Mbps
    t0 = w.hub.now
    w.nets[0].fetch("p1", "c", 0, 2_000_000, token=1)
    w.hub.call_at(t0 + 0.05, lambda: w.hub.crash("p1"))
    w.hub.run()
    assert not w.of(0, FetchDone)
    ((t, failed),) = w.of(0, FetchFailed)
    assert (failed.reason, t) == ("unreachable", t0 + 0.05 + DETECT)


def test_restart_reconnects_old_links_as_a_new_incarnation() -> None:
    w = _linked(3)
    old = w.nets[2]
    w.hub.crash("p2")
    w.hub.run()
    t1 = w.hub.now
    fresh: list = []
    new = w.hub.restart("p2", lambda ev: fresh.append((w.hub.now, ev)))
    assert new is not old and new.alive and not old.alive
    w.hub.run()
    assert sorted((t, e.peer) for t, e in fresh if isinstance(e, PeerConnected)) == [
        (t1 + 0.01, "p0"),
        (t1 + 0.01, "p1"),
    ]
    for i in (0, 1):
        assert w.of(i, PeerConnected)[-1] == (t1 + 0.01, PeerConnected("p2", ("/sim/2/p2p/p2",)))
    # Subscriptions do not survive a restart.
    w.nets[0].publish("t", b"one")
    w.hub.run()
    assert not [e for _, e in fresh if isinstance(e, Message)]
    new.subscribe("t")
    w.nets[0].publish("t", b"two")
    w.hub.run()
    assert [e.data for _, e in fresh if isinstance(e, Message)] == [b"two"]
    with pytest.raises(LocalProtocolError):
        w.hub.restart("p2", lambda ev: None)


def test_quick_restart_shows_neighbours_a_disconnect_then_a_connect() -> None:
    w = _linked(2)
    t0 = w.hub.now
    w.hub.crash("p1")
    w.hub.call_at(t0 + 0.3, lambda: w.hub.restart("p1", lambda ev: None))
    w.hub.run()
    tail = [(t, type(e).__name__) for t, e in w.log[0]][-2:]
    assert tail == [(t0 + 0.31, "PeerDisconnected"), (t0 + 0.31, "PeerConnected")]
    assert [p.peer_id for p in w.nets[0].connected_peers()] == ["p1"]


def test_owned_timers_die_with_their_node() -> None:
    w = _linked(2)
    fired: list[str] = []
    w.hub.call_at(5.0, lambda: fired.append("hub"), owner="p1")
    w.nets[1].call_at(5.0, lambda: fired.append("net"))
    w.nets[0].call_at(5.0, lambda: fired.append("survivor"))
    w.hub.call_at(1.0, lambda: w.hub.crash("p1"))
    w.hub.call_at(2.0, lambda: w.hub.restart("p1", lambda ev: None))
    w.hub.run()
    assert fired == ["survivor"]


def test_partition_cuts_gossip_sends_and_fetches_until_heal() -> None:
    w = _linked(4, blobs={2: {"c": b"xyz"}})
    t0 = w.hub.now
    w.hub.partition([["p0", "p1"], ["p2", "p3"]])
    w.hub.run()
    assert _downs(w, 0) == [(t0 + DETECT, "p2", "partitioned"), (t0 + DETECT, "p3", "partitioned")]
    assert _downs(w, 3) == [(t0 + DETECT, "p0", "partitioned"), (t0 + DETECT, "p1", "partitioned")]
    assert _downs(w, 1)[0][1:] == ("p2", "partitioned") and not _downs(w, 1)[2:]

    w.nets[0].publish("t", b"side-a")
    w.nets[0].send("p3", b"cut")
    w.nets[0].fetch("p2", "c", 0, 3, token="f")
    w.hub.run()
    got = {i: [e.data for _, e in w.of(i, Message)] for i in range(4)}
    assert got == {0: [b"side-a"], 1: [b"side-a"], 2: [], 3: []}
    assert [(e.token, e.reason) for _, e in w.of(0, FetchFailed)] == [("f", "unreachable")]

    t1 = w.hub.now
    w.hub.heal()
    w.hub.run()
    ups = sorted((t, e.peer) for t, e in w.of(0, PeerConnected) if t > t0)
    assert ups == [(t1 + DETECT, "p2"), (t1 + DETECT, "p3")]
    w.nets[3].publish("t", b"healed")
    w.nets[0].fetch("p2", "c", 0, 3, token="g")
    w.hub.run()
    assert all(w.of(i, Message)[-1][1].data == b"healed" for i in range(4))
    assert [e.data for _, e in w.of(0, FetchDone)] == [b"xyz"]


def test_partition_healed_before_detection_produces_no_events() -> None:
    w = _linked(3)
    before = [len(log) for log in w.log]
    t0 = w.hub.now
    w.hub.partition([["p0"]])  # p0 alone; unnamed peers form the other group
    w.hub.call_at(t0 + 0.5, w.hub.heal)
    w.hub.run()
    assert [len(log) for log in w.log] == before


def test_gossip_in_flight_does_not_cross_a_new_cut() -> None:
    w = World(3, latency_ms=100)
    w.hub.apply_topology("line")
    w.hub.run()
    for net in w.nets:
        net.subscribe("t")
    w.nets[0].publish("t", b"m")
    w.hub.run(until=w.hub.now + 0.15)  # p1 has it, p2 not yet
    w.hub.partition([["p0", "p1"], ["p2"]])
    w.hub.run()
    assert [len(w.of(i, Message)) for i in range(3)] == [1, 1, 0]


def test_partition_rejects_a_peer_in_two_groups() -> None:
    w = World(2)
    with pytest.raises(LocalProtocolError):
        w.hub.partition([["p0"], ["p0", "p1"]])
    with pytest.raises(LocalProtocolError):
        w.hub.partition([["nobody"]])
