"""Does decentralised learning learn? fedavg and gossip over the simulated network against
a centralised FedAvg computed directly on the same partitions.

All three use the same Dirichlet-0.5 split of digits (p2pfl.sim.data.prepare_node_data with
the same seed), the same taskpack (fedavg-mlp-digits), the same rounds and local epochs.
The centralised baseline replays the decentralised run's arithmetic directly: each node's
own task spec (task id, seed, params), the same initial weights, every node trains from the
global weights, p2pfl.fl.aggregate averages them in peer-id order. It reports whether the
two final models are bit-identical. All accuracies are on the same global test set.

Prints one JSON line: {"fedavg_acc", "gossip_acc", "central_acc", ...}.

    python benchmarks/learning.py [--nodes 8] [--rounds 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASKPACK = REPO / "taskpacks" / "fedavg-mlp-digits"


def scenario_raw(nodes: int, rounds: int, seed: int, aggregator: str) -> dict[str, Any]:
    return {
        "name": f"learning-{aggregator}",
        "seed": seed,
        "nodes": nodes,
        "topology": {"kind": "full"},
        "dataset": {"name": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "taskpack": str(TASKPACK),
        "params": {"rounds": rounds, "local_epochs": 1, "aggregator": aggregator},
        "network": {"latency_ms": 20, "bandwidth_mbps": 100},
    }


def decentralised(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    from p2pfl.sim.runner import run_scenario
    from p2pfl.sim.scenario import parse

    scenario = parse(raw)
    summary = run_scenario(scenario, out_dir=out, plots=False)
    # Prefer the final model on the global test set; fall back to the nodes' own hold-outs.
    acc = summary.test.get("accuracy", summary.final["accuracy_mean"])
    return {"acc": acc, "wall_s": summary.wall_s, "bytes_sent_total": summary.bytes_sent_total}


def fedavg_and_central(raw: dict[str, Any]) -> dict[str, Any]:
    """Decentralised fedavg over the simulated network, then centralised FedAvg replayed
    directly on the same partitions: the same taskpack code with each node's own task
    spec (task id, seed, params), the same initial weights, p2pfl.fl.aggregate in a plain
    loop over the nodes in peer-id order. If the protocol adds nothing but transport, the
    two final models are bit-identical."""
    from p2pfl.fl.aggregate import aggregate
    from p2pfl.runtime import Evaluate, InitialWeights, InProcessRunner, TaskSpec, Train
    from p2pfl.sim.cluster import ClusterSpec, SimCluster
    from p2pfl.sim.data import prepare_node_data
    from p2pfl.sim.runner import cluster_spec_kwargs
    from p2pfl.sim.scenario import parse
    from p2pfl.wire import decode_tensors, encode_tensors

    scenario = parse(raw)
    with tempfile.TemporaryDirectory(prefix="p2pfl-learning-") as tmp:
        paths, test_path = prepare_node_data(scenario, scenario.seed, Path(tmp))
        kwargs = cluster_spec_kwargs(
            scenario, seed=scenario.seed, network="sim", node_data=paths, test_path=test_path
        )
        started = time.perf_counter()
        cluster = SimCluster(ClusterSpec(**kwargs))
        for _ in cluster.run():
            pass
        sim_wall = time.perf_counter() - started
        assert cluster.result and cluster.result["status"] == "succeeded", cluster.result
        task_id = cluster.task_id
        assert task_id is not None
        offer = cluster.nodes[0].core.tasks[task_id].offer
        holder = next(n for n in cluster.nodes if n.store.has(cluster.result["model_cid"]))
        p2p_model = bytes(holder.store.get(cluster.result["model_cid"]))
        data_of = {n.identity.peer_id: paths[n.index] for n in cluster.nodes}
        name = kwargs["input_name"]

        started = time.perf_counter()
        runner = InProcessRunner()

        def spec(node: str, inputs: dict[str, Path], **params: Any) -> TaskSpec:
            return TaskSpec(
                task_id=task_id,
                node=node,
                taskpack_dir=TASKPACK,
                params={**dict(offer.params), **params},
                inputs=inputs,
                seed=int(task_id[:8], 16),
                rounds=offer.rounds,
                protocol=offer.protocol,
            )

        peers = sorted(cluster.result["participants"])
        specs = {p: spec(p, {name: data_of[p]}) for p in peers}
        weights = runner.run(specs[peers[0]], InitialWeights()).result
        for rnd in range(1, offer.rounds + 1):
            updates = []
            for peer in peers:
                out = runner.run(specs[peer], Train(rnd, bytes(weights))).result
                updates.append((decode_tensors(out.update), float(out.num_samples)))
            weights = encode_tensors(aggregate(offer.aggregator, updates))
        central_model = bytes(weights)
        test = spec("__test__", {name: test_path}, validation_fraction=0.0)
        central_acc = float(runner.run(test, Evaluate(0, central_model)).result["accuracy"])
        central_wall = time.perf_counter() - started
        runner.close()
    a, b = decode_tensors(p2p_model), decode_tensors(central_model)
    diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    return {
        "fedavg_acc": float(cluster.final_test_metrics["accuracy"]),
        "central_acc": central_acc,
        "fedavg_central_identical": p2p_model == central_model,
        "fedavg_central_max_abs_diff": diff,
        "fedavg_wall_s": round(sim_wall, 3),
        "central_wall_s": round(central_wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-gossip", action="store_true", help="fedavg and central only")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    np.seterr(all="ignore")

    figures: dict[str, Any] = {"nodes": args.nodes, "rounds": args.rounds, "seed": args.seed}
    figures.update(fedavg_and_central(scenario_raw(args.nodes, args.rounds, args.seed, "fedavg")))
    if not args.skip_gossip:
        with tempfile.TemporaryDirectory(prefix="p2pfl-learning-") as tmp:
            r = decentralised(scenario_raw(args.nodes, args.rounds, args.seed, "gossip"), Path(tmp))
            figures["gossip_acc"] = None if r["acc"] is None else float(r["acc"])
            figures["gossip_wall_s"] = r["wall_s"]
    for key in ("fedavg_acc", "central_acc", "gossip_acc"):
        if isinstance(figures.get(key), float):
            figures[key] = round(figures[key], 4)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
