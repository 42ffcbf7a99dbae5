"""`p2pfl trace --json` and the Python `Client` against real nodes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from p2pfl import Client
from p2pfl.client import NotFound
from p2pfl.errors import NodeNotRunning
from tests.e2e.cluster import Cluster, NodeProc, shard_datasets, trust_first
from tests.e2e.test_tasks import RESULT_FIELDS, STATS, TASK_TIMEOUT, run_task


@pytest.fixture
def two(cluster: Cluster, digits_split: Path) -> list[NodeProc]:
    return cluster.start(2, datasets=shard_datasets(digits_split), trust=trust_first)


@pytest.mark.slow
def test_trace_json_streams_to_a_result(cluster: Cluster, two: list[NodeProc]) -> None:
    n0, n1 = two
    task_id = run_task(cluster, n0, STATS, "column=pixel_2_2")
    # Followed from a node that did not publish it, too: the same stream ends the same way.
    for node in (n0, n1):
        code, events = cluster.cli_json_lines("trace", task_id, node=node, timeout=TASK_TIMEOUT)
        assert code == 0, events[-3:]
        assert events, "no events"
        for e in events:
            assert {"t", "kind", "task_id", "message", "peer", "round", "metrics", "task"} <= set(
                e
            ), e
            assert e["task_id"] == task_id
        assert [e["t"] for e in events] == sorted(e["t"] for e in events), "events out of order"
        assert events[-1]["kind"] == "result", events[-1]
        assert sum(e["kind"] == "result" for e in events) == 1
        assert events[-1]["task"]["status"] == "succeeded"
        assert events[-1]["metrics"]["count"] > 0

    # A unique prefix of the id works as well.
    code, events = cluster.cli_json_lines("trace", task_id[:10], node=n1)
    assert code == 0 and events[-1]["kind"] == "result"

    # An unknown task: one-line error, non-zero exit.
    proc = cluster.cli("trace", "0" * 32, "--json", node=n0)
    assert (
        proc.returncode != 0 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    )


@pytest.mark.slow
def test_client_api_against_a_real_node(cluster: Cluster, two: list[NodeProc]) -> None:
    n0, n1 = two
    client = Client(n0.data_dir)
    assert client.ping()
    info = client.info()
    assert info["peer_id"] == n0.peer_id
    assert {d["name"] for d in info["datasets"]} == {"digits", "table"}
    assert [p["peer_id"] for p in client.peers()] == [n1.peer_id]

    task_id = client.create_task(STATS, params={"column": "pixel_4_4", "bins": 4})
    assert isinstance(task_id, str) and len(task_id) >= 16

    out = io.StringIO()
    assert client.trace(task_id, out=out, json=True) is True
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[-1]["kind"] == "result"

    waited = client.wait(task_id, timeout=TASK_TIMEOUT)
    result = client.get_result(task_id)
    assert waited == result
    assert RESULT_FIELDS <= set(result)
    assert result["status"] == "succeeded" and result["task_id"] == task_id
    assert len(result["metrics"]["histogram"]["counts"]) == 4
    assert sorted(result["participants"]) == sorted([n0.peer_id, n1.peer_id])
    # The other node holds the same signed result.
    assert Client(n1.data_dir).wait(task_id, timeout=60)["metrics"] == result["metrics"]

    # By cid, once the taskpack is known: a second task, a different id.
    cid = client.task(task_id)["cid"]
    again = client.create_task(cid, params={"column": "pixel_4_4", "bins": 4})
    assert again != task_id
    assert client.wait(again, timeout=TASK_TIMEOUT)["metrics"]["mean"] == result["metrics"]["mean"]

    with pytest.raises(NotFound):
        client.get_result("f" * 32)
    n1.assert_clean_exit(n1.stop())
    with pytest.raises(NodeNotRunning):
        Client(n1.data_dir).ping()
