"""Issue 12 end to end: three real nodes train a model, then run inference with it.

Each node applies the trained model (its `model_cid`, from its own store) to its own rows in
batches and keeps the per-record report in its data dir; only counts and the mean score
leave. Also: a test run on 5 records, a new-data-only run after rows are added to one node,
and n2's usage cap declining a fourth inference run in a day.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from p2pfl.client import Client
from tests.e2e.cluster import REPO, Cluster, NodeProc, trust_first, wait_until
from tests.e2e.test_tasks import TASK_TIMEOUT, run_task, wait_ok

DIGITS = REPO / "taskpacks" / "fedavg-mlp-digits"
INFER = REPO / "taskpacks" / "mlp-inference"


def offer_ok(cluster: Cluster, node: NodeProc, *argv: str) -> str:
    """`p2pfl ARGV --json` offering a task with a 30 s volunteer window (a node's first
    sandboxed validate_inputs takes seconds on a loaded machine), waited for until it
    succeeds; the task id."""
    task_id = str(cluster.cli_json(*argv, "--param", "volunteer_window_s=30", node=node)["task_id"])
    proc = cluster.cli(
        "wait", task_id, "--timeout", str(TASK_TIMEOUT), node=node, timeout=TASK_TIMEOUT + 30
    )
    assert proc.returncode == 0, proc.stderr + cluster.diagnostics()
    return task_id


def report(cluster: Cluster, node: NodeProc, task_id: str) -> dict:
    """The node's own report of `task_id` (read from its data dir by `p2pfl reports`)."""
    proc = cluster.cli("reports", "--data-dir", str(node.data_dir), "--json", check=True)
    (mine,) = [r for r in json.loads(proc.stdout) if r["task_id"] == task_id]
    return mine


def labels(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(float(row["label"])) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_inference_with_a_trained_model_reports_stay_local(
    cluster: Cluster, digits_split: Path
) -> None:
    # Private copies of the shards: rows get added to n2's below.
    shards = []
    for i in range(3):
        shard = cluster.root / "data" / f"digits-{i}.csv"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(digits_split / f"node-{i}" / "digits.csv", shard)
        shards.append(shard)
    (cluster.root / "n2").mkdir(parents=True, exist_ok=True)
    (cluster.root / "n2" / "policy.yaml").write_text(
        "datasets:\n"
        "  digits:\n"
        "    allow: ['*']\n"
        "    k: 5\n"
        "    usage:\n"
        "      - {requester: '*', taskpack: mlp-inference, period: day, max_runs: 3}\n"
    )
    cluster.node_args += ["--min-records", "5"]  # k = 5: a 5-record test run may release
    nodes: list[NodeProc] = cluster.start(
        3, datasets=lambda i: {"digits": shards[i]}, trust=trust_first
    )
    n0, n1, n2 = nodes

    # Both taskpacks spread and are verified everywhere before any task is offered.
    cids = {cluster.cli_json("publish", str(pack), node=n0)["cid"] for pack in (DIGITS, INFER)}
    for node in (n1, n2):
        wait_until(
            lambda node=node: (
                cids
                <= {
                    p["cid"]
                    for p in cluster.cli_json("taskpacks", node=node)
                    if p["status"] == "verified"
                }
            ),
            TASK_TIMEOUT,
            what=f"{node.name} verifying both taskpacks",
        )

    # 1. Train; every participant holds the final model in its store.
    trained = offer_ok(cluster, n0, "publish", str(DIGITS), "--run", "--param", "rounds=3")
    model_cid = cluster.cli_json("result", trained, node=n0)["model_cid"]
    assert model_cid
    weights = Client(n0.data_dir).load_model(trained)  # the one call that loads a model
    assert weights["0.weight"].shape == (64, 64) and weights["2.weight"].shape == (10, 64)

    # 2. A test run on 5 records per node, marked as such.
    model = f"model_cid={model_cid}"
    trial = offer_ok(
        cluster, n0, "publish", str(INFER), "--run", "--param", model, "--test-run", "5"
    )
    result = cluster.cli_json("result", trial, node=n0)
    assert result["metrics"]["test_run"] == 5, result
    assert result["metrics"]["records"] == 15, result
    for node in nodes:
        r = report(cluster, node, trial)
        assert (r["rows"], r["test_run"]) == (5, True), r

    # 3. The real run: every row of every node, reports kept where the rows are.
    full = offer_ok(
        cluster, n0, "publish", str(INFER), "--run", "--param", model, "--param", "batch_size=100"
    )
    result = cluster.cli_json("result", full, node=n0)
    rows = [len(labels(s)) for s in shards]
    metrics = result["metrics"]
    # No record failed: a count of 0 is under every node's k, so it is withheld.
    assert metrics["records"] == sum(rows) and metrics["failed"] is None, result
    assert sum(metrics["predictions"].values()) == sum(rows), result  # all classes >= k here
    assert 0.5 < metrics["mean_score"] <= 1.0, result
    text = json.dumps(result)
    assert "row-1" not in text and "prediction" not in text.replace("predictions", "")
    for node, shard, n in zip(nodes, shards, rows, strict=True):
        r = report(cluster, node, full)
        assert Path(r["path"]).parent == node.data_dir / "reports", r
        assert r["rows"] == n and not r["failed"], r
        with open(r["path"], newline="") as f:
            predicted = [int(row["prediction"]) for row in csv.DictReader(f)]
        truth = labels(shard)
        accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / n
        assert accuracy > 0.6, (node.name, accuracy)  # the trained model, not chance (0.1)
    # The publisher followed every node's batches in the trace.
    code, events = cluster.cli_json_lines("trace", full, node=n0)
    assert code == 0
    progress = {
        e["peer"]: e["metrics"]["records_done"]
        for e in events
        if e.get("kind") == "node" and "records_done" in (e.get("metrics") or {})
    }
    assert progress.get(n1.peer_id) == rows[1] and progress.get(n2.peer_id) == rows[2], progress

    # 4. Twelve rows arrive at n2: a new-data-only run processes those and nothing else.
    with open(digits_split / "test.csv", newline="") as f:
        new_rows = list(csv.reader(f))[1:13]
    with open(shards[2], "a", newline="") as f:
        csv.writer(f).writerows(new_rows)
    fresh = offer_ok(
        cluster, n0, "publish", str(INFER), "--run", "--param", model,
        "--param", "min_nodes=1", "--new-data-only",
    )  # fmt: skip
    assert report(cluster, n2, fresh)["rows"] == 12
    assert report(cluster, n0, fresh)["rows"] == 0 and report(cluster, n1, fresh)["rows"] == 0
    seen = json.loads(
        cluster.cli("datasets", "--data-dir", str(n2.data_dir), "--json", check=True).stdout
    )
    (mine,) = [s for s in seen if s["taskpack"] == "mlp-inference"]
    assert mine["processed"] == rows[2] + 12 and mine["runs"] == 3, mine

    # 5. n2 allows three mlp-inference runs a day: the fourth is declined with the numbers.
    fourth = run_task(cluster, n0, INFER, model, "volunteer_window_s=30")
    wait_ok(cluster, n0, fourth)
    check = wait_until(
        lambda: cluster.try_json("policy", "check", fourth, node=n2),
        TASK_TIMEOUT,
        what="n2's decision on the fourth run",
    )
    assert check["allowed"] is False, check
    assert check["reason"] == "dataset digits: limit exceeded: 4 of 3 runs this day", check
    assert check["rule"] == "datasets.digits.usage[0].max_runs", check
    assert n2.peer_id not in cluster.cli_json("result", fourth, node=n0)["participants"]
