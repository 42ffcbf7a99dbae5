"""The flow tree people read: step state and %, per-node state, round r/R, loss, records."""

from __future__ import annotations

from p2pfl.flow.render import flow_tree, flow_tree_text

PEER_A = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1b2c3"
PEER_B = "12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbd4e5f6"


def status() -> dict:
    return {
        "flow_id": "3f2a9c" + "0" * 26,
        "name": "heart-disease",
        "status": "running",
        "reason": "",
        "steps": [
            {
                "name": "standardise", "state": "succeeded", "percent": 100, "attempts": 1,
                "taskpack": "standardize", "type": "preprocessing", "task": {"phase": "done"},
                "nodes": [{"peer": PEER_A, "state": "done", "round": 1, "rounds": 1, "loss": None,
                           "accuracy": None, "records": 5000}],
                "result": {"metrics": {"records": 5000, "nodes": 1}},
            },
            {
                "name": "train", "state": "running", "percent": 66, "attempts": 2,
                "taskpack": "fedavg-mlp-tabular", "type": "training",
                "task": {"phase": "aggregating", "round": 67},
                "nodes": [{"peer": PEER_B, "state": "training", "round": 67, "rounds": 100,
                           "loss": 0.342, "accuracy": None, "records": 1200}],
                "result": None,
            },
            {"name": "validate", "state": "pending", "percent": 0, "attempts": 0,
             "taskpack": None, "type": None, "task": None, "nodes": [], "result": None},
        ],
    }  # fmt: skip


def test_the_tree_reads_like_the_issue() -> None:
    text = flow_tree_text(status())
    lines = text.splitlines()
    assert lines[0] == "heart-disease flow 3f2a9c000000 - Running"
    assert lines[1] == "├─ Step: standardise [Completed]"
    assert lines[2] == "│  ├─ standardize (Node …a1b2c3) ✓ - 5,000 records processed"
    assert lines[3] == "│  └─ Result: nodes 1, records 5000"
    assert "├─ Step: train [Active - 66%, attempt 2]" in text
    assert "│  ├─ fedavg-mlp-tabular (Node …d4e5f6) - Round 67/100, Loss: 0.342" in text
    assert "Model aggregation - Aggregating round 67" in text
    assert lines[-1] == "└─ Step: validate [Pending]"
    assert max(len(line) for line in lines) <= 80


def test_a_failed_step_shows_its_reason_and_rich_renders() -> None:
    s = status()
    s["status"], s["reason"] = "failed", "step train failed: 3 of 3 nodes declined"
    s["steps"][1].update(state="failed", reason="3 of 3 nodes declined")
    text = flow_tree_text(s)
    assert "Failed" in text and "Reason: 3 of 3 nodes declined" in text
    from rich.console import Console

    con = Console(width=80, record=True)
    con.print(flow_tree(s))
    assert "Step: train [Failed, attempt 2]" in con.export_text()
