"""How many nodes can one laptop simulate? Node-rounds per wall second and memory per node.

Runs the shipped scenarios scenarios/scale-1000.yaml (`gossip`: random 8-regular graph,
push-sum, a 784-16-10 MLP on Fashion-MNIST) and scenarios/scale-1000-hierarchical.yaml
(`hierarchical`: exact FedAvg in groups of 32, same model and data) at 100 and 1,000
nodes, each size and kind in a fresh child process so that peak memory is its own. Memory per node is (peak RSS - RSS after imports
and data preparation... of the process) / nodes: the cost of the simulated nodes, not of
Python, torch and the dataset.

Prints one JSON line:
{"gossip": {"n100": {"node_rounds_per_s", "wall_s", "virtual_s", "peak_rss_per_node_mb",
 ...}, "n1000": {...}}, "hierarchical": {...}}

    python benchmarks/scale.py [--sizes 100,1000] [--kinds gossip,hierarchical] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = {
    "gossip": REPO / "scenarios" / "scale-1000.yaml",
    "hierarchical": REPO / "scenarios" / "scale-1000-hierarchical.yaml",
}


def child(nodes: int, rounds: int | None, kind: str) -> dict[str, Any]:
    """One size in this process; returns its figures."""
    import warnings

    import psutil

    warnings.filterwarnings("ignore")
    from p2pfl.sim import runner
    from p2pfl.sim.scenario import apply_override, load_raw, parse

    scenario_path = SCENARIOS[kind]
    raw = apply_override(load_raw(scenario_path), "nodes", nodes)
    if rounds is not None:
        raw = apply_override(raw, "params.rounds", rounds)
    scenario = parse(raw, base_dir=scenario_path.parent, source=scenario_path)
    proc = psutil.Process()
    baseline: dict[str, float] = {}

    def on_progress(record: Any, phase: str) -> None:
        # Baseline once the data are written and the heavy modules imported: what follows
        # is the cluster, i.e. the nodes.
        if phase == "cluster" and not baseline:
            import torch  # noqa: F401 - imported by the taskpack anyway; count it as baseline

            baseline["rss"] = proc.memory_info().rss
            baseline["t"] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="p2pfl-scale-") as tmp:
        summary = runner.run_scenario(
            scenario, out_dir=Path(tmp), progress=on_progress, plots=False
        )
    run_s = time.perf_counter() - baseline["t"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    node_rounds = nodes * summary.rounds_completed
    return {
        "nodes": nodes,
        "status": summary.status,
        "rounds": summary.rounds_completed,
        "node_rounds_per_s": round(node_rounds / run_s, 2),
        "wall_s": round(run_s, 2),
        "wall_s_with_data": summary.wall_s,
        "virtual_s": summary.virtual_s,
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_rss_per_node_mb": round(max(0, peak - baseline["rss"]) / nodes / 2**20, 3),
        "mb_sent": round(summary.bytes_sent_total / 1e6, 2),
        "accuracy_mean": summary.final["accuracy_mean"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--kinds", default="gossip,hierarchical", help="gossip, hierarchical")
    ap.add_argument("--rounds", type=int, default=None, help="default: the scenario's")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-kind", default="gossip", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.rounds, args.child_kind)))
        return 0
    figures: dict[str, Any] = {}
    for kind in args.kinds.split(","):
        if kind not in SCENARIOS:
            ap.error(f"--kinds: {kind!r} is not one of {', '.join(SCENARIOS)}")
        figures[kind] = {}
        for size in (int(s) for s in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--child", str(size), "--child-kind", kind]
            if args.rounds is not None:
                cmd += ["--rounds", str(args.rounds)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                figures[kind][f"n{size}"] = {"error": err}
                continue
            figures[kind][f"n{size}"] = json.loads(lines[-1])
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
