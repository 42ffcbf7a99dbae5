"""Does decentralised learning learn? fedavg and gossip over the simulated network against
a centralised FedAvg computed independently, over several seeds.

Every run uses the same Dirichlet-0.5 split of digits per seed (p2pfl.sim.data
.prepare_node_data), the same taskpack (fedavg-mlp-digits), rounds and local epochs.

- `fedavg`: the protocol over the simulated network; the final model on the global test set.
- `central`: centralised FedAvg replayed on the same partitions with the taskpack's own
  training code (each node's task spec, the same initial weights), but averaged by a plain
  sample-weighted mean written here in numpy, NOT p2pfl.fl.aggregate: a bug in the
  project's aggregation would show as a gap between the two. `fedavg_central_max_abs_diff`
  is the largest weight difference of the two final models (float32 rounding only: ~1e-7).
- `gossip`: push-sum over the simulated network. `gossip_node_acc_{mean,min}` is the test
  accuracy of each node's OWN final model (what a site would use), `gossip_merge_acc` that
  of the reducer's final merge of all of them (the task result's model).

One seed of 60 SGD steps on digits varies by about 0.06 in accuracy, so one seed cannot
separate two methods: each figure is reported as mean and sample std over `--seeds`
(default 5), with `n_seeds` and the per-seed values.

Prints one JSON line: {"fedavg_acc": {"mean", "std", "per_seed"}, "central_acc": ...,
"gossip_node_acc_mean": ..., "gossip_node_acc_min": ..., "gossip_merge_acc": ...,
"n_seeds", ...}.

    python benchmarks/learning.py [--nodes 8] [--rounds 10] [--seeds 1,2,3,4,5]
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def weighted_mean(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """FedAvg from its definition: sum_i n_i * w_i / sum_i n_i, per tensor, in float64,
    cast back to each tensor's dtype. Independent of p2pfl.fl.aggregate on purpose."""
    total = sum(n for _, n in updates)
    first = updates[0][0]
    out = {}
    for key, ref in first.items():
        acc = np.zeros(ref.shape, np.float64)
        for weights, n in updates:
            acc += weights[key].astype(np.float64) * n
        out[key] = (acc / total).astype(ref.dtype)
    return out


def _cluster(raw: dict[str, Any], tmp: Path) -> tuple[Any, list[Path], Path, str]:
    from p2pfl.sim.cluster import ClusterSpec, SimCluster
    from p2pfl.sim.data import prepare_node_data
    from p2pfl.sim.runner import cluster_spec_kwargs
    from p2pfl.sim.scenario import parse

    scenario = parse(raw)
    paths, test_path = prepare_node_data(scenario, scenario.seed, tmp)
    kwargs = cluster_spec_kwargs(
        scenario, seed=scenario.seed, network="sim", node_data=paths, test_path=test_path
    )
    cluster = SimCluster(ClusterSpec(**kwargs))
    for _ in cluster.run():
        pass
    assert cluster.result and cluster.result["status"] == "succeeded", cluster.result
    return cluster, paths, test_path, str(kwargs["input_name"])


def fedavg_and_central(raw: dict[str, Any]) -> dict[str, Any]:
    """Decentralised fedavg, then centralised FedAvg on the same partitions (the taskpack's
    own training code, a plain weighted mean written above)."""
    from p2pfl.runtime import Evaluate, InitialWeights, InProcessRunner, TaskSpec, Train
    from p2pfl.wire import decode_tensors, encode_tensors

    with tempfile.TemporaryDirectory(prefix="p2pfl-learning-") as tmp:
        started = time.perf_counter()
        cluster, paths, test_path, name = _cluster(raw, Path(tmp))
        sim_wall = time.perf_counter() - started
        task_id = cluster.task_id
        assert task_id is not None
        offer = cluster.nodes[0].core.tasks[task_id].offer
        holder = next(n for n in cluster.nodes if n.store.has(cluster.result["model_cid"]))
        p2p_model = decode_tensors(bytes(holder.store.get(cluster.result["model_cid"])))
        data_of = {n.identity.peer_id: paths[n.index] for n in cluster.nodes}

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
        weights = decode_tensors(runner.run(specs[peers[0]], InitialWeights()).result)
        for rnd in range(1, offer.rounds + 1):
            updates = []
            blob = bytes(encode_tensors(weights))
            for peer in peers:
                out = runner.run(specs[peer], Train(rnd, blob)).result
                updates.append((decode_tensors(out.update), float(out.num_samples)))
            weights = weighted_mean(updates)
        test = spec("__test__", {name: test_path}, validation_fraction=0.0)
        central_model = bytes(encode_tensors(weights))
        central_acc = float(runner.run(test, Evaluate(0, central_model)).result["accuracy"])
        central_wall = time.perf_counter() - started
        runner.close()
    diff = max(
        float(np.max(np.abs(p2p_model[k].astype(np.float64) - weights[k]))) for k in p2p_model
    )
    return {
        "fedavg_acc": float(cluster.final_test_metrics["accuracy"]),
        "central_acc": central_acc,
        "fedavg_central_max_abs_diff": diff,
        "fedavg_wall_s": sim_wall,
        "central_wall_s": central_wall,
    }


def gossip(raw: dict[str, Any]) -> dict[str, Any]:
    """Push-sum: each node's own final model on the global test set, and the final merge."""
    with tempfile.TemporaryDirectory(prefix="p2pfl-learning-") as tmp:
        started = time.perf_counter()
        cluster, _paths, _test, _name = _cluster(raw, Path(tmp))
        wall = time.perf_counter() - started
        task_id = cluster.task_id
        own = []
        for node in cluster.nodes:
            machine = node.core.tasks[task_id]
            mine = machine.final.partials.get(machine.my_id)
            # The reducer's global_ref became the merge: its own model is in its partial.
            ref = mine.model if mine is not None and mine.model is not None else machine.global_ref
            own.append(float(cluster._test_metrics(ref.cid, node.index)["accuracy"]))
        return {
            "gossip_node_acc_mean": statistics.fmean(own),
            "gossip_node_acc_min": min(own),
            "gossip_merge_acc": float(cluster.final_test_metrics["accuracy"]),
            "gossip_wall_s": wall,
        }


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """{name: {"mean", "std", "per_seed"}} over seeds (sample std; 0 for one seed)."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        xs = [float(r[key]) for r in per_seed]
        out[key] = {
            "mean": round(statistics.fmean(xs), 6),
            "std": round(statistics.stdev(xs), 6) if len(xs) > 1 else 0.0,
            "per_seed": [round(x, 6) for x in xs],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated run seeds")
    ap.add_argument("--skip-gossip", action="store_true", help="fedavg and central only")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    np.seterr(all="ignore")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        ap.error("--seeds: give at least one seed")

    per_seed = []
    for seed in seeds:
        row = fedavg_and_central(scenario_raw(args.nodes, args.rounds, seed, "fedavg"))
        if not args.skip_gossip:
            row.update(gossip(scenario_raw(args.nodes, args.rounds, seed, "gossip")))
        per_seed.append(row)
    figures: dict[str, Any] = {"nodes": args.nodes, "rounds": args.rounds, "seeds": seeds}
    figures["n_seeds"] = len(seeds)
    figures.update(summarise(per_seed))
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
