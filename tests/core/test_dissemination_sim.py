"""A taskpack published at one node of ten reaches every node that trusts the publisher,
and no other: real node code (core + driver) over the simulated network."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from p2pfl.core.node_core import DatasetInfo, NodeCore
from p2pfl.identity import Identity
from p2pfl.net.sim import LinkModel, SimHub
from p2pfl.runtime import InProcessRunner
from p2pfl.sim.io import sim_node
from p2pfl.taskpack.trust import TrustPolicy
from tests.core.simhelp import STATS


def _network(n: int, tmp: Path, trusting: set[int], topology: str = "random-regular"):
    hub = SimHub(seed=3, link=LinkModel(latency_ms=10, bandwidth_mbps=50))
    identities = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(n)]
    publisher = identities[0].peer_id
    runner = InProcessRunner()
    drivers = []
    for i, identity in enumerate(identities):
        policy = TrustPolicy(
            frozenset({publisher}) if i in trusting or i == 0 else frozenset(), False
        )
        core = NodeCore(
            identity,
            policy=policy,
            capabilities={"cpus": 2},
            datasets={"table": DatasetInfo("table", 100, [])},
            caps_interval_s=None,
            rng=random.Random(i),
        )
        driver = sim_node(hub, core, runner, taskpack_root=tmp / "tp", datasets={})
        drivers.append(driver)
    hub.apply_topology(topology, degree=3)
    for d in drivers:
        d.start()
    hub.run(until=1.0)
    return hub, drivers


def _big_taskpack(tmp: Path, size: int) -> Path:
    root = tmp / "big-stats"
    shutil.copytree(STATS, root)
    (root / "data.bin").write_bytes(random.Random(7).randbytes(size))
    return root


def test_taskpack_reaches_exactly_the_nodes_that_trust_the_publisher(tmp_path):
    trusting = {1, 2, 3, 5, 8}
    hub, drivers = _network(10, tmp_path, trusting)
    info = drivers[0].publish_taskpack(_big_taskpack(tmp_path, 3 * 1024 * 1024))
    drivers[0].announce_taskpack(info["announce"])
    cid = info["cid"]

    def settled() -> bool:
        return all(
            (e := d.core.book.entries.get(cid)) is not None and e.status in ("verified", "rejected")
            for d in drivers
        )

    assert hub.run(until=hub.now + 120, stop=settled) == "stop"
    for i, d in enumerate(drivers):
        entry = d.core.book.entries[cid]
        if i == 0 or i in trusting:
            assert entry.status == "verified", (i, entry.summary())
            assert d.store.has(cid)
            assert (d.taskpack_dir(cid) / "manifest.yaml").is_file()
        else:
            assert entry.status == "rejected" and entry.reason == "untrusted-publisher", (
                i,
                entry.summary(),
            )
            assert not d.store.has(cid)  # never fetched: nothing of it is here


def test_tampered_announcement_is_refused_with_the_reason(tmp_path):
    hub, drivers = _network(3, tmp_path, {1, 2}, topology="full")
    info = drivers[0].publish_taskpack(STATS)
    ann = info["announce"]
    from dataclasses import replace

    forged = replace(ann, manifest=ann.manifest.replace(b"federated-stats", b"federated-stutz"))
    drivers[0].announce_taskpack(forged)
    hub.run(until=hub.now + 10)
    for d in drivers[1:]:
        # Refused with the reason, and not recorded: a forgery never shadows the genuine one.
        assert ann.ref.cid not in d.core.book.entries
        assert {r["reason"] for r in d.core.book.refusals} == {"bad-signature"}
        assert not d.store.has(ann.ref.cid)
