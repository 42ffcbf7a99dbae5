"""The task protocol end to end: real node code over the simulated network.

Offer -> volunteer -> roster -> rounds -> reduce -> signed result, with crashes of a
participant and of the coordinator, too few volunteers, analysis exactness, the k policy,
gossip averaging and determinism.
"""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.fl.datasets import load_table
from tests.core.simhelp import STATS, digits_split, run, spec


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    return digits_split(tmp_path_factory.mktemp("d4"), 4, per_node=200)


@pytest.fixture(scope="module")
def data5(tmp_path_factory):
    return digits_split(tmp_path_factory.mktemp("d5"), 5, per_node=150)


def _machines(cluster):
    return [n.core.tasks[cluster.task_id] for n in cluster.nodes if cluster.task_id in n.core.tasks]


def test_fedavg_every_participant_holds_the_same_model(data4):
    paths, test = data4
    cluster, records = run(spec(paths, test))
    result = cluster.result
    assert result["status"] == "succeeded", result
    assert result["rounds"] == 3
    assert sorted(result["participants"]) == sorted(n.identity.peer_id for n in cluster.nodes)
    # Bit-identical global model everywhere: the same content id at every participant.
    assert {m.global_ref.cid for m in _machines(cluster)} == {result["model_cid"]}
    assert {(r.node, r.round) for r in records} == {(i, r) for i in range(4) for r in (1, 2, 3)}
    assert cluster.final_test_metrics["accuracy"] > 0.8
    # The reducer signed the result and every node stored the same one.
    assert {m.result.reducer for m in _machines(cluster)} == {result["reducer"]}
    # Old rounds' updates were forgotten: each store holds the taskpack and the final model.
    for node in cluster.nodes:
        assert set(node.store.list()) == {result["cid"], result["model_cid"]}


def test_same_seed_same_records(data4):
    paths, test = data4
    _, first = run(spec(paths, test, params={"rounds": 2}))
    _, second = run(spec(paths, test, params={"rounds": 2}))
    assert first == second


def _roster_order(paths, test):
    cluster, _ = run(spec(paths, test, params={"rounds": 1}))
    machine = cluster.nodes[0].core.tasks[cluster.task_id]
    index = {n.identity.peer_id: n.index for n in cluster.nodes}
    return [index[p] for p in machine.participants]


def test_participant_crash_mid_task_still_ends_in_a_result(data5):
    paths, test = data5
    order = _roster_order(paths, test)
    victim = order[-1]  # the worst-ranked participant: neither coordinator nor reducer
    cluster, records = run(
        spec(
            paths,
            test,
            params={"rounds": 4, "min_nodes": 3},
            faults=[{"round": 2, "crash": [victim]}],
        )
    )
    assert cluster.result["status"] == "succeeded", cluster.result
    victim_id = cluster.nodes[victim].identity.peer_id
    assert victim_id not in cluster.result["participants"]
    assert len(cluster.result["participants"]) == 4
    assert not any(r.node == victim and r.round >= 2 and r.alive for r in records)


def test_coordinator_crash_mid_task_next_in_rank_takes_over(data5):
    paths, test = data5
    order = _roster_order(paths, test)
    coordinator = order[0]
    assert coordinator != 0 or len(order) > 1
    cluster, _ = run(
        spec(
            paths,
            test,
            params={"rounds": 4, "min_nodes": 3},
            faults=[{"round": 3, "crash": [coordinator]}],
        )
    )
    result = cluster.result
    assert result["status"] == "succeeded", result
    gone = cluster.nodes[coordinator].identity.peer_id
    assert result["reducer"] != gone
    assert result["rounds"] == 4
    survivors = [m for m in _machines(cluster) if m.my_id != gone]
    assert {m.global_ref.cid for m in survivors} == {result["model_cid"]}


def test_too_few_volunteers_fails_with_the_reason(data4):
    paths, test = data4
    cluster, records = run(spec(paths, test, params={"rounds": 2, "min_nodes": 6, "max_nodes": 8}))
    assert cluster.result["status"] == "failed"
    assert "only 4 volunteers" in cluster.result["reason"]
    assert "min_nodes is 6" in cluster.result["reason"]
    assert records == []


