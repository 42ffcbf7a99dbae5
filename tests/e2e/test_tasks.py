"""Issue 4: federated tasks over three real nodes, followed through the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.cluster import REPO, Cluster, NodeProc, shard_datasets, trust_first, wait_until

FEDAVG = REPO / "taskpacks" / "fedavg-mlp-digits"
STATS = REPO / "taskpacks" / "federated-stats"
TASK_TIMEOUT = 300  # s, for `p2pfl wait` on a loaded 2-core machine
RESULT_FIELDS = {"task_id", "status", "participants", "rounds", "metrics", "model_cid", "reducer"}


def run_task(cluster: Cluster, node: NodeProc, pack: Path, *params: str) -> str:
    """`p2pfl publish PACK --run --param ...` on `node`; the task id."""
    argv = ["publish", str(pack), "--run"]
    for p in params:
        argv += ["--param", p]
    out = cluster.cli_json(*argv, node=node)
    assert out["task_id"], out
    return str(out["task_id"])


def wait_ok(cluster: Cluster, node: NodeProc, task_id: str) -> None:
    proc = cluster.cli(
        "wait", task_id, "--timeout", str(TASK_TIMEOUT), node=node, timeout=TASK_TIMEOUT + 30
    )
    assert proc.returncode == 0, (
        f"wait exited {proc.returncode}: {proc.stderr}\n{cluster.diagnostics()}"
    )


def result_on_each(
    cluster: Cluster, nodes: list[NodeProc], task_id: str
) -> dict[str, dict[str, Any]]:
    """Each node's `p2pfl result --json` (waiting a little for the result to reach it)."""
    out = {}
    for node in nodes:
        out[node.name] = wait_until(
            lambda node=node: cluster.try_json("result", task_id, node=node),
            30.0,
            what=f"{node.name} holding the result",
        )
    return out


def load_taskpack_module(pack: Path) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"_e2e_{pack.name.replace('-', '_')}", pack / "src" / "task.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_accuracy(model_file: Path, test_csv: Path) -> float:
    import torch

    from p2pfl.fl.datasets import load_table
    from p2pfl.fl.torch_utils import load_numpy_into
    from p2pfl.wire import decode_tensors

    weights = decode_tensors(model_file.read_bytes())
    task = load_taskpack_module(FEDAVG)
    model = task.build_model(64, [64], 10, seed=0)  # the seed only sets the initial weights
    load_numpy_into(model, {k: np.array(v) for k, v in weights.items()})
    X, y, _ = load_table(test_csv)
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(X, dtype=torch.float32)).argmax(dim=1).numpy()
    return float((pred == y).mean())


@pytest.fixture
def three(cluster: Cluster, digits_split: Path) -> list[NodeProc]:
    """Three nodes with a digits shard each; n1 and n2 trust n0 (the publisher)."""
    return cluster.start(3, datasets=shard_datasets(digits_split), trust=trust_first)


@pytest.mark.slow
def test_fedavg_digits_three_nodes(
    cluster: Cluster, three: list[NodeProc], digits_split: Path
) -> None:
    n0 = three[0]
    task_id = run_task(cluster, n0, FEDAVG, "rounds=5")
    wait_ok(cluster, n0, task_id)

    model_file = cluster.root / "model.p2tn"
    result = cluster.cli_json("result", task_id, "--model-out", str(model_file), node=n0)
    assert RESULT_FIELDS <= set(result), result
    assert result["task_id"] == task_id and result["status"] == "succeeded"
    assert sorted(result["participants"]) == sorted(n.peer_id for n in three)
    assert result["rounds"] == 5
    assert result["reducer"] in result["participants"]
    assert result["model_cid"] and model_file.stat().st_size > 0
    assert result["signature_ok"] is True and result["signer"] == result["reducer"]

    acc = model_accuracy(model_file, digits_split / "test.csv")
    print(f"fedavg 3 nodes x 5 rounds: test accuracy {acc:.4f}")
    assert acc >= 0.90, f"accuracy {acc:.3f} on test.csv"

    # Every participant reports the same final model.
    results = result_on_each(cluster, three, task_id)
    cids = {name: r["model_cid"] for name, r in results.items()}
    assert set(cids.values()) == {result["model_cid"]}, cids
    for node in three:
        task = next(t for t in cluster.cli_json("tasks", node=node) if t["task_id"] == task_id)
        assert task["status"] == "succeeded", (node.name, task)


