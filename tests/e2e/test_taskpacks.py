"""Issue 3: a published taskpack spreads by cid; trusting nodes verify it, a node that does
not trust the publisher rejects it and never runs it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.cluster import REPO, Cluster, NodeProc, shard_datasets, wait_until

STATS = REPO / "taskpacks" / "federated-stats"
SPREAD_TIMEOUT = 60.0


def _listing(cluster: Cluster, node: NodeProc, cid: str) -> dict | None:
    for item in cluster.cli_json("taskpacks", node=node):
        if item["cid"] == cid:
            return item
    return None


@pytest.mark.slow
def test_publish_verified_by_trusting_nodes_rejected_by_others(
    cluster: Cluster, digits_split: Path
) -> None:
    datasets = shard_datasets(digits_split)
    n0 = cluster.start_node("n0", datasets=datasets(0))
    n1 = cluster.start_node(
        "n1", bootstrap=[n0.bootstrap_addr], datasets=datasets(1), trust=[n0.peer_id]
    )
    n2 = cluster.start_node(
        "n2", bootstrap=[n0.bootstrap_addr], datasets=datasets(2), trust=[n1.peer_id]
    )
    cluster.wait_connected([n0, n1, n2])

    pub = cluster.cli_json("publish", str(STATS), node=n0)
    assert set(pub) == {"cid", "name", "version", "publisher"}, pub
    assert pub["name"] == "federated-stats" and pub["version"] == "1.0.0"
    assert pub["publisher"] == n0.peer_id
    assert pub["cid"].startswith("b")  # a CIDv1 in base32

    mine = _listing(cluster, n0, pub["cid"])
    assert mine is not None and mine["status"] == "verified", mine

    got = wait_until(
        lambda: (
            (item := _listing(cluster, n1, pub["cid"])) and item["status"] == "verified" and item
        ),
        SPREAD_TIMEOUT,
        what="n1 verifying the published taskpack",
    )
    assert got["cid"] == pub["cid"] and got["publisher"] == n0.peer_id

    rejected = wait_until(
        lambda: (
            (item := _listing(cluster, n2, pub["cid"])) and item["status"] == "rejected" and item
        ),
        SPREAD_TIMEOUT,
        what="n2 rejecting the untrusted taskpack",
    )
    assert rejected["reason"] == "untrusted-publisher", rejected

    # Run it: n0 and n1 take part, n2 (no trust) must not.
    out = cluster.cli_json("publish", str(STATS), "--run", "--param", "column=pixel_0_4", node=n0)
    assert out["cid"] == pub["cid"], "publishing the same directory twice changed the cid"
    task_id = out["task_id"]
    code = cluster.cli("wait", task_id, "--timeout", "120", node=n0).returncode
    assert code == 0, cluster.diagnostics()
    result = cluster.cli_json("result", task_id, node=n0)
    assert sorted(result["participants"]) == sorted([n0.peer_id, n1.peer_id])
    assert n2.peer_id not in result["participants"]

    # n2 knows of the task (the offer is gossiped) but never volunteered or ran it.
    for task in cluster.cli_json("tasks", node=n2):
        if task["task_id"] == task_id:
            assert n2.peer_id not in task["participants"]
            assert task["nodes"].get(n2.peer_id, {}).get("state") in (None, "declined"), task
    code, events = cluster.cli_json_lines("trace", task_id, node=n0)
    assert code == 0
    n2_events = [
        e["message"] for e in events if e.get("peer") == n2.peer_id and e["kind"] == "node"
    ]
    assert n2_events == ["declined: taskpack untrusted-publisher"], n2_events
    assert _listing(cluster, n2, pub["cid"])["status"] == "rejected"


@pytest.mark.slow
def test_late_joiner_learns_earlier_taskpacks(cluster: Cluster, digits_split: Path) -> None:
    datasets = shard_datasets(digits_split)
    n0 = cluster.start_node("n0", datasets=datasets(0))
    pub = cluster.cli_json("publish", str(STATS), node=n0)
    # Past gossipsub's message cache (a few heartbeats), which would otherwise hand the
    # announcement to a peer that joins right after it was published.
    time.sleep(10)
    late = cluster.start_node(
        "late", bootstrap=[n0.bootstrap_addr], datasets=datasets(1), trust=[n0.peer_id]
    )
    cluster.wait_connected([n0, late])
    wait_until(
        lambda: (item := _listing(cluster, late, pub["cid"])) and item["status"] == "verified",
        30.0,
        what="the late joiner verifying the earlier taskpack",
    )


@pytest.mark.slow
def test_restarted_publisher_keeps_and_runs_its_taskpack(
    cluster: Cluster, digits_split: Path
) -> None:
    datasets = shard_datasets(digits_split)
    n0 = cluster.start_node("n0", datasets=datasets(0))
    n1 = cluster.start_node(
        "n1", bootstrap=[n0.bootstrap_addr], datasets=datasets(1), trust=[n0.peer_id]
    )
    cluster.wait_connected([n0, n1])
    pub = cluster.cli_json("publish", str(STATS), node=n0)
    wait_until(
        lambda: (item := _listing(cluster, n1, pub["cid"])) and item["status"] == "verified",
        SPREAD_TIMEOUT,
        what="n1 verifying the taskpack",
    )

    n0.assert_clean_exit(n0.stop())
    n0 = cluster.restart(n0, datasets=datasets(0), bootstrap=[n1.bootstrap_addr])
    cluster.wait_connected([n0, n1])
    item = wait_until(
        lambda: (
            (item := _listing(cluster, n0, pub["cid"])) and item["status"] != "fetching" and item
        ),
        SPREAD_TIMEOUT,
        what="n0 re-checking its own taskpack",
    )
    assert item["status"] == "verified", item

    # Runnable by cid after the restart, with n1 taking part.
    task_id = cluster.cli_json(
        "publish", str(STATS), "--run", "--param", "column=pixel_1_1", node=n0
    )["task_id"]
    assert cluster.cli("wait", task_id, "--timeout", "120", node=n0).returncode == 0, (
        cluster.diagnostics()
    )
    assert len(cluster.cli_json("result", task_id, node=n0)["participants"]) == 2
