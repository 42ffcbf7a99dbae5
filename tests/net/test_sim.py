"""Sim-only tests: the event loop, timing and bandwidth math, uplink sharing, loss."""

from __future__ import annotations

import pytest

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.net.base import FetchDone, FetchFailed, Message, NetEvent, PeerConnected
from p2pfl.net.sim import FETCH_REQUEST_BYTES, FETCH_RESPONSE_BYTES, LinkModel, SimHub


class World:
    """A hub with n nodes named p0..p{n-1}; log[i] records (virtual time, event)."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 1,
        blobs: dict[int, dict[str, bytes]] | None = None,
        **link: float,
    ) -> None:
        self.hub = SimHub(seed=seed, link=LinkModel(**link), detect_s=1.0)
        self.log: list[list[tuple[float, NetEvent]]] = [[] for _ in range(n)]
        self.nets = []
        for i in range(n):
            store = (blobs or {}).get(i, {})
            self.nets.append(self.hub.add_node(f"p{i}", self._sink(i), _reader(store)))

    def _sink(self, i: int):
        return lambda ev: self.log[i].append((self.hub.now, ev))

    def of(self, i: int, kind: type) -> list[tuple[float, NetEvent]]:
        return [(t, e) for t, e in self.log[i] if isinstance(e, kind)]


def _reader(store: dict[str, bytes]):
    def read(cid: str, offset: int, length: int) -> bytes | None:
        return store[cid][offset : offset + length] if cid in store else None

    return read


MBPS = 100.0
SPB = 8 / (MBPS * 1e6)  # seconds per byte at 100 Mbps


# --- the event loop -------------------------------------------------------------------------


def test_timers_run_in_time_then_schedule_order() -> None:
    hub = SimHub()
    seen: list[tuple[float, str]] = []
    hub.call_at(2.0, lambda: seen.append((hub.now, "b")))
    hub.call_at(1.0, lambda: seen.append((hub.now, "a")))
    hub.call_at(2.0, lambda: seen.append((hub.now, "c")))
    gone = hub.call_at(1.5, lambda: seen.append((hub.now, "cancelled")))
    hub.cancel(gone)
    assert hub.run() == "idle"
    assert seen == [(1.0, "a"), (2.0, "b"), (2.0, "c")]


def test_call_soon_runs_after_what_is_due_now() -> None:
    hub = SimHub()
    order: list[str] = []

    def first() -> None:
        order.append("first")
        hub.call_soon(lambda: order.append("soon"))

    hub.call_at(1.0, first)
    hub.call_at(1.0, lambda: order.append("second"))
    hub.call_at(0.5, lambda: hub.call_at(0.1, lambda: order.append("past->now")))
    hub.run()
    assert order == ["past->now", "first", "second", "soon"]


def test_run_return_values() -> None:
    hub = SimHub()
    ticks: list[float] = []
    for t in (1.0, 2.0, 3.0, 4.0):
        hub.call_at(t, lambda: ticks.append(hub.now))
    assert hub.run(until=1.5) == "until" and hub.now == 1.5 and ticks == [1.0]
    assert hub.run(max_events=1) == "max_events" and ticks == [1.0, 2.0]
    assert hub.run(stop=lambda: len(ticks) == 3) == "stop" and hub.now == 3.0
    assert hub.run(stop=lambda: len(ticks) == 3) == "stop" and hub.now == 3.0  # already true
    assert hub.run(until=10.0) == "idle" and hub.now == 10.0 and ticks == [1.0, 2.0, 3.0, 4.0]
    assert hub.run() == "idle"


def test_sink_bug_propagates_but_remote_error_is_swallowed() -> None:
    hub = SimHub(link=LinkModel(latency_ms=1))
    got: list[NetEvent] = []

    def bad(ev: NetEvent) -> None:
        if isinstance(ev, Message):
            raise RemoteProtocolError("peer sent junk")
        got.append(ev)

    def buggy(ev: NetEvent) -> None:
        raise ZeroDivisionError

    a = hub.add_node("a", bad)
    hub.add_node("b", lambda ev: None)
    hub.connect("a", "b")
    hub.run()
    hub.network("b").send("a", b"junk")
    hub.run()  # swallowed, logged
    assert [type(e) for e in got] == [PeerConnected]
    hub.add_node("c", buggy)
    hub.connect("a", "c")
    with pytest.raises(ZeroDivisionError):
        hub.run()
    assert a.alive


def test_sink_may_call_back_into_the_network() -> None:
    w = World(2, latency_ms=10)
    w.hub.connect("p0", "p1")
    echo = w.nets[1]

    def bounce(ev: NetEvent) -> None:
        w.log[1].append((w.hub.now, ev))
        if isinstance(ev, Message) and ev.data == b"ping":
            echo.send(ev.sender, b"pong")

    w.hub.node("p1").sink = bounce
    w.hub.run()
    w.nets[0].send("p1", b"ping")
    w.hub.run()
    assert [e.data for _, e in w.of(0, Message)] == [b"pong"]


# --- timing math ----------------------------------------------------------------------------


def test_link_up_after_latency_and_send_takes_latency_plus_transmission() -> None:
    w = World(2, latency_ms=20, bandwidth_mbps=MBPS)
    w.hub.connect("p0", "p1")
    w.hub.run()
    assert [(t, e.peer) for t, e in w.of(0, PeerConnected)] == [(0.02, "p1")]
    assert [(t, e.peer) for t, e in w.of(1, PeerConnected)] == [(0.02, "p0")]
    t0 = w.hub.now
    w.nets[0].send("p1", b"x" * 12_500)  # 1 ms at 100 Mbps
    w.hub.run()
    ((t, msg),) = w.of(1, Message)
    assert msg == Message(None, "p0", b"x" * 12_500)
    assert t - t0 == pytest.approx(0.020 + 0.001, abs=1e-12)


def test_gossip_arrives_after_hops_times_latency_plus_transmission() -> None:
    w = World(4, latency_ms=20, bandwidth_mbps=MBPS)
    w.hub.apply_topology("line")
    w.hub.run()
    for net in w.nets:
        net.subscribe("t")
    t0 = w.hub.now
    w.nets[0].publish("t", b"m" * 1000)
    w.hub.run()
    for hops in range(4):
        ((t, msg),) = w.of(hops, Message)
        assert msg == Message("t", "p0", b"m" * 1000)
        assert t - t0 == pytest.approx(hops * (0.020 + 1000 * SPB), abs=1e-12)
    # Byte accounting along the line: each relay receives once and forwards once.
    stats = [w.hub.stats(f"p{i}") for i in range(4)]
    assert [s.bytes_received for s in stats] == [0, 1000, 1000, 1000]
    assert [s.bytes_sent for s in stats] == [1000, 1000, 1000, 0]


def test_publisher_sends_one_copy_per_tree_child() -> None:
    w = World(6, latency_ms=5)
    w.hub.apply_topology("star")
    w.hub.run()
    for net in w.nets:
        net.subscribe("t")
    w.nets[0].publish("t", b"q" * 200)
    w.hub.run()
    assert w.hub.stats("p0").bytes_sent == 5 * 200
    assert w.hub.stats("p0").messages_sent == 5
    assert all(len(w.of(i, Message)) == 1 for i in range(6))
    assert w.hub.total_stats().bytes_received == 5 * 200


def test_fetch_timing_and_bytes() -> None:
    blob = bytes(1_000_000)
    w = World(2, latency_ms=10, bandwidth_mbps=MBPS, blobs={0: {"c": blob}})
    t0 = w.hub.now
    w.nets[1].fetch("p0", "c", 0, 250_000, token="t")
    w.hub.run()
    ((t, done),) = w.of(1, FetchDone)
    assert done == FetchDone("t", "p0", "c", 0, blob[:250_000])
    req = FETCH_REQUEST_BYTES + 1
    resp = FETCH_RESPONSE_BYTES + 250_000
    assert t - t0 == pytest.approx(0.010 + req * SPB + 0.010 + resp * SPB, abs=1e-12)
    server, client = w.hub.stats("p0"), w.hub.stats("p1")
    assert (server.bytes_sent, server.bytes_received) == (resp, req)
    assert (client.bytes_sent, client.bytes_received) == (req, resp)
    assert client.extra["fetch_bytes_received"] == resp


def _fetch_all(n_clients: int, size: int) -> float:
    """Time for n clients to each fetch `size` bytes from one server at once."""
    w = World(n_clients + 1, latency_ms=1, bandwidth_mbps=MBPS, blobs={0: {"c": bytes(size)}})
    for i in range(1, n_clients + 1):
        w.nets[i].fetch("p0", "c", 0, size, token=i)
    w.hub.run()
    ends = [w.of(i, FetchDone)[0][0] for i in range(1, n_clients + 1)]
    assert len(ends) == n_clients
    return max(ends)


def test_concurrent_fetchers_share_the_server_uplink() -> None:
    size = 1_000_000  # 80 ms at 100 Mbps; latency 1 ms
    one = _fetch_all(1, size)
    ten = _fetch_all(10, size)
    assert one == pytest.approx(0.002 + (size + 100) * SPB, rel=1e-3)
    assert 9.5 < ten / one < 10.5


def test_one_client_fetching_from_many_shares_its_downlink() -> None:
    size = 500_000
    w = World(5, latency_ms=1, blobs={i: {"c": bytes(size)} for i in range(1, 5)})
    for i in range(1, 5):
        w.nets[0].fetch(f"p{i}", "c", 0, size, token=i)
    w.hub.run()
    ends = sorted(t for t, _ in w.of(0, FetchDone))
    assert len(ends) == 4
    assert ends[-1] == pytest.approx(0.002 + 4 * (size + FETCH_RESPONSE_BYTES) * SPB, rel=1e-2)


def test_per_node_link_override_slows_that_node() -> None:
    w = World(3, latency_ms=10, bandwidth_mbps=MBPS, blobs={0: {"c": bytes(100_000)}})
    w.hub.set_link("p2", LinkModel(latency_ms=50, bandwidth_mbps=10))
    w.nets[1].fetch("p0", "c", 0, 100_000, token=1)
    w.nets[2].fetch("p0", "c", 0, 100_000, token=2)
    w.hub.run()
    (t1, _), (t2, _) = w.of(1, FetchDone)[0], w.of(2, FetchDone)[0]
    assert t1 == pytest.approx(0.020 + (100_000 + 100) * SPB, rel=1e-2)
    # 30 ms mean latency each way; 10 Mbps downlink at p2 (after p1's response is out).
    assert t2 > 0.060 + 100_000 * 8 / 10e6


def test_fetch_of_unknown_cid_and_bad_arguments() -> None:
    w = World(2, blobs={0: {"c": b"abc"}})
    w.nets[1].fetch("p0", "nope", 0, 10, token="x")
    w.nets[1].fetch("nobody", "c", 0, 10, token="y")
    w.hub.run()
    failed = {e.token: e.reason for _, e in w.of(1, FetchFailed)}
    assert failed == {"x": "not found", "y": "unreachable"}
    with pytest.raises(LocalProtocolError):
        w.nets[1].fetch("p0", "c", 0, 0, token=None)
    with pytest.raises(LocalProtocolError):
        w.nets[1].send("p0", bytes(512 * 1024 + 1))


# --- loss -------------------------------------------------------------------------------------


def test_loss_drops_sends_and_fetches_but_not_gossip() -> None:
    w = World(2, seed=7, latency_ms=1, loss=0.3, blobs={1: {"c": b"abc"}})
    w.hub.connect("p0", "p1")
    w.hub.run()
    for k in range(1000):
        w.nets[0].send("p1", k.to_bytes(2, "big"))
    for k in range(200):
        w.nets[0].fetch("p1", "c", 0, 3, token=k)
    for net in w.nets:
        net.subscribe("t")
    for _ in range(100):
        w.nets[0].publish("t", b"g")
    w.hub.run()
    direct = [e for _, e in w.of(1, Message) if e.topic is None]
    # 30% loss: binomial sd about 14.5 of 1000
    assert 630 < len(direct) < 770
    assert len({e.data for e in direct}) == len(direct)  # no duplicates
    lost = [e for _, e in w.of(0, FetchFailed)]
    assert all(e.reason == "lost" for e in lost) and 30 < len(lost) < 90
    assert len(w.of(0, FetchDone)) + len(lost) == 200
    assert len([e for _, e in w.of(1, Message) if e.topic == "t"]) == 100
    assert w.hub.stats("p0").extra["dropped"] == 1000 - len(direct) + len(lost)


def test_link_model_validation() -> None:
    for bad in ({"loss": 1.0}, {"bandwidth_mbps": 0}, {"latency_ms": -1}):
        with pytest.raises(LocalProtocolError):
            LinkModel(**bad)