@pytest.mark.slow
def test_federated_stats_exact_mean(
    cluster: Cluster, three: list[NodeProc], digits_split: Path
) -> None:
    import pandas as pd

    column = "pixel_3_3"
    task_id = run_task(cluster, three[0], STATS, f"column={column}")
    wait_ok(cluster, three[0], task_id)
    result = cluster.cli_json("result", task_id, node=three[0])
    assert result["status"] == "succeeded"
    assert len(result["participants"]) == 3

    frames = [pd.read_csv(digits_split / f"node-{i}" / "digits.csv") for i in range(3)]
    union = pd.concat([f[column] for f in frames], ignore_index=True).astype(float)
    metrics = result["metrics"]
    assert metrics["column"] == column
    assert metrics["count"] == len(union)
    assert math.isclose(metrics["mean"], float(union.mean()), rel_tol=1e-9), (
        metrics["mean"],
        union.mean(),
    )
    assert math.isclose(metrics["std"], float(union.std(ddof=0)), rel_tol=1e-9)
    # Exact extremes identify single records: they leave only where a site's policy says
    # `extremes: allow`, and these nodes have no policy.yaml.
    assert metrics["min"] is None and metrics["max"] is None
    assert result["model_cid"] is None

    # A node that runs for months restarts: its finished tasks still answer.
    three[1].stop(timeout=30)
    again = cluster.restart(three[1])
    assert cluster.cli_json("result", task_id, node=again)["metrics"]["mean"] == metrics["mean"]
    listed = cluster.cli_json("tasks", node=again)
    assert [t["status"] for t in listed if t["task_id"] == task_id] == ["succeeded"]


@pytest.mark.slow
def test_dp_run_reports_epsilon_within_budget(cluster: Cluster, three: list[NodeProc]) -> None:
    n0 = three[0]
    budget = 8.0
    task_id = run_task(
        cluster,
        n0,
        FEDAVG,
        "rounds=3",
        "differential_privacy.enabled=true",
        f"differential_privacy.epsilon={budget:g}",
    )
    wait_ok(cluster, n0, task_id)
    result = cluster.cli_json("result", task_id, node=n0)
    code, events = cluster.cli_json_lines("trace", task_id, node=n0)
    assert code == 0

    # epsilon per node: from the node events' metrics, and the last task summary's nodes.
    per_node: dict[str, float] = {}
    for e in events:
        eps = (e.get("metrics") or {}).get("epsilon")
        if e.get("peer") and isinstance(eps, int | float):
            per_node[e["peer"]] = max(per_node.get(e["peer"], 0.0), float(eps))
    for peer, state in (events[-1].get("task") or {}).get("nodes", {}).items():
        if state.get("epsilon") is not None:
            per_node[peer] = max(per_node.get(peer, 0.0), float(state["epsilon"]))
    assert set(per_node) >= set(result["participants"]), (per_node, result["participants"])
    print(f"DP epsilon per node (budget {budget:g}): {sorted(per_node.values())}")
    for peer, eps in per_node.items():
        assert 0 < eps <= budget, (peer, eps)
    if "epsilon" in result["metrics"]:
        assert 0 < result["metrics"]["epsilon"] <= budget


@pytest.mark.slow
def test_dp_budget_too_small_fails_with_the_reason(cluster: Cluster, three: list[NodeProc]) -> None:
    n0 = three[0]
    task_id = run_task(
        cluster,
        n0,
        FEDAVG,
        "rounds=2",
        "differential_privacy.enabled=true",
        "differential_privacy.epsilon=0.05",
    )
    proc = cluster.cli("wait", task_id, "--timeout", str(TASK_TIMEOUT), "--json", node=n0)
    assert proc.returncode == 1, proc.stdout  # failed, not hung or succeeded
    code, events = cluster.cli_json_lines("trace", task_id, node=n0)
    assert code == 1 and events[-1]["task"]["status"] == "failed"
    assert any("privacy budget" in e["message"] for e in events), [e["message"] for e in events]
    # What a person sees first: the failure reason itself should name the cause.
    reason = json.loads(proc.stdout)["reason"]
    assert "privacy budget" in reason.lower(), reason
