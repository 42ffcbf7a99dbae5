"""Taskpack swarming: partial TaskpackHave announcements, their throttling, and a 16-node
simulated dissemination where the downloaders fetch from each other, not all from the
publisher."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from p2pfl.core.commands import AddProviders, FetchBlob, Publish
from p2pfl.core.messages import TaskpackHave
from p2pfl.core.node_core import NodeCore
from p2pfl.core.taskpacks import TaskpackBook
from p2pfl.driver import Driver
from p2pfl.errors import RemoteProtocolError
from p2pfl.identity import Identity
from p2pfl.net.sim import LinkModel, SimHub
from p2pfl.runtime import InProcessRunner
from p2pfl.sim.cluster_base import CAPABILITIES
from p2pfl.sim.io import sim_node
from p2pfl.taskpack.trust import TrustPolicy
from p2pfl.wire import decode, encode
from tests.core.simhelp import STATS

CAPS = CAPABILITIES  # what every simulated node reports


def _taskpack(tmp: Path, size: int) -> Path:
    root = tmp / "big-stats"
    shutil.copytree(STATS, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data.bin").write_bytes(random.Random(5).randbytes(size))
    return root


def _network(n: int, tmp: Path) -> tuple[SimHub, list[Driver]]:
    hub = SimHub(seed=2, link=LinkModel(latency_ms=20, bandwidth_mbps=100))
    ids = [Identity.from_seed(bytes([i + 40]) * 32) for i in range(n)]
    runner = InProcessRunner()
    drivers: list[Driver] = []
    for i, identity in enumerate(ids):
        core = NodeCore(
            identity,
            policy=TrustPolicy(frozenset({ids[0].peer_id}), False),
            capabilities=dict(CAPS),
            datasets={},
            caps_interval_s=None,
            rng=random.Random(i),
        )
        driver = sim_node(hub, core, runner, taskpack_root=tmp / f"tp{i}", datasets={})
        drivers.append(driver)
    hub.apply_topology("full")
    for d in drivers:
        d.start()
    hub.run(until=0.5)
    return hub, drivers


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory):
    """A 16-node run: one ~12 MB taskpack published at node 0, run until all verify."""
    tmp = tmp_path_factory.mktemp("swarm")
    hub, drivers = _network(16, tmp)
    info = drivers[0].publish_taskpack(_taskpack(tmp, 12_000_000))
    publisher = drivers[0].me
    up0 = hub.stats(publisher).bytes_sent
    haves: list[tuple[str, TaskpackHave]] = []
    for d in drivers[1:]:
        d.network.publish = _spy(d.network.publish, d.me, haves)  # type: ignore[method-assign]
    drivers[0].announce_taskpack(info["announce"])
    cid = info["cid"]
    state = hub.run(
        until=hub.now + 120, stop=lambda: all(d.core.book.verified(cid) for d in drivers)
    )
    return {
        "state": state,
        "drivers": drivers,
        "cid": cid,
        "size": info["announce"].ref.size,
        "n_chunks": info["announce"].ref.n_chunks,
        "publisher_up": hub.stats(publisher).bytes_sent - up0,
        "haves": haves,
        "hub": hub,
    }


def _spy(publish, me: str, haves: list):
    def wrapped(topic: str, data: bytes) -> None:
        msg = decode(data)
        if isinstance(msg, TaskpackHave):
            haves.append((me, msg))
        publish(topic, data)

    return wrapped


def test_sixteen_nodes_fetch_from_each_other(published) -> None:
    assert published["state"] == "stop"
    for d in published["drivers"]:
        assert d.store.has(published["cid"])
        assert (d.taskpack_dir(published["cid"]) / "manifest.yaml").is_file()
    # All 15 from the publisher would be 15x the archive; swarming keeps it near 1-2x.
    ratio = published["publisher_up"] / published["size"]
    assert ratio < 4, ratio
    # The downloaders served each other: most of them uploaded more than a chunk.
    hub = published["hub"]
    ups = [hub.stats(d.me).bytes_sent for d in published["drivers"][1:]]
    assert sum(1 for u in ups if u > published["size"] // published["n_chunks"]) >= 10


def test_partial_haves_are_few_and_grow(published) -> None:
    haves = published["haves"]
    n = published["n_chunks"]
    by_node: dict[str, list[TaskpackHave]] = {}
    for me, have in haves:
        by_node.setdefault(me, []).append(have)
    assert len(by_node) == 15
    for msgs in by_node.values():
        partial = [h for h in msgs if h.chunks]
        assert msgs[-1].chunks == b""  # the last one: the whole archive
        assert 1 <= len(partial) <= 11  # about every n/10 chunks, not one per chunk
        counts = [bin(int.from_bytes(h.chunks, "big")).count("1") for h in partial]
        assert counts == sorted(counts) and counts[-1] < n


# --- the book, without a network ---------------------------------------------------


def _book_with_fetch(tmp: Path) -> tuple[TaskpackBook, str, int]:
    hub, drivers = _network(2, tmp)
    info = drivers[0].publish_taskpack(_taskpack(tmp, 3_000_000))
    ann = info["announce"]
    me = Identity.from_seed(b"\x07" * 32).peer_id
    book = TaskpackBook(me, TrustPolicy(frozenset({ann.publisher}), False), dict(CAPS))
    out = book.on_announce(ann.publisher, ann)
    assert any(isinstance(c, FetchBlob) for c in out)
    return book, ann.ref.cid, ann.ref.n_chunks


def test_book_forwards_chunk_bitmaps_and_checks_them(tmp_path: Path) -> None:
    book, cid, n = _book_with_fetch(tmp_path)
    assert n == 3
    out = book.on_have("peerA", TaskpackHave(cid, b"\xa0"))
    assert out == [AddProviders(cid, ("peerA",), b"\xa0")]
    out = book.on_have("peerA", TaskpackHave(cid))  # now it holds everything
    assert out == [AddProviders(cid, ("peerA",))]
    assert book.on_have("peerA", TaskpackHave(cid)) == []  # known already
    with pytest.raises(RemoteProtocolError):
        book.on_have("peerB", TaskpackHave(cid, b"\xa0\x00"))  # wrong length
    with pytest.raises(RemoteProtocolError):
        book.on_have("peerB", TaskpackHave(cid, b"\x10"))  # bit past chunk 2
    assert decode(encode(TaskpackHave(cid, b"\xa0"))) == TaskpackHave(cid, b"\xa0")


def test_book_throttles_progress_announcements(tmp_path: Path) -> None:
    book, cid, n = _book_with_fetch(tmp_path)
    first = book.on_fetch_progress(cid, 1, b"\x80")
    assert first == [Publish("p2pfl/v1/taskpacks", TaskpackHave(cid, b"\x80"))]
    assert book.on_fetch_progress(cid, n, b"\xe0") == []  # complete: announced on ready
    entry = book.entries[cid]
    entry.have_announced = 0
    sent = [k for k in range(1, n) if book.on_fetch_progress(cid, k, b"\x80")]
    assert sent == [1, 2]  # step 1 for three chunks
