"""Issue 4: a task survives a participant, or its coordinator, dying mid-task (SIGKILL)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from p2pfl import Client
from tests.e2e.cluster import Cluster, NodeProc, shard_datasets, trust_first, wait_until
from tests.e2e.test_tasks import FEDAVG, RESULT_FIELDS, run_task, wait_ok

ROUNDS = 8
FIRST_ROUND_TIMEOUT = 120.0
ORPHAN_TIMEOUT = 60.0  # a killed node's worker sees EOF on stdin once its job ends


def wait_first_round(node: NodeProc, task_id: str) -> dict[str, Any]:
    """Follow the task's events on `node` until one says round >= 1; that event."""
    deadline = time.monotonic() + FIRST_ROUND_TIMEOUT
    for event in Client(node.data_dir).events(task_id, deadline=deadline):
        if (event.get("round") or 0) >= 1 and event.get("kind") != "result":
            return event
        if event.get("kind") in ("result", "failed"):
            raise AssertionError(f"task ended before round 1 was seen: {event}")
    raise AssertionError("event stream ended before round 1")


def kill_mid_task(
    cluster: Cluster, nodes: list[NodeProc], task_id: str, pick: str
) -> tuple[NodeProc, NodeProc]:
    """SIGKILL the coordinator (pick="coordinator") or a participant that is neither the
    coordinator nor n0; returns (victim, a surviving observer)."""
    event = wait_first_round(nodes[0], task_id)
    # Over the control socket, not the CLI: a process start can take as long as a round.
    task = Client(nodes[0].data_dir).task(task_id)
    coordinator = task["coordinator"]
    assert coordinator in task["participants"], task
    by_id = {n.peer_id: n for n in nodes}
    if pick == "coordinator":
        victim = by_id[coordinator]
    else:
        victim = next(
            n for n in nodes[1:] if n.peer_id != coordinator and n.peer_id in task["participants"]
        )
    assert task["round"] < ROUNDS, f"too late to kill mid-task: {task['round']}/{ROUNDS} ({event})"
    victim.kill()
    print(
        f"killed {victim.name} ({pick}, publisher={victim is nodes[0]}) at round {task['round']}/{ROUNDS}"
    )
    observer = next(n for n in nodes if n is not victim)
    return victim, observer


def check_survived(
    cluster: Cluster, nodes: list[NodeProc], victim: NodeProc, observer: NodeProc, task_id: str
) -> dict:
    wait_ok(cluster, observer, task_id)
    result = cluster.cli_json("result", task_id, node=observer)
    assert RESULT_FIELDS <= set(result)
    assert result["status"] == "succeeded", result
    assert result["rounds"] == ROUNDS
    assert result["model_cid"]
    assert result["reducer"] != victim.peer_id
    survivors = [n for n in nodes if n is not victim]
    for node in survivors:  # every survivor ends with the same model
        r = wait_until(
            lambda node=node: cluster.try_json("result", task_id, node=node),
            30.0,
            what=f"{node.name} holding the result",
        )
        assert r["model_cid"] == result["model_cid"], (node.name, r)
    # The killed node's sandbox worker must not outlive it for long.
    wait_until(
        lambda: not victim.live_descendants(),
        ORPHAN_TIMEOUT,
        what=f"{victim.name}'s workers exiting",
    )
    # The survivors took a peer's death in stride: clean stop, no traceback.
    for node in survivors:
        node.assert_clean_exit(node.stop())
    return result


@pytest.fixture
def three(cluster: Cluster, digits_split: Path) -> list[NodeProc]:
    return cluster.start(3, datasets=shard_datasets(digits_split), trust=trust_first)


@pytest.mark.slow
def test_participant_killed_mid_task(cluster: Cluster, three: list[NodeProc]) -> None:
    task_id = run_task(cluster, three[0], FEDAVG, f"rounds={ROUNDS}", "local_epochs=1")
    victim, observer = kill_mid_task(cluster, three, task_id, "participant")
    check_survived(cluster, three, victim, observer, task_id)


@pytest.mark.slow
def test_coordinator_killed_mid_task(cluster: Cluster, three: list[NodeProc]) -> None:
    task_id = run_task(cluster, three[0], FEDAVG, f"rounds={ROUNDS}", "local_epochs=1")
    victim, observer = kill_mid_task(cluster, three, task_id, "coordinator")
    check_survived(cluster, three, victim, observer, task_id)
