"""Taskpack dissemination: a 20 MB taskpack published at one node of 16 reaches all.

For each network (simulated, then real libp2p hosts on 127.0.0.1 in this one process):
time from the announcement until every node's TaskpackBook lists the taskpack verified,
as a ratio to one point-to-point fetch of the same archive between two nodes of the same
run. Swarming (nodes serve verified chunks of partial downloads, rarest-first) keeps the
ratio low; all 15 downloaders pulling from the publisher's one uplink would give ~15.

* sim:    16 nodes as p2pfl/sim/cluster.py builds them (NodeCore + Driver + SimIO +
          SimNetwork + in-memory BlobStore), full mesh, 20 ms / 100 Mbit/s per node.
          Baseline: the same archive fetched by a BlobFetch (as the driver runs it) between
          two spare nodes of the same hub, before the dissemination.
* libp2p: `--libp2p-nodes` Libp2pNetwork hosts (default 8) + Driver + TrioIO, each
          bootstrapped to the publisher. Baseline: one BlobFetch between two of them
          before the dissemination, over the same blob protocol.

Prints one JSON line. Usage: python benchmarks/dissemination.py [--mb 20] [--nodes 16]
[--libp2p-nodes 16] [--no-libp2p] [--seed 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STATS = ROOT / "taskpacks" / "federated-stats"
CAPS = {
    "cpus": 2,
    "memory_bytes": 8 << 30,
    "disk_free_bytes": 100 << 30,
    "gpu": False,
    "python": "3.11.7",
}


def make_taskpack(tmp: Path, mb: float, seed: int) -> Path:
    """federated-stats plus `mb` MB of random bytes (incompressible)."""
    dest = tmp / "big-stats"
    shutil.copytree(STATS, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    rng = random.Random(seed)
    (dest / "blob.bin").write_bytes(rng.randbytes(int(mb * 1e6)))
    return dest


def identities(n: int, seed: int, tag: str) -> list[Any]:
    from p2pfl.identity import Identity

    return [
        Identity.from_seed(hashlib.sha256(f"p2pfl-dissem|{tag}|{seed}|{i}".encode()).digest())
        for i in range(n)
    ]


def new_core(identity: Any, publisher: str, seed: int, i: int) -> Any:
    from p2pfl.core.node_core import NodeCore
    from p2pfl.taskpack.trust import TrustPolicy

    return NodeCore(
        identity,
        policy=TrustPolicy(frozenset({publisher}), False),
        capabilities=dict(CAPS),
        datasets={},
        caps_interval_s=None,
        rng=random.Random(seed * 100_003 + i),
    )


def verified_everywhere(drivers: list[Any], cid: str) -> bool:
    return all(d.core.book.verified(cid) is not None for d in drivers)


# --- simulated network -------------------------------------------------------------------


def run_sim(taskpack: Path, nodes: int, seed: int, tmp: Path) -> dict[str, Any]:
    from p2pfl.driver import Driver
    from p2pfl.net.sim import SimHub
    from p2pfl.runtime import InProcessRunner
    from p2pfl.sim.io import sim_node
    from p2pfl.store.blobs import BlobStore

    hub = SimHub(seed=seed)
    runner = InProcessRunner()
    ids = identities(nodes, seed, "sim")
    publisher = ids[0].peer_id
    drivers: list[Driver] = []
    for i, identity in enumerate(ids):
        driver = sim_node(
            hub,
            new_core(identity, publisher, seed, i),
            runner,
            taskpack_root=tmp / f"sim-{i}",
            datasets={},
        )
        drivers.append(driver)
    # Two spare nodes for the baseline, outside the overlay (a fetch needs no link).
    server_store, client_store = BlobStore(None), BlobStore(None)
    pair = identities(2, seed, "sim-pair")
    baseline_events: list[Any] = []
    hub.add_node(pair[0].peer_id, sink=lambda ev: None, blob_reader=server_store.read)
    client_net = hub.add_node(pair[1].peer_id, sink=baseline_events.append)
    hub.apply_topology("full")
    for d in drivers:
        d.start()
    hub.run(until=hub.now + 0.5)  # links come up

    info = drivers[0].publish_taskpack(taskpack)
    ann = info["announce"]
    archive = bytes(drivers[0].store.get(info["cid"]))
    base_s = _sim_baseline(
        hub, client_net, client_store, server_store, pair[0].peer_id, ann.ref, archive
    )

    up0 = hub.stats(publisher).bytes_sent
    t0 = hub.now
    drivers[0].announce_taskpack(ann)
    state = hub.run(until=t0 + 600.0, stop=lambda: verified_everywhere(drivers, info["cid"]))
    runner.close()
    if not verified_everywhere(drivers, info["cid"]):
        raise SystemExit(f"sim: not every node verified the taskpack ({state})")
    total_s = hub.now - t0
    return {
        "sim_all_verified_s": round(total_s, 3),
        "sim_p2p_s": round(base_s, 3),
        "ratio_sim": round(total_s / base_s, 3),
        "sim_publisher_upload_x": round((hub.stats(publisher).bytes_sent - up0) / len(archive), 2),
        "archive_bytes": len(archive),
        "chunks": ann.ref.n_chunks,
    }


def _sim_baseline(hub, client_net, client_store, server_store, server, ref, archive) -> float:
    """One fetch of the archive from one node to another, as the driver runs it."""
    from p2pfl.net.base import FetchDone
    from p2pfl.store.fetcher import BlobFetch

    server_store.put(archive)
    fetch = BlobFetch(ref, client_store.open_partial(ref))

    def send(cmds: list[Any]) -> None:
        for c in cmds:
            client_net.fetch(c.peer, c.cid, c.offset, c.length, c.token)

    def sink(ev: Any) -> None:
        if isinstance(ev, FetchDone):
            send(fetch.on_done(ev.peer, ev.token[1], ev.data))
        elif hasattr(ev, "reason") and hasattr(ev, "token"):
            send(fetch.on_failed(ev.peer, ev.token[1], ev.reason))

    hub.node(client_net.peer_id).sink = sink
    t0 = hub.now
    fetch.add_provider(server)
    send(fetch.start())
    hub.run(until=t0 + 600.0, stop=lambda: fetch.done or bool(fetch.failed_reason))
    if not fetch.done:
        raise SystemExit(f"sim baseline failed: {fetch.failed_reason}")
    return hub.now - t0


# --- libp2p ------------------------------------------------------------------------------


async def run_libp2p(
    taskpack: Path, nodes: int, seed: int, tmp: Path, timeout_s: float
) -> dict[str, Any]:
    import trio

    from p2pfl.driver import Driver
    from p2pfl.io_trio import TrioIO
    from p2pfl.net.libp2p import Libp2pConfig, Libp2pNetwork
    from p2pfl.store.blobs import BlobStore

    ids = identities(nodes, seed, "libp2p")
    publisher = ids[0].peer_id
    drivers: list[Driver] = []
    nets: list[Libp2pNetwork] = []
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for i, identity in enumerate(ids):
            io = TrioIO(nursery, None)  # type: ignore[arg-type]  # no job runs here
            await nursery.start(io.run)
            store = BlobStore(None)
            holder: list[Driver] = []
            boot = [f"{nets[0].listen_addrs()[0]}"] if nets else []
            net = Libp2pNetwork(
                identity,
                Libp2pConfig(bootstrap=boot, target_peers=nodes),
                sink=lambda ev, io=io, holder=holder: io.call_soon(lambda: holder[0].on_event(ev)),
                blob_reader=store.read,
            )
            await nursery.start(net.run)
            driver = Driver(
                new_core(identity, publisher, seed, i),
                net,
                store,
                io,
                taskpack_root=tmp / f"p2p-{i}",
                datasets={},
            )
            holder.append(driver)
            driver.start()
            drivers.append(driver)
            nets.append(net)
        # Wait for the overlay: everyone connected to the publisher and gossip meshes up.
        with trio.fail_after(timeout_s):
            while any(publisher not in {p.peer_id for p in n.connected_peers()} for n in nets[1:]):
                await trio.sleep(0.1)
        await trio.sleep(3.0)  # a few heartbeats: GossipSub meshes form

        info = await trio.to_thread.run_sync(drivers[0].publish_taskpack, taskpack)
        ann = info["announce"]
        archive = bytes(drivers[0].store.get(info["cid"]))
        result["libp2p_p2p_s"] = round(
            await _libp2p_baseline(nets, drivers, ann.ref, archive, timeout_s), 3
        )
        await trio.sleep(0.5)

        t0 = time.perf_counter()
        drivers[0].announce_taskpack(ann)
        with trio.fail_after(timeout_s):
            while not verified_everywhere(drivers, info["cid"]):
                await trio.sleep(0.02)
        total_s = time.perf_counter() - t0
        result.update(
            libp2p_all_verified_s=round(total_s, 3),
            ratio_libp2p=round(total_s / result["libp2p_p2p_s"], 3),
            libp2p_nodes=nodes,
        )
        nursery.cancel_scope.cancel()
    return result


async def _libp2p_baseline(nets, drivers, ref, archive, timeout_s: float) -> float:
    """Node 1 fetches the archive from node 0 with a BlobFetch, as the driver does, then
    forgets it (so the dissemination starts from scratch)."""
    import trio

    from p2pfl.net.base import FetchDone, FetchFailed
    from p2pfl.store.blobs import BlobStore
    from p2pfl.store.fetcher import BlobFetch

    client_net, client = nets[1], drivers[1]
    fetch = BlobFetch(ref, BlobStore(None).open_partial(ref))
    done = trio.Event()
    reasons: list[str] = []

    def send(cmds: list[Any]) -> None:
        for c in cmds:
            client_net.fetch(c.peer, c.cid, c.offset, c.length, ("baseline", c.index))

    original = client.on_event

    def on_event(ev: Any) -> None:
        if isinstance(ev, FetchDone | FetchFailed) and ev.token[0] == "baseline":
            if isinstance(ev, FetchDone):
                send(fetch.on_done(ev.peer, ev.token[1], ev.data))
            else:
                reasons.append(ev.reason)
                send(fetch.on_failed(ev.peer, ev.token[1], ev.reason))
            if fetch.done or fetch.failed_reason:
                done.set()
            return
        original(ev)

    client.on_event = on_event  # type: ignore[method-assign]
    t0 = time.perf_counter()
    fetch.add_provider(nets[0].peer_id)
    send(fetch.start())
    with trio.fail_after(timeout_s):
        await done.wait()
    elapsed = time.perf_counter() - t0
    client.on_event = original  # type: ignore[method-assign]
    if not fetch.done:
        raise SystemExit(f"libp2p baseline failed: {fetch.failed_reason} {reasons[:3]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--nodes", type=int, default=16)
    # 16 libp2p hosts in one process did not finish setting up on 2 cores.
    ap.add_argument("--libp2p-nodes", type=int, default=8)
    ap.add_argument("--no-libp2p", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="p2pfl-dissem-"))
    try:
        taskpack = make_taskpack(tmp, args.mb, args.seed)
        out: dict[str, Any] = {"mb": args.mb, "nodes": args.nodes}
        out.update(run_sim(taskpack, args.nodes, args.seed, tmp))
        if not args.no_libp2p:
            import trio

            out.update(
                trio.run(run_libp2p, taskpack, args.libp2p_nodes, args.seed, tmp, args.timeout)
            )
        first = {k: out.pop(k) for k in ("ratio_sim", "ratio_libp2p") if k in out}
        print(json.dumps({**first, **out}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
