"""Reduce-scatter and hierarchical rounds end to end: real node code, real aggregation
and taskpack code, over the simulated network."""

from __future__ import annotations

import pytest

from tests.core.simhelp import digits_split, run, spec


@pytest.fixture(scope="module")
def data6(tmp_path_factory):
    return digits_split(tmp_path_factory.mktemp("d6"), 6, per_node=120)


def _models(cluster):
    machines = [n.core.tasks[cluster.task_id] for n in cluster.nodes]
    return {m.global_ref.cid for m in machines}


def _bytes_per_node(records):
    return sum(r.bytes_received for r in records) / len(records)


def test_reduce_scatter_agrees_and_moves_fewer_bytes_than_all_gather(data6):
    paths, test = data6
    rs, rs_records = run(
        spec(paths, test, params={"rounds": 2, "aggregation": {"kind": "reduce-scatter"}})
    )
    ag, ag_records = run(
        spec(paths, test, params={"rounds": 2, "aggregation": {"kind": "allgather"}})
    )
    assert rs.result["status"] == ag.result["status"] == "succeeded"
    # Bit-identical everywhere. (The two tasks' ids differ with their parameters, and so do
    # their training seeds: tests/core/test_scatter.py compares the bytes of both ways.)
    assert _models(rs) == {rs.result["model_cid"]}
    assert _models(ag) == {ag.result["model_cid"]}
    assert _bytes_per_node(rs_records) < 0.6 * _bytes_per_node(ag_records)


def test_hierarchical_rounds_learn_and_agree(data6):
    paths, test = data6
    params = {"rounds": 2, "aggregation": {"kind": "hierarchical", "group_size": 3}}
    cluster, _ = run(spec(paths, test, params=params))
    assert cluster.result["status"] == "succeeded", cluster.result
    assert _models(cluster) == {cluster.result["model_cid"]}
    assert cluster.final_test_metrics["accuracy"] > 0.7
