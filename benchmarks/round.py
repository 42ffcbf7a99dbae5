"""What does one federated round cost beyond training? Protocol overhead per round.

8 nodes, a synthetic 1 M-parameter model (float32), 5 rounds of fedavg. The taskpack
(written to a temporary directory) trains nothing: `execute` returns the global weights
slightly perturbed at once, so what is measured is the protocol: rosters, update and model
transfers (blobs), aggregation, commits.

* sim: SimCluster under LinkModel(latency 20 ms, 100 Mbps). `overhead_s_sim` is virtual
  seconds per round from the roster to the result, minus the virtual compute time the
  simulator charges for one training job per round (nodes train in parallel there);
  `overhead_s_sim_wall` is the simulator's own wall seconds per round minus job time.
* libp2p: LiveCluster, 8 real py-libp2p hosts on 127.0.0.1 in this process. Wall seconds
  per round from the roster to the result, minus the time spent inside jobs (they run one
  at a time in a shared pool).
* bytes_per_node_round: bytes per node per round from each network's stats (the mean of
  bytes received, which in a closed cluster equals the mean of bytes sent; see
  steady_bytes), over rounds 2..R (round 1 also carries the taskpack and the task's
  set-up); beside it `model_bytes`, the size of one encoded model (the floor for anyone
  sending a model). The sim is deterministic for a
  seed (its virtual figures repeat exactly); its wall time is not: it runs
  `--sim-repeats` times and the run with the median wall overhead is reported, with the
  range.

Prints one JSON line:
{"overhead_s_sim", "overhead_s_sim_wall", "overhead_s_libp2p", "bytes_per_node_round",
 "bytes_per_node_round_libp2p", "model_bytes", ...}

    python benchmarks/round.py [--nodes 8] [--rounds 5] [--params 1000000] [--skip-libp2p]
                               [--sim-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

MANIFEST = """\
apiVersion: p2pfl/v1
kind: TaskPackage
metadata:
  name: bench-round
  version: 1.0.0
  author: p2pfl
  description: Synthetic training task for the round benchmark (no real training).
spec:
  type: training
  framework: numpy
  requirements: {{python: ">=3.11", gpu: none, memory: 1Gi, storage: 100Mi}}
  inputs:
    - {{name: table, type: tabular, format: csv}}
  outputs:
    - {{name: model, type: weights, format: p2pfl-tensors}}
  federated:
    protocol: fedavg
    rounds: {rounds}
    local_epochs: 1
    min_nodes: 2
    max_nodes: 64
    aggregator: fedavg
    deadline_s: 60
limits: {{timeout_s: 300, memory: 2Gi}}
"""

TASK = """\
import zlib

import numpy as np

from p2pfl.taskpack.sdk import Context, Task, Update

N_PARAMS = {n_params}


class BenchRound(Task):
    def preprocess(self, ctx: Context, inputs):
        return {{"rows": 20}}

    def initial_weights(self, ctx: Context):
        rng = np.random.default_rng(ctx.seed)
        return {{"w": rng.standard_normal(N_PARAMS, dtype=np.float32)}}

    def execute(self, ctx: Context, data, weights):
        # A different shift per node: equal updates would share one content address, and
        # nodes would never need to move each other's.
        shift = 1e-3 * ctx.round + 1e-6 * (zlib.crc32(ctx.node.encode()) % 1000)
        w = weights["w"] + np.float32(shift)
        return Update(num_samples=data["rows"], weights={{"w": w}}, metrics={{"loss": 0.0}})

    def evaluate(self, ctx: Context, data, weights):
        return {{"loss": 0.0, "num_samples": data["rows"]}}
