"""Sim-only tests: topologies, determinism of whole runs, and the 1,000-node broadcast."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from collections import deque

import pytest

from p2pfl.errors import LocalProtocolError
from p2pfl.net.base import FetchFailed, Message, NetEvent
from p2pfl.net.sim import LinkModel, SimHub
from p2pfl.net.sim._topology import make_edges


def _degrees(n: int, edges: list[tuple[int, int]]) -> list[int]:
    deg = [0] * n
    for a, b in edges:
        deg[a] += 1
        deg[b] += 1
    return deg


def _connected(n: int, edges: list[tuple[int, int]]) -> bool:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen, todo = {0}, deque([0])
    while todo:
        for j in adj[todo.popleft()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == n


def _simple(edges: list[tuple[int, int]]) -> bool:
    return all(a < b for a, b in edges) and len(set(edges)) == len(edges)


@pytest.mark.parametrize("n,d", [(10, 3), (100, 6), (1000, 8)])
def test_random_regular_is_simple_and_regular(n: int, d: int) -> None:
    edges = make_edges("random-regular", n, random.Random(3), degree=d)
    assert _simple(edges)
    assert set(_degrees(n, edges)) == {d}
    assert edges == make_edges("random-regular", n, random.Random(3), degree=d)
    assert edges != make_edges("random-regular", n, random.Random(4), degree=d)


def test_fixed_topologies() -> None:
    rng = random.Random(0)
    assert make_edges("full", 4, rng) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert make_edges("line", 4, rng) == [(0, 1), (1, 2), (2, 3)]
    assert make_edges("ring", 5, rng) == [(0, 1), (0, 4), (1, 2), (2, 3), (3, 4)]
    assert make_edges("star", 4, rng) == [(0, 1), (0, 2), (0, 3)]
    assert set(_degrees(50, make_edges("ring", 50, rng))) == {2}


def test_small_world_keeps_edge_count_and_rewires_some() -> None:
    n, k = 200, 6
    lattice = make_edges("small-world", n, random.Random(1), degree=k, rewire=0.0)
    assert set(_degrees(n, lattice)) == {k}
    sw = make_edges("small-world", n, random.Random(1), degree=k, rewire=0.2)
    assert _simple(sw) and len(sw) == n * k // 2 and _connected(n, sw)
    changed = len(set(sw) - set(lattice))
    assert 0.1 * len(sw) < changed < 0.3 * len(sw)


def test_topology_arguments_are_checked() -> None:
    rng = random.Random(0)
    for kind, kw in [
        ("random-regular", {"degree": 3, "n": 5}),  # n*d odd
        ("random-regular", {"degree": 5, "n": 5}),  # d >= n
        ("small-world", {"degree": 4, "n": 10, "rewire": 1.5}),
        ("hypercube", {"n": 8}),
    ]:
        n = kw.pop("n")
        with pytest.raises(LocalProtocolError):
            make_edges(kind, n, rng, **kw)


def test_hub_topology_links_match_the_graph() -> None:
    hub = SimHub(seed=5)
    for i in range(20):
        hub.add_node(f"n{i:02d}", lambda ev: None)
    hub.apply_topology("random-regular", degree=4)
    hub.run()
    for peer in hub.peers:
        assert len(hub.neighbours(peer)) == 4
        assert len(hub.network(peer).connected_peers()) == 4
    with pytest.raises(LocalProtocolError):
        hub.connect("n00", "n00")


# --- determinism -----------------------------------------------------------------------------


def _busy_run(seed: int) -> list[tuple[float, str, str]]:
    """A random scenario driven only by hub.rng: gossip, sends, fetches, loss, a crash, a
    restart, a partition and a heal. Returns every event every node saw, in order."""
    n = 30
    hub = SimHub(
        seed=seed, link=LinkModel(latency_ms=15, bandwidth_mbps=50, loss=0.1), detect_s=0.7
    )
    log: list[tuple[float, str, str]] = []
    blob = bytes(range(256)) * 400
    peers = [f"node{i:02d}" for i in range(n)]

    def sink_for(peer: str):
        def sink(ev: NetEvent) -> None:
            log.append((hub.now, peer, repr(ev)))
            # Reentrant reaction: some deliveries trigger a reply or a fetch.
            net = hub.network(peer)
            if isinstance(ev, Message) and ev.topic == "t" and hub.rng.random() < 0.1:
                net.send(ev.sender, b"ack:" + ev.data[:8])
            elif isinstance(ev, FetchFailed) and ev.reason == "lost":
                net.fetch(ev.peer, ev.cid, ev.offset, 1000, token=ev.token)

        return sink

    def reader(cid: str, offset: int, length: int) -> bytes | None:
        return blob[offset : offset + length] if cid == "b" else None

    for p in peers:
        hub.add_node(p, sink_for(p), reader)
    hub.apply_topology("small-world", degree=4, rewire=0.2)
    for p in peers:
        hub.network(p).subscribe("t")
    rng = hub.rng

    def action() -> None:
        live = [p for p in peers if hub.is_alive(p)]
        me = live[rng.randrange(len(live))]
        net = hub.network(me)
        kind = rng.random()
        if kind < 0.4:
            net.publish("t", rng.randbytes(rng.randrange(10, 2000)))
        elif kind < 0.7:
            net.send(peers[rng.randrange(n)], rng.randbytes(50))
        else:
            net.fetch(
                peers[rng.randrange(n)],
                rng.choice(["b", "x"]),
                rng.randrange(0, 100_000),
                4000,
                token=rng.random(),
            )

    for _ in range(400):
        hub.call_at(rng.uniform(0, 10), action)
    hub.call_at(2.0, lambda: hub.crash("node07"))
    hub.call_at(3.0, lambda: hub.partition([peers[:12], peers[12:]]))
    hub.call_at(4.0, lambda: hub.restart("node07", sink_for("node07"), reader))
    hub.call_at(6.0, hub.heal)
    assert hub.run() == "idle"
    stats = hub.total_stats()
    log.append((hub.now, "total", repr(stats)))
    return log


def test_same_seed_same_run_bit_for_bit() -> None:
    first, second = _busy_run(11), _busy_run(11)
    assert len(first) > 3000
    assert first == second
    kinds = {line.split("(")[0] for _, _, line in first}
    assert {"Message", "FetchDone", "FetchFailed", "PeerConnected", "PeerDisconnected"} <= kinds
    assert _busy_run(12) != first


def test_same_seed_same_run_across_processes() -> None:
    """String hashing is salted per process: a run must not depend on it."""
    here = os.path.dirname(__file__)
    code = (
        "import hashlib, test_sim_scale as t;"
        "print(hashlib.sha256(repr(t._busy_run(11)).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hashlib.sha256(repr(_busy_run(11)).encode()).hexdigest()


# --- scale ----------------------------------------------------------------------------------


def test_thousand_node_broadcast() -> None:
    """1,000 nodes, random-regular(8), each publishes one 200-byte message: every node
    gets all 1,000. The wall time is printed (run with -s), not asserted."""
    n = 1000
    started = time.perf_counter()
    hub = SimHub(seed=1, link=LinkModel(latency_ms=20, bandwidth_mbps=100))
    got = [0] * n
    nets = []
    for i in range(n):

        def sink(ev: NetEvent, i: int = i) -> None:
            if isinstance(ev, Message):
                got[i] += 1

        nets.append(hub.add_node(f"peer{i:04d}", sink))
    hub.apply_topology("random-regular", degree=8)
    hub.run()
    for net in nets:
        net.subscribe("t")
    payload = b"p" * 200
    for net in nets:
        net.publish("t", payload)
    assert hub.run() == "idle"
    elapsed = time.perf_counter() - started
    assert got == [n] * n
    total = hub.total_stats()
    assert total.bytes_received == total.bytes_sent == n * (n - 1) * 200
    # A 1,000-node random 8-regular graph has diameter 4 or 5: the last copy lands by then.
    assert hub.now < 0.020 * 8
    print(
        f"\n1000-node broadcast: {elapsed:.2f} s wall, {hub.events_processed} events, {hub.now * 1000:.1f} ms virtual"
    )
