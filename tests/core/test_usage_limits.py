"""Usage caps in the protocol: decided by the site policy's decision path before any code
runs, with the numbers in the decline; a test run asks for (and is counted as) N records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pfl.policy import parse_policy
from p2pfl.policy.usage import UsageLedger
from tests.core.harness import Harness, done

FED = {
    "protocol": "fedavg", "aggregator": "fedavg", "rounds": 1, "min_nodes": 1,
    "max_nodes": 10, "fanout": 2, "mu": 0.0, "deadline_s": 10.0,
    "differential_privacy": {"enabled": False},
}  # fmt: skip


def harness(
    tmp_path: Path, usage: list[dict[str, Any]], taskpack: str = "mlp-inference"
) -> Harness:
    def make(peers: list[str]) -> Any:
        doc = {
            "requesters": {"lab": [peers[0]]},
            "datasets": {"data": {"allow": ["lab"], "usage": usage}},
        }
        return parse_policy(doc, own_peer=peers[1])

    h = Harness(2, sites={1: make}, taskpack=taskpack)
    h.nodes[1].core.usage = UsageLedger(tmp_path / "usage-ledger.json")
    return h


def offer(h: Harness, run: dict[str, Any] | None = None) -> str:
    task_id, cmds = h.nodes[0].core.create_task(h.cid, {}, FED, ("data",), h.now, run=run)
    h._execute(h.nodes[0], cmds)
    h.run()
    return task_id


def test_a_task_over_the_records_cap_is_declined_and_a_test_run_fits(tmp_path: Path) -> None:
    cap = [{"requester": "lab", "taskpack": "*", "period": "month", "max_records": 50}]
    h = harness(tmp_path, cap)
    big = offer(h)  # 100 rows on node 1
    refused = h.nodes[1].core.tasks[big]
    assert refused.declines[refused.my_id] == (
        "dataset data: limit exceeded: 100 of 50 records this month"
    )
    assert h.nodes[1].core.policy_decision(big)["rule"] == "datasets.data.usage[0].max_records"
    # A test run on 5 records asks for 5: allowed, and the offer carries it (signed).
    small = offer(h, run={"test_run": 5})
    assert h.nodes[1].peer in done(h, small)[0].result.participants
    assert h.nodes[1].core.tasks[small].offer.run == {"test_run": 5}


def test_runs_used_this_period_count(tmp_path: Path) -> None:
    cap = [{"requester": "*", "taskpack": "fedavg-mlp-digits", "period": "day", "max_runs": 1}]
    h = harness(tmp_path, cap, taskpack="fedavg-mlp-digits")
    ledger = h.nodes[1].core.usage
    ledger.charge(
        task_id="f" * 32, requester=h.nodes[0].peer, taskpack="fedavg-mlp-digits",
        datasets=("data",), records=10, t=h.now,
    )  # fmt: skip
    task_id = offer(h)
    refused = h.nodes[1].core.tasks[task_id]
    assert refused.declines[refused.my_id] == "dataset data: limit exceeded: 2 of 1 runs this day"


def test_a_test_run_on_a_task_that_is_not_batched_counts_every_row(tmp_path: Path) -> None:
    # Only inference runs on at most N records: a training offer claiming a test run
    # still reads all 100 rows, and is counted so (a cap cannot be dodged that way).
    cap = [{"requester": "lab", "taskpack": "*", "period": "month", "max_records": 50}]
    h = harness(tmp_path, cap, taskpack="fedavg-mlp-digits")
    task_id = offer(h, run={"test_run": 5})
    refused = h.nodes[1].core.tasks[task_id]
    assert refused.declines[refused.my_id] == (
        "dataset data: limit exceeded: 100 of 50 records this month"
    )