def test_analysis_returns_the_exact_mean_of_the_union(data4):
    paths, _ = data4
    cluster, _ = run(
        spec(paths, None, taskpack_dir=STATS, input_name="table", params={"column": "pixel_0_4"})
    )
    result = cluster.result
    assert result["status"] == "succeeded", result
    columns = [load_table(p) for p in paths]
    col = columns[0][2].index("pixel_0_4")
    union = np.concatenate([X[:, col] for X, _, _ in columns]).astype(np.float64)
    assert result["metrics"]["count"] == len(union)
    assert result["metrics"]["mean"] == pytest.approx(float(union.mean()), rel=1e-12)


def test_k_policy_refuses_small_aggregates(data4):
    paths, _ = data4
    cluster, _ = run(
        spec(
            paths,
            None,
            taskpack_dir=STATS,
            input_name="table",
            params={"column": "pixel_0_4"},
            min_records=10_000,
        )
    )
    assert cluster.result["status"] == "failed"
    assert "4 of 4 nodes declined: fewer than 10000 records (k policy)" in cluster.result["reason"]
    declines = cluster.nodes[0].core.tasks[cluster.task_id].declines
    assert len(declines) == 4 and all("k policy" in why for why in declines.values())


def test_gossip_push_sum_learns(data5):
    paths, test = data5
    cluster, records = run(
        spec(
            paths,
            test,
            params={"rounds": 4, "protocol": "gossip", "fanout": 2},
            topology={"kind": "ring"},
        )
    )
    assert cluster.result["status"] == "succeeded", cluster.result
    last = [r.accuracy for r in records if r.round == 4]
    assert len(last) == 5 and min(last) > 0.7


@pytest.mark.slow
def test_krum_resists_a_scaling_attacker(tmp_path):
    paths, test = digits_split(tmp_path, 7, per_node=150)
    byz = {"nodes": [5, 6], "attack": "scaled"}
    plain, _ = run(spec(paths, test, params={"rounds": 4, "aggregator": "fedavg"}, byzantine=byz))
    robust, _ = run(spec(paths, test, params={"rounds": 4, "aggregator": "krum"}, byzantine=byz))
    assert robust.result["status"] == "succeeded"
    assert robust.final_test_metrics["accuracy"] > 0.8
    assert robust.final_test_metrics["accuracy"] > plain.final_test_metrics["accuracy"] + 0.05


def test_lossy_links_are_survived_by_retrying_fetches(data4):
    """30% of direct messages and fetches are lost: fetches are retried from the live
    author instead of dropping its update, and every round keeps all four updates."""
    paths, test = data4
    cluster, _ = run(spec(paths, test, link={"latency_ms": 20, "bandwidth_mbps": 100, "loss": 0.3}))
    assert cluster.result["status"] == "succeeded", cluster.result
    machine = cluster.nodes[0].core.tasks[cluster.task_id]
    assert all(len(c.included) == 4 for c in machine.rounds.closes.values())


def test_silent_coordinator_is_replaced_after_a_grace(data5, monkeypatch):
    """The coordinator stays connected but never closes a round: after the deadline and
    one grace period the next in rank closes it, and the task completes."""
    from p2pfl.core.fedavg_rounds import FedAvgRounds as Rounds
    from p2pfl.sim.cluster import SimCluster

    paths, test = data5
    order = _roster_order(paths, test)
    silent = SimCluster(spec(paths, test)).identities[order[0]].peer_id
    close = Rounds._close

    def mute(self, now, rnd):
        return [] if self.task.my_id == silent else close(self, now, rnd)

    monkeypatch.setattr(Rounds, "_close", mute)
    cluster, _ = run(spec(paths, test, params={"rounds": 2, "deadline_s": 5}))
    assert cluster.result["status"] == "succeeded", cluster.result
    closes = cluster.nodes[0].core.tasks[cluster.task_id].rounds.closes
    assert sorted(closes) == [1, 2]
    assert all(c.peer != silent for c in closes.values())
