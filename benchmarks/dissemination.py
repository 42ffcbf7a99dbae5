"""Taskpack dissemination: a 20 MB taskpack published at one node of 16 reaches all.

For each network (simulated, then real node processes on 127.0.0.1):
time from the announcement until every node's TaskpackBook lists the taskpack verified,
as a ratio to one point-to-point fetch of the same archive between two nodes of the same
run. Swarming (nodes serve verified chunks of partial downloads, rarest-first) keeps the
ratio low; all 15 downloaders pulling from the publisher's one uplink would give ~15.

* sim:    16 nodes as p2pfl/sim/cluster.py builds them (NodeCore + Driver + SimIO +
          SimNetwork + in-memory BlobStore), full mesh, 20 ms / 100 Mbit/s per node.
          Baseline: the same archive fetched by a BlobFetch (as the driver runs it) between
          two spare nodes of the same hub, before the dissemination.
* libp2p: real `p2pfl node` processes on 127.0.0.1 (p2pfl/localnet.py), the first the
          publisher, the others `--trust` it and bootstrap to it. Once the overlay is up
          and its start-up load is over, `publish` at the first; time from the publish
          call's return (the announce is out) to the last node listing it verified.
          Baseline: the same taskpack published to a fresh 2-process network (fastest of
          --p2p-runs), so both include the same check/unpack work. One run per
          --libp2p-nodes entry (default 16,8); ratio_libp2p is the first.
          On a small machine this is CPU-bound (every copy costs CPU for noise, yamux,
          hashing, unpacking): each run reports the node processes' CPU seconds, the
          CPU floor and `ratio_cpu_min`, the ratio a perfect swarm would get on these cores.

Prints one JSON line. Usage: python benchmarks/dissemination.py [--mb 20] [--nodes 16]
[--libp2p-nodes 16,8] [--p2p-runs 2] [--no-libp2p] [--no-sim] [--seed 1] [--timeout 300] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
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

from p2pfl.sim.cluster_base import CAPABILITIES as CAPS  # what simulated nodes report

ROOT = Path(__file__).resolve().parents[1]
STATS = ROOT / "taskpacks" / "federated-stats"


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


# --- libp2p: real node processes -----------------------------------------------------------


def _statuses(client: Any, cid: str) -> str:
    for item in client.taskpacks():
        if item.get("cid") == cid:
            return str(item.get("status"))
    return "unknown"


def _wait_overlay(nodes: list[Any], timeout_s: float) -> dict[str, int]:
    """Until every node is connected to the publisher (they all bootstrap to it) and has
    min(n-1, target_peers) peers; then a few GossipSub heartbeats for the meshes."""
    from p2pfl import Client
    from p2pfl.localnet import wait_until
    from p2pfl.net.libp2p import Libp2pConfig

    want = min(len(nodes) - 1, Libp2pConfig().target_peers)
    clients = [Client(n.data_dir, timeout=30.0) for n in nodes]
    counts: dict[str, int] = {}

    def ready() -> bool:
        for node, c in zip(nodes, clients, strict=True):
            ids = {p["peer_id"] for p in c.peers()}
            counts[node.name] = len(ids)
            if len(ids) < want or (node is not nodes[0] and nodes[0].peer_id not in ids):
                return False
        return True

    wait_until(ready, timeout_s, what=f"{len(nodes)} nodes with >= {want} peers", interval=0.5)
    return counts


def _warm_up(nodes: list[Any], clients: list[Any], scratch: Path, timeout_s: float) -> int:
    """Publish small taskpacks until every node verified one: proves the announcement
    reaches everyone (an announce published before the publisher has seen a peer's
    subscription never reaches that peer; it would only learn of it on reconnect) and
    takes the first-use costs of checking and unpacking out of the measurement.
    Returns the number of warm-up publishes."""
    warmed: set[int] = {0}
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while len(warmed) < len(nodes):
        attempt += 1
        pack = scratch / f"warm-up-{attempt}"
        shutil.rmtree(pack, ignore_errors=True)
        shutil.copytree(STATS, pack, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (pack / "warm-up.txt").write_text(f"{attempt} {time.time()}\n")
        cid = clients[0].publish(pack)["cid"]
        wait_end = min(deadline, time.monotonic() + 10.0)
        while len(warmed) < len(nodes) and time.monotonic() < wait_end:
            for i, c in enumerate(clients):
                if i not in warmed and (nodes[i].data_dir / "taskpacks" / cid).exists():
                    if _statuses(c, cid) == "verified":
                        warmed.add(i)
            time.sleep(0.05)
        if time.monotonic() >= deadline and len(warmed) < len(nodes):
            cold = [nodes[i].name for i in range(len(nodes)) if i not in warmed]
            raise TimeoutError(f"warm-up taskpack never verified at {cold}")
    return attempt


def _cpu_s(handles: list[Any]) -> float:
    """User + system CPU seconds of these processes so far."""
    import psutil

    total = 0.0
    for p in handles:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _written(handles: list[Any]) -> int:
    """Bytes these processes passed to write()/send() so far (sockets and files alike)."""
    import psutil

    total = 0
    for p in handles:
        with contextlib.suppress(psutil.Error, AttributeError):
            total += p.io_counters().write_chars
    return total


def _wait_quiet(handles: list[Any], timeout_s: float) -> float:
    """Until the nodes' start-up work (imports, dials, handshakes: 16 nodes keep both cores
    busy for ~15 s) is over: two 1 s windows in a row under half the machine. Returns the
    overlay's idle load (CPU s / s: heartbeats, discovery, capability gossip) over 5 s."""
    import psutil

    cores = psutil.cpu_count() or 1
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 2:
        before = _cpu_s(handles)
        time.sleep(1.0)
        quiet = quiet + 1 if _cpu_s(handles) - before < cores / 2 else 0
        if time.monotonic() > deadline:
            raise TimeoutError(f"the nodes never went quiet within {timeout_s:g} s")
    before = _cpu_s(handles)
    time.sleep(5.0)  # idle load comes in bursts every few seconds
    return (_cpu_s(handles) - before) / 5.0