"""


def write_taskpack(root: Path, n_params: int, rounds: int) -> Path:
    pack = root / "bench-round"
    (pack / "src").mkdir(parents=True)
    (pack / "manifest.yaml").write_text(MANIFEST.format(rounds=rounds), encoding="utf-8")
    (pack / "src" / "task.py").write_text(TASK.format(n_params=n_params), encoding="utf-8")
    return pack


def write_data(root: Path, nodes: int) -> list[Path]:
    paths = []
    for i in range(nodes):
        path = root / f"node-{i}.csv"
        rows = "\n".join(f"{j * 0.1:.1f},{(i + j) % 3 * 0.5:.1f},{j % 2}" for j in range(20))
        path.write_text("a,b,label\n" + rows + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def model_bytes(n_params: int) -> int:
    import numpy as np

    from p2pfl.wire import encode_tensors

    return len(encode_tensors({"w": np.zeros(n_params, dtype=np.float32)}))


def steady_bytes(records: list[Any], nodes: int, field: str) -> tuple[float, float]:
    """Mean bytes per node per round over rounds 2.. (and over all rounds).

    Every byte sent within the cluster is received within it, so the mean of bytes
    received equals the mean of bytes sent; the received side is what we report, because
    Libp2pNetwork over-counts bytes sent when one node serves several bulk fetches at once
    (each serve counts the bulk server's shared counter's growth)."""
    rounds = max(r.round for r in records)
    later = [getattr(r, field) for r in records if r.round >= 2 and r.alive]
    every = [getattr(r, field) for r in records if r.alive]
    steady = sum(later) / max(1, len(later)) if rounds >= 2 else float("nan")
    return steady, sum(every) / (nodes * rounds)


def run_sim(spec: Any) -> dict[str, Any]:
    from p2pfl.sim.cluster import TRAIN_OVERHEAD_S, TRAIN_PER_SAMPLE_S, SimCluster

    cluster = SimCluster(spec)
    runner_run = cluster.runner.run
    job_s = [0.0]

    def timed_run(job_spec: Any, job: Any) -> Any:
        started = time.perf_counter()
        try:
            return runner_run(job_spec, job)
        finally:
            job_s[0] += time.perf_counter() - started

    cluster.runner.run = timed_run  # type: ignore[method-assign]
    marks: dict[str, tuple[float, float, float]] = {}

    def listen(event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind in ("roster", "result") and kind not in marks:
            marks[kind] = (cluster.hub.now, time.perf_counter(), job_s[0])

    cluster.nodes[0].driver.listeners.append(listen)
    started = time.perf_counter()
    records = list(cluster.run())
    wall = time.perf_counter() - started
    rounds = max(r.round for r in records)
    (v0, w0, j0), (v1, w1, j1) = marks["roster"], marks["result"]
    compute_s = TRAIN_OVERHEAD_S + TRAIN_PER_SAMPLE_S * 20  # one job's worth per round
    steady, every = steady_bytes(records, spec.nodes, "bytes_received")
    return {
        "status": (cluster.result or {}).get("status"),
        "rounds": rounds,
        "virtual_s_per_round": (v1 - v0) / rounds,
        "overhead_s": (v1 - v0) / rounds - compute_s,
        "overhead_s_wall": ((w1 - w0) - (j1 - j0)) / rounds,
        "wall_s": wall,
        "job_s": job_s[0],
        "bytes_per_node_round": steady,
        "bytes_per_node_round_all": every,
    }


def run_libp2p(spec: Any) -> dict[str, Any]:
    from p2pfl.sim.live import LiveCluster

    cluster = LiveCluster(spec, deadline_s=600, start_timeout_s=120)
    started = time.perf_counter()
    records = list(cluster.run())
    wall = time.perf_counter() - started
    status = (cluster.result or {}).get("status")
    if status != "succeeded" or "roster" not in cluster.marks:
        return {"status": status, "reason": (cluster.result or {}).get("reason"), "wall_s": wall}
    rounds = max(r.round for r in records)
    m, j = cluster.marks, cluster.job_marks
    steady, every = steady_bytes(records, spec.nodes, "bytes_received")
    return {
        "status": status,
        "bytes_sent_per_node_round_reported": steady_bytes(records, spec.nodes, "bytes_sent")[0],
        "rounds": rounds,
        "wall_s_per_round": (m["result"] - m["roster"]) / rounds,
        "overhead_s": ((m["result"] - m["roster"]) - (j["result"] - j["roster"])) / rounds,
        "job_s_per_round": (j["result"] - j["roster"]) / rounds,
        "start_s": m["ready"],  # hosts up and connected (after imports)
        "roster_s": m["roster"] - m["published"],  # publish -> roster
        "wall_s": wall,
        "bytes_per_node_round": steady,
        "bytes_per_node_round_all": every,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--skip-libp2p", action="store_true")
    ap.add_argument("--sim-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)

    from p2pfl.sim.cluster import ClusterSpec

    with tempfile.TemporaryDirectory(prefix="p2pfl-bench-round-") as tmp:
        root = Path(tmp)
        pack = write_taskpack(root, args.params, args.rounds)
        data = write_data(root, args.nodes)

        def spec(network: str, link: dict[str, Any]) -> ClusterSpec:
            return ClusterSpec(
                seed=1,
                nodes=args.nodes,
                taskpack_dir=pack,
                node_data=data,
                input_name="table",
                params={"rounds": args.rounds},
                link=link,
                network=network,
            )

        sims = [
            run_sim(spec("sim", {"latency_ms": 20.0, "bandwidth_mbps": 100.0}))
            for _ in range(args.sim_repeats)
        ]
        sim = sorted(sims, key=lambda x: x["overhead_s_wall"])[len(sims) // 2]
        live = None if args.skip_libp2p else run_libp2p(spec("libp2p", {}))

    def r(x: Any, n: int = 4) -> Any:
        return round(x, n) if isinstance(x, float) else x

    out: dict[str, Any] = {
        "nodes": args.nodes,
        "rounds": args.rounds,
        "params": args.params,
        "model_bytes": model_bytes(args.params),
        "overhead_s_sim": r(sim["overhead_s"]),
        "overhead_s_sim_wall": r(sim["overhead_s_wall"]),
        "overhead_s_libp2p": r(live["overhead_s"]) if live and "overhead_s" in live else None,
        "bytes_per_node_round": round(sim["bytes_per_node_round"]),
        "bytes_per_node_round_libp2p": (
            round(live["bytes_per_node_round"]) if live and "bytes_per_node_round" in live else None
        ),
        "overhead_s_sim_wall_range": [
            r(min(x["overhead_s_wall"] for x in sims)),
            r(max(x["overhead_s_wall"] for x in sims)),
        ],
        "sim": {k: r(v) for k, v in sim.items()},
        "libp2p": {k: r(v) for k, v in live.items()} if live else None,
        "context": {
            "best_known_decentralised_fl_s_per_round_8_nodes": 6.0,
            "flower_s_per_round": 0.22,
            "flower_startup_s": 17.0,
        },
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
