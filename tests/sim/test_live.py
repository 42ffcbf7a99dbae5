"""LiveCluster: scenarios over real libp2p hosts on 127.0.0.1, all in this process."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.errors import ValidationError
from p2pfl.sim.cluster import ClusterSpec
from p2pfl.sim.data import prepare_node_data
from p2pfl.sim.runner import cluster_spec_kwargs
from p2pfl.sim.scenario import apply_override, load_raw, parse

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "scenarios" / "quickstart.yaml"


def _spec(tmp_path: Path, nodes: int, rounds: int, **extra: object) -> ClusterSpec:
    raw = apply_override(load_raw(QUICKSTART), "nodes", nodes)
    raw = apply_override(raw, "params.rounds", rounds)
    for key, value in extra.items():
        raw = apply_override(raw, key, value)
    scenario = parse(raw, base_dir=QUICKSTART.parent, source=QUICKSTART)
    paths, test = prepare_node_data(scenario, 1, tmp_path)
    kwargs = cluster_spec_kwargs(
        scenario, seed=1, network="libp2p", node_data=paths, test_path=test
    )
    return ClusterSpec(**kwargs)


def test_partition_faults_are_refused_by_name(tmp_path: Path) -> None:
    from p2pfl.sim.live import LiveCluster

    spec = _spec(tmp_path, 3, 2)
    spec.faults = [{"round": 1, "partition": [[0], [1, 2]]}, {"round": 2, "heal": True}]
    with pytest.raises(ValidationError) as info:
        LiveCluster(spec)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "faults[0].partition",
        "faults[1].heal",
    ]
    assert "--network sim" in info.value.problems[0]


@pytest.mark.slow
def test_three_live_nodes_run_two_fedavg_rounds(tmp_path: Path) -> None:
    from p2pfl.sim.live import LiveCluster

    cluster = LiveCluster(_spec(tmp_path, 3, 2), deadline_s=120, start_timeout_s=60)
    records = list(cluster.run())

    assert cluster.result is not None
    assert cluster.result["status"] == "succeeded", cluster.result
    assert sorted((r.node, r.round) for r in records) == [(n, r) for n in range(3) for r in (1, 2)]
    assert all(r.alive for r in records)
    # Every node moved real bytes over its host in every round.
    assert all(r.bytes_sent > 0 and r.bytes_received > 0 for r in records)
    # Test-set metrics of the global model, the same for every node in a round (fedavg).
    for rnd in (1, 2):
        accs = {r.accuracy for r in records if r.round == rnd}
        assert len(accs) == 1 and None not in accs
    assert 0.5 < cluster.final_test_metrics["accuracy"] <= 1.0
    assert cluster.marks["ready"] <= cluster.marks["roster"] <= cluster.marks["result"]
    assert cluster.virtual_s >= cluster.marks["result"]
    assert cluster.pool.jobs > 0 and cluster.job_s > 0
    assert any("link model" in w for w in cluster.warnings)  # the scenario's link is ignored


@pytest.mark.slow
def test_reduce_scatter_over_libp2p_ends_bit_identical(tmp_path: Path) -> None:
    """Five real hosts: updates move by reduce-scatter (asked for) and every node ends
    each round with the same model bytes."""
    from p2pfl.sim.live import LiveCluster

    spec = _spec(tmp_path, 5, 2, **{"params.aggregation": {"kind": "reduce-scatter"}})
    cluster = LiveCluster(spec, deadline_s=600, start_timeout_s=120, volunteer_window_s=30.0)
    list(cluster.run())
    assert cluster.result is not None
    assert cluster.result["status"] == "succeeded", cluster.result
    machines = [n.core.tasks[cluster.task_id] for n in cluster.nodes]
    assert all(m.rounds is not None and m.rounds.scatter is not None for m in machines)
    assert all(m.rounds.closes[2].attempt == 0 for m in machines)
    assert {m.global_ref.cid for m in machines} == {cluster.result["model_cid"]}
    # Every node held slices of the last round: no whole update moved between nodes.
    assert all(len(m.rounds.scatter.mine[2]) == 5 for m in machines)