def _poll_verified(
    nodes: list[Any], clients: list[Any], cid: str, t0: float, timeout_s: float
) -> list[float]:
    """Seconds from t0 until each node listed `cid` verified.

    A node unpacks a checked archive to DATA_DIR/taskpacks/CID just before it marks it
    verified, so the poll watches for that directory (a stat: no work for the nodes; asking
    15 busy nodes over their control sockets every few ms cost them whole CPU seconds) and
    then confirms the status over the control socket."""
    n = len(nodes)
    unpacked = [node.data_dir / "taskpacks" / cid for node in nodes]
    done: dict[int, float] = {}
    deadline = t0 + timeout_s
    while len(done) < n:
        for i, c in enumerate(clients):
            if i in done or not unpacked[i].exists():
                continue
            status = _statuses(c, cid)
            if status == "verified":
                done[i] = time.perf_counter() - t0
            elif status == "rejected":
                raise SystemExit(f"{nodes[i].name} rejected the taskpack: {c.taskpacks()}")
        if time.perf_counter() > deadline:
            missing = [nodes[i].name for i in range(n) if i not in done]
            raise TimeoutError(f"not verified within {timeout_s:g} s at {missing}")
        time.sleep(0.005)
    return [done[i] for i in range(n)]


def _disseminate(procs: Any, taskpack: Path, n: int, tag: str, timeout_s: float) -> dict[str, Any]:
    """n fresh node processes (the first publishes, the others trust it), the overlay up;
    publish, then poll every node until each lists the taskpack verified. Stops the nodes."""
    import psutil

    from p2pfl import Client

    first = procs.start_node(f"{tag}-0")
    others = [
        procs.spawn(f"{tag}-{i}", bootstrap=[first.bootstrap_addr], trust=[first.peer_id])
        for i in range(1, n)
    ]
    nodes = [first, *others]
    try:
        procs.wait_ready(others, timeout=max(60.0, 6.0 * n))
        peers = _wait_overlay(nodes, timeout_s)
        clients = [Client(node.data_dir, timeout=30.0) for node in nodes]
        warm_ups = _warm_up(nodes, clients, taskpack.parent / tag, timeout_s)
        handles = [psutil.Process(node.pid) for node in nodes]
        idle_rate = _wait_quiet(handles, timeout_s)
        psutil.cpu_percent(None)  # starts the system-wide busy-time window
        cpu0, own0, io0 = _cpu_s(handles), time.process_time(), _written(handles)
        t_pub = time.perf_counter()
        info = clients[0].publish(taskpack)
        t0 = time.perf_counter()
        done = _poll_verified(nodes, clients, info["cid"], t0, timeout_s)
        nodes_cpu = _cpu_s(handles) - cpu0
        written = _written(handles) - io0
        archive = len(Client(nodes[0].data_dir).read_blob(info["cid"]))
        own_cpu = time.process_time() - own0
        busy = psutil.cpu_percent(None)
        times = sorted(done)
        total = times[-1]
        cores = psutil.cpu_count() or 1
        return {
            "all_verified_s": round(total, 3),
            "first_verified_s": round(times[1] if n > 1 else times[0], 3),  # [0]: publisher
            "median_verified_s": round(times[len(times) // 2], 3),
            "publish_call_s": round(t0 - t_pub, 3),
            "cpu_busy_pct": round(busy, 1),
            # CPU seconds the node processes spent from the publish call to the last
            # verified; / cores = the shortest time those cores could have done it in.
            "nodes_cpu_s": round(nodes_cpu, 2),
            "cpu_floor_s": round(nodes_cpu / cores, 2),
            # Per downloader, minus the overlay's idle load over the same span.
            "cpu_s_per_copy": round((nodes_cpu - idle_rate * (total + t0 - t_pub)) / (n - 1), 3),
            # Bytes written (sent + stored + unpacked) per downloader, in archives: the
            # same in a swarm as point-to-point unless chunks travel more than once.
            "written_x_per_copy": round(written / (n - 1) / archive, 2),
            "idle_cpu_pct": round(100 * idle_rate, 1),
            "bench_poll_cpu_s": round(own_cpu, 2),
            "min_peers": min(peers.values()),
            "warm_ups": warm_ups,
        }
    finally:
        procs.stop(nodes)


def run_libp2p(
    taskpack: Path, node_counts: list[int], p2p_runs: int, tmp: Path, timeout_s: float
) -> dict[str, Any]:
    """Baseline (2 processes, `p2p_runs` times, the fastest counts), then one dissemination
    per entry of `node_counts`; ratio_libp2p is for the first count."""
    import psutil

    from p2pfl.localnet import LocalNet

    cores = psutil.cpu_count() or 1

    with LocalNet(tmp / "procs", node_args=["--log-level", "warning"]) as procs:
        p2p = [_disseminate(procs, taskpack, 2, f"p2p{k}", timeout_s) for k in range(p2p_runs)]
        fastest = min(p2p, key=lambda r: r["all_verified_s"])
        base = fastest["all_verified_s"]
        runs = []
        for n in node_counts:
            r = _disseminate(procs, taskpack, n, f"swarm{n}", timeout_s)
            # The best any swarm could do on these cores: every copy costs the CPU it costs
            # point-to-point, spread perfectly over all cores.
            floor = (n - 1) * fastest["cpu_s_per_copy"] / cores
            runs.append(
                {
                    "nodes": n,
                    **r,
                    "ratio": round(r["all_verified_s"] / base, 3),
                    "ratio_cpu_min": round(max(floor, base) / base, 2),
                    "cpu_per_copy_vs_p2p": round(
                        r["cpu_s_per_copy"] / fastest["cpu_s_per_copy"], 2
                    ),
                }
            )
        leaked = procs.leaked()
    if leaked:
        raise SystemExit(f"processes left running: {leaked}")
    return {
        "ratio_libp2p": runs[0]["ratio"],
        "libp2p_nodes": runs[0]["nodes"],
        "libp2p_all_verified_s": runs[0]["all_verified_s"],
        "libp2p_p2p_s": round(base, 3),
        "libp2p_p2p_runs_s": [r["all_verified_s"] for r in p2p],
        "libp2p_p2p": fastest,
        "libp2p_runs": runs,
        "cores": cores,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--nodes", type=int, default=16)
    # Node processes per libp2p dissemination, comma-separated; the first gives ratio_libp2p.
    ap.add_argument("--libp2p-nodes", default="16,8")
    ap.add_argument("--p2p-runs", type=int, default=2)
    ap.add_argument("--no-libp2p", action="store_true")
    ap.add_argument("--no-sim", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (node logs)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="p2pfl-dissem-"))
    try:
        taskpack = make_taskpack(tmp, args.mb, args.seed)
        out: dict[str, Any] = {"mb": args.mb, "nodes": args.nodes}
        if not args.no_sim:
            out.update(run_sim(taskpack, args.nodes, args.seed, tmp))
        if not args.no_libp2p:
            counts = [int(x) for x in args.libp2p_nodes.split(",") if x.strip()]
            out.update(run_libp2p(taskpack, counts, args.p2p_runs, tmp, args.timeout))
        first = {k: out.pop(k) for k in ("ratio_sim", "ratio_libp2p") if k in out}
        print(json.dumps({**first, **out}))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
