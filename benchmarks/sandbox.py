"""What does the bubblewrap sandbox cost? Worker start-up and an 8-node round, with and without.

* start-up: one ChildProcessRunner worker started and given one trivial job (numpy-only
  task), then closed; confined (bwrap + pids cgroup + Landlock + rlimits) and unconfined
  (`unsafe_no_sandbox=True`: Landlock + rlimits only), interleaved, `--starts` times each.
  Reported: median ms of each, the difference and the ratio.
* round: 8 nodes' workers (one per node, as on 8 real nodes; here on one machine, so they
  share its cores) each run one real training round of taskpacks/fedavg-mlp-digits (torch
  MLP, 1 local epoch on its shard of sklearn's digits). `round1` is the first round, which
  starts the workers (torch import included); `round2` is the next round on the running
  workers, what every later round costs. Confined and unconfined alternate `--repeats`
  times; medians reported, with the overhead in percent.

Prints one JSON line:
{"start_ms_confined", "start_ms_unconfined", "start_overhead_ms", "start_ratio",
 "round1_s_confined", "round1_s_unconfined", "round1_overhead_pct",
 "round2_s_confined", "round2_s_unconfined", "round2_overhead_pct", "bwrap", ...}

    python benchmarks/sandbox.py [--starts 15] [--nodes 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import trio

from p2pfl.runtime import ChildProcessRunner, Evaluate, Limits, TaskSpec, Train

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "taskpacks" / "fedavg-mlp-digits"
TRIVIAL = """
from p2pfl.taskpack.sdk import Task

class Trivial(Task):
    def evaluate(self, ctx, data, weights):
        return {"ok": 1}
"""


def _spec(pack: Path, task_id: str, node: str, **kw: Any) -> TaskSpec:
    kw.setdefault("params", {})
    kw.setdefault("inputs", {})
    return TaskSpec(task_id=task_id, node=node, taskpack_dir=pack, seed=1, **kw)


async def _one_start(runner: ChildProcessRunner, pack: Path, i: int) -> float:
    spec = _spec(pack, f"start-{i}", "bench")
    t0 = time.perf_counter()
    await runner.run(spec, Evaluate(round=0, weights=None))
    elapsed = time.perf_counter() - t0
    await runner.close_task(spec.task_id, spec.node)
    return elapsed


async def bench_start(tmp: Path, starts: int) -> dict[str, Any]:
    pack = tmp / "trivial"
    (pack / "src").mkdir(parents=True)
    (pack / "src" / "task.py").write_text(textwrap.dedent(TRIVIAL))
    confined = ChildProcessRunner(tmp_root=tmp)
    unconfined = ChildProcessRunner(tmp_root=tmp, unsafe_no_sandbox=True)
    times: dict[str, list[float]] = {"confined": [], "unconfined": []}
    await _one_start(confined, pack, -1)  # warm the page cache for both
    await _one_start(unconfined, pack, -2)
    for i in range(starts):
        times["confined"].append(await _one_start(confined, pack, i))
        times["unconfined"].append(await _one_start(unconfined, pack, i))
    c = statistics.median(times["confined"]) * 1000
    u = statistics.median(times["unconfined"]) * 1000
    return {
        "start_ms_confined": round(c, 1),
        "start_ms_unconfined": round(u, 1),
        "start_overhead_ms": round(c - u, 1),
        "start_ratio": round(c / u, 3),
        "bwrap": confined.sandbox,
    }


def _shards(tmp: Path, nodes: int) -> list[Path]:
    from sklearn.datasets import load_digits

    from p2pfl.fl.datasets import write_table

    d = load_digits()
    names = [f"p{i}" for i in range(d.data.shape[1])]
    paths = []
    for n in range(nodes):
        path = tmp / f"digits-{n}.csv"
        write_table(path, d.data[n::nodes], d.target[n::nodes], names)
        paths.append(path)
    return paths


async def _round_pair(
    runner: ChildProcessRunner, shards: list[Path], params: dict[str, Any], tag: str
) -> tuple[float, float]:
    """(first round incl. worker starts, next round) wall seconds for all nodes at once."""
    specs = [
        _spec(
            DIGITS,
            f"round-{tag}",
            f"node-{n}",
            params=params,
            inputs={"digits": path},
            limits=Limits(timeout_s=600),
        )
        for n, path in enumerate(shards)
    ]
    durations = []
    for rnd in (1, 2):
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for spec in specs:
                nursery.start_soon(runner.run, spec, Train(round=rnd, weights=None))
        durations.append(time.perf_counter() - t0)
    await runner.aclose()
    return durations[0], durations[1]


async def bench_round(tmp: Path, nodes: int, repeats: int) -> dict[str, Any]:
    from p2pfl.taskpack.params import load_params

    shards = _shards(tmp, nodes)
    params = load_params(DIGITS, {"local_epochs": "1"})
    runs: dict[str, list[tuple[float, float]]] = {"confined": [], "unconfined": []}
    for i in range(repeats):
        for kind in ("confined", "unconfined") if i % 2 == 0 else ("unconfined", "confined"):
            runner = ChildProcessRunner(tmp_root=tmp, unsafe_no_sandbox=kind == "unconfined")
            runs[kind].append(await _round_pair(runner, shards, params, f"{kind}-{i}"))
    out: dict[str, Any] = {"nodes": nodes, "repeats": repeats}
    for r in (0, 1):
        c = statistics.median(x[r] for x in runs["confined"])
        u = statistics.median(x[r] for x in runs["unconfined"])
        out[f"round{r + 1}_s_confined"] = round(c, 3)
        out[f"round{r + 1}_s_unconfined"] = round(u, 3)
        out[f"round{r + 1}_overhead_pct"] = round(100 * (c - u) / u, 2)
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="p2pfl-bench-sandbox-") as tmp:
        result = await bench_start(Path(tmp), args.starts)
        result.update(await bench_round(Path(tmp), args.nodes, args.repeats))
    return result


if __name__ == "__main__":
    import logging
    import os

    logging.disable(logging.WARNING)  # the unconfined runs warn loudly, by design
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=15)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    result = trio.run(main, ap.parse_args())
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))
