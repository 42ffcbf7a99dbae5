"""Does decentralised learning learn? fedavg and gossip over the simulated network against
a centralised FedAvg computed directly on the same partitions.

All three use the same Dirichlet-0.5 split of digits (p2pfl.sim.data.prepare_node_data with
the same seed), the same taskpack (fedavg-mlp-digits: same model, same initialisation
procedure, same local training), the same rounds and local epochs. The centralised
baseline loads the taskpack's Task class in this process and runs a plain loop:
every node trains from the global weights, p2pfl.fl.aggregate.fedavg averages them. All
accuracies are on the same global test set.

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
import yaml

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


def central(raw: dict[str, Any]) -> dict[str, Any]:
    """FedAvg in a plain loop over the same partitions, with the taskpack's own code."""
    from p2pfl.fl.aggregate import fedavg
    from p2pfl.runtime.loader import load_task_class
    from p2pfl.sim.data import prepare_node_data
    from p2pfl.sim.scenario import parse
    from p2pfl.taskpack.sdk import Context

    scenario = parse(raw)
    defaults = yaml.safe_load((TASKPACK / "configs" / "default.yaml").read_text()) or {}
    params = {**defaults, **scenario.params.as_dict()}
    task = load_task_class(TASKPACK)()
    rounds, seed = scenario.rounds, scenario.seed
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="p2pfl-central-") as tmp:
        paths, test_path = prepare_node_data(scenario, seed, tmp)
        name = scenario.dataset.name

        def ctx(node: str, rnd: int, state: dict[str, Any], **over: Any) -> Context:
            return Context(
                task_id="central", node=node, params={**params, **over}, seed=seed, round=rnd,
                rounds=rounds, protocol="fedavg", state=state, workdir=Path(tmp),
            )  # fmt: skip

        states: list[dict[str, Any]] = [{} for _ in paths]
        data = [task.preprocess(ctx(f"n{i}", 0, states[i]), {name: p}) for i, p in enumerate(paths)]
        weights = task.initial_weights(ctx("n0", 0, {}))
        for rnd in range(1, rounds + 1):
            updates = []
            for i, d in enumerate(data):
                upd = task.execute(ctx(f"n{i}", rnd, states[i]), d, weights)
                assert upd.weights is not None
                updates.append((upd.weights, upd.num_samples))
            weights = fedavg(updates)
        # validation_fraction 0: no hold-out, so evaluate() scores every test row.
        test_ctx = ctx("test", 0, {}, validation_fraction=0.0)
        test_data = task.preprocess(test_ctx, {name: test_path})
        metrics = task.evaluate(test_ctx, test_data, weights)
    return {"acc": float(metrics["accuracy"]), "wall_s": round(time.perf_counter() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-sim", action="store_true", help="only the centralised baseline")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    np.seterr(all="ignore")

    figures: dict[str, Any] = {"nodes": args.nodes, "rounds": args.rounds, "seed": args.seed}
    c = central(scenario_raw(args.nodes, args.rounds, args.seed, "fedavg"))
    figures["central_acc"] = round(c["acc"], 4)
    figures["central_wall_s"] = c["wall_s"]
    if not args.skip_sim:
        with tempfile.TemporaryDirectory(prefix="p2pfl-learning-") as tmp:
            for agg in ("fedavg", "gossip"):
                r = decentralised(
                    scenario_raw(args.nodes, args.rounds, args.seed, agg), Path(tmp) / agg
                )
                figures[f"{agg}_acc"] = None if r["acc"] is None else round(float(r["acc"]), 4)
                figures[f"{agg}_wall_s"] = r["wall_s"]
                figures[f"{agg}_mb_sent"] = round(r["bytes_sent_total"] / 1e6, 3)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
