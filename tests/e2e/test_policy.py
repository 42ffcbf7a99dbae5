"""Issue 9 end to end: three real nodes where one dataset is private to one requester.

n2's policy.yaml lets only lab-a (n1) use its `table`; n0 and n1 keep the local network's
development default for their own data. A federated-stats task offered by n1 (a requester
that did not publish the taskpack) runs on all three; the same task offered by n0 is
declined by n2 with the rule, and the audit log and `policy check` say so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.identity import Identity
from tests.e2e.cluster import Cluster, NodeProc, shard_datasets, trust_first, wait_until
from tests.e2e.test_tasks import STATS, TASK_TIMEOUT, run_task, wait_ok


@pytest.mark.slow
def test_a_dataset_private_to_one_requester(cluster: Cluster, digits_split: Path) -> None:
    # Identities first (a node creates its key on first start): n2's policy names n1.
    lab_a = Identity.load_or_create(cluster.root / "n1").peer_id
    (cluster.root / "n2").mkdir(parents=True, exist_ok=True)
    (cluster.root / "n2" / "policy.yaml").write_text(
        f"requesters: {{lab-a: [{lab_a}]}}\n"
        "datasets:\n"
        "  table:\n"
        "    allow: [lab-a]\n"
        "    types: [analysis]\n"
        "    k: 10\n"
    )
    nodes: list[NodeProc] = cluster.start(
        3, datasets=shard_datasets(digits_split), trust=trust_first
    )
    n0, n1, n2 = nodes
    assert n1.peer_id == lab_a

    # n0 publishes federated-stats and offers it: n2 declines by its policy.
    declined = run_task(cluster, n0, STATS, "column=pixel_3_3")
    wait_ok(cluster, n0, declined)
    result = cluster.cli_json("result", declined, node=n0)
    assert sorted(result["participants"]) == sorted([n0.peer_id, n1.peer_id])
    check = cluster.cli_json("policy", "check", declined, node=n2)
    assert check["rule"] == "datasets.table.allow", check
    assert check["reason"] == (f"dataset table: requester {n0.peer_id} is not in allow [lab-a]"), (
        check
    )

    # n1 runs the same verified taskpack by name: its own signed offer, welcome at n2.
    offered = cluster.cli_json("run", "federated-stats", "--param", "column=pixel_3_3", node=n1)[
        "task_id"
    ]
    wait_ok(cluster, n1, offered)
    result = cluster.cli_json("result", offered, node=n1)
    assert sorted(result["participants"]) == sorted(n.peer_id for n in nodes)

    # The audit log of n2 holds both decisions, with their rules.
    audit = wait_until(
        lambda: (
            [
                e
                for e in cluster.cli_json("audit", node=n2)
                if e.get("kind") == "offer" and e.get("task") in (declined, offered)
            ]
            or None
        ),
        TASK_TIMEOUT,
        what="n2's audit of both offers",
    )
    decisions = {e["task"]: (e["decision"], e["rule"]) for e in audit}
    assert decisions == {
        declined: ("declined", "datasets.table.allow"),
        offered: ("allowed", "policy"),
    }
