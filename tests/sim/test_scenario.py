from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.errors import ValidationError
from p2pfl.sim.scenario import apply_override, load_scenario, parse, scenario_problems

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "scenarios").glob("*.yaml"))
EXPECTED = {
    "quickstart", "fashion-mnist-noniid", "hospitals", "churn", "byzantine", "dp", "scale-1000",
    "scale-1000-hierarchical",
}  # fmt: skip


def base() -> dict:
    return {
        "name": "t",
        "seed": 3,
        "nodes": 8,
        "dataset": {"name": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "taskpack": "taskpacks/whatever",
        "params": {"rounds": 5},
    }


def test_every_expected_scenario_is_shipped() -> None:
    assert EXPECTED <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenarios_validate(path: Path) -> None:
    s = load_scenario(path)  # with check_files: the taskpack must exist
    assert s.name == path.stem
    assert s.params.rounds >= 1
    # The taskpack reference resolves against the repo root, not the scenarios/ dir.
    assert s.taskpack.parent.name == "taskpacks"
    assert s.taskpack.parent.parent == REPO


def test_shipped_specifics() -> None:
    quick = load_scenario(REPO / "scenarios/quickstart.yaml", check_files=False)
    assert (quick.nodes, quick.rounds, quick.topology.kind) == (8, 10, "full")
    assert quick.dataset.partition.alpha == 0.5 and not quick.faults
    churn = load_scenario(REPO / "scenarios/churn.yaml", check_files=False)
    assert [f.action for f in churn.faults] == ["crash", "partition", "heal", "restart"]
    scale = load_scenario(REPO / "scenarios/scale-1000.yaml", check_files=False)
    assert scale.nodes == 1000 and scale.topology.degree == 8 and scale.params.protocol == "gossip"
    dp = load_scenario(REPO / "scenarios/dp.yaml", check_files=False)
    assert dp.dp is not None and dp.dp.epsilon == 8.0


def test_defaults_and_seed_override() -> None:
    s = parse(base(), seed=11, check_files=False)
    assert s.seed == 11
    assert s.topology.kind == "full"
    assert s.network.latency_ms == 20.0 and s.dataset.test_fraction == 0.2
    assert s.params.as_dict() == {
        "rounds": 5, "local_epochs": 1, "aggregator": "fedavg", "protocol": "fedavg",
    }  # fmt: skip


def test_gossip_aggregator_implies_protocol_and_extra_params_pass_through() -> None:
    raw = base()
    raw["params"] = {
        "rounds": 2,
        "aggregator": "gossip",
        "fanout": 3,
        "lr": 0.1,
        "hidden": [32, 16],
    }
    p = parse(raw, check_files=False).params
    assert (p.protocol, p.aggregator) == ("gossip", "fedavg")
    assert p.as_dict()["hidden"] == [32, 16] and p.as_dict()["fanout"] == 3


def test_broken_scenario_lists_every_problem_by_path() -> None:
    raw = base()
    raw.update(
        colour="blue",
        nodes=8,
        topology={"kind": "random-regular"},
        network={"loss": 1.5, "jitter": 3},
        faults=[
            {"round": 3, "crash": [2, 9]},
            {"round": 4, "partition": [[0, 1, 2], [2, 3]]},
            {"round": 99, "heal": True},
            {"round": 5},
        ],
        byzantine={"nodes": [1], "attack": "lie"},
        dp={"epsilon": -1},
    )
    raw["dataset"]["partition"] = {"kind": "dirichlet", "alpha": 0}
    raw["params"] = {"rounds": 10, "aggregator": "mean", "local_epochs": True}
    with pytest.raises(ValidationError) as info:
        parse(raw, check_files=False)
    problems = info.value.problems
    expected = [
        "colour: unknown key",
        "topology.degree: required for random-regular",
        "dataset.partition.alpha: must be > 0",
        "params.aggregator: unknown aggregator 'mean'",
        "params.local_epochs: must be an integer",
        "network.loss: must be >= 0 and < 1",
        "network.jitter: unknown key",
        "faults[0].crash[1]: node 9 out of range 0..7",
        "faults[1].partition: groups must cover each node at most once",
        "faults[2].round: must be in 1..10",
        "faults[3]: needs exactly one of",
        "byzantine.attack: unknown attack 'lie'",
        "dp.epsilon: must be > 0",
    ]
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    assert len(problems) == len(expected)
    assert "faults[1].partition: groups must cover each node at most once" in str(info.value)


def test_aggregator_protocol_conflict() -> None:
    raw = base()
    raw["params"] = {"rounds": 2, "aggregator": "gossip", "protocol": "fedprox"}
    assert scenario_problems(raw) == ["params.protocol: 'fedprox' contradicts aggregator 'gossip'"]


def test_fault_order_is_checked() -> None:
    raw = base()
    raw["faults"] = [
        {"round": 2, "restart": [1]},
        {"round": 3, "crash": [4]},
        {"round": 4, "crash": [4]},
    ]
    assert scenario_problems(raw) == [
        "faults[0].restart: node 1 is not down at round 2",
        "faults[2].crash: node 4 is already down at round 4",
    ]


@pytest.mark.parametrize(
    ("patch", "problem"),
    [
        ({"nodes": 0}, "nodes: must be >= 1, got 0"),
        ({"nodes": "8"}, "nodes: must be an integer, got '8'"),
        ({"params": {"rounds": 0}}, "params.rounds: must be >= 1, got 0"),
        ({"params": {}}, "params.rounds: required"),
        ({"dataset": {"name": "digits", "partition": {"kind": "natural"}}},
         "dataset.partition.kind: dataset 'digits' has no natural split (sites)"),
        ({"dataset": {"name": "heart-disease", "partition": {"kind": "natural"}}},
         "dataset.partition.kind: natural split of heart-disease needs nodes == 4 (one site each)"),
        ({"topology": {"kind": "random-regular", "degree": 3}, "nodes": 9},
         "topology.degree: nodes x degree must be even (9 x 3)"),
        ({"topology": {"kind": "ring", "degree": 2}},
         "topology.degree: only for random-regular and small-world, not ring"),
        ({"byzantine": {"nodes": list(range(8)), "attack": "sign-flip"}},
         "byzantine.nodes: at least one node must stay honest"),
        ({"taskpack": 3}, "taskpack: must be a directory path (string)"),
        ({"params": {"rounds": 2, "aggregator": "fedprox"}},
         "params.mu: required (> 0) with fedprox; mu 0 would silently run plain FedAvg"),
        ({"params": {"rounds": 2, "protocol": "fedprox", "mu": 0}},
         "params.mu: required (> 0) with fedprox; mu 0 would silently run plain FedAvg"),
        ({"byzantine": {"nodes": [1], "attack": "gaussian-noise", "scale": 2}},
         "byzantine.scale: only for the scaled and sign-flip attacks"),
    ],
)  # fmt: skip
def test_single_problems(patch: dict, problem: str) -> None:
    raw = base()
    raw.update(patch)
    assert scenario_problems(raw) == [problem]


def test_missing_taskpack_is_reported_when_checking_files(tmp_path: Path) -> None:
    raw = base()
    raw["taskpack"] = str(tmp_path / "nope")
    assert scenario_problems(raw, check_files=True) == [
        f"taskpack: no such directory: {tmp_path / 'nope'}"
    ]
    from p2pfl.taskpack.scaffold import new_taskpack

    new_taskpack("tp", "training", tmp_path)
    raw["taskpack"] = "tp"
    raw["params"] = {"rounds": 2, "features": ["pixel_0_1"], "label": "label"}
    s = parse(raw, base_dir=tmp_path)
    assert s.taskpack == tmp_path / "tp"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no such file"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValidationError, match="not valid YAML"):
        load_scenario(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ValidationError, match="must be a mapping"):
        load_scenario(bad)


def test_apply_override() -> None:
    raw = base()
    out = apply_override(raw, "params.aggregator", "median")
    assert out["params"]["aggregator"] == "median" and "aggregator" not in raw["params"]
    assert apply_override(raw, "network.latency_ms", 5)["network"] == {"latency_ms": 5}
    with pytest.raises(ValidationError, match="nodes is not a mapping"):
        apply_override(raw, "nodes.x", 1)
    with pytest.raises(ValidationError, match="not a dotted path"):
        apply_override(raw, "params..x", 1)


def test_hierarchical_topology_becomes_a_full_mesh_with_grouped_rounds() -> None:
    from p2pfl.sim.runner import cluster_spec_kwargs

    raw = dict(base(), topology={"kind": "hierarchical", "group_size": 4})
    s = parse(raw, check_files=False)
    assert (s.topology.kind, s.topology.group_size) == ("hierarchical", 4)
    kw = cluster_spec_kwargs(s, seed=1, network="sim", node_data=[], test_path=Path("t"))
    assert kw["topology"] == {"kind": "full"}
    assert kw["params"]["aggregation"] == {"kind": "hierarchical", "group_size": 4}
    assert (
        parse(
            dict(base(), topology={"kind": "hierarchical"}), check_files=False
        ).topology.group_size
        == 8
    )
    scale = load_scenario(REPO / "scenarios/scale-1000-hierarchical.yaml", check_files=False)
    assert scale.nodes == 1000 and scale.topology.group_size == 32


@pytest.mark.parametrize(
    ("topology", "params", "problem"),
    [
        ({"kind": "hierarchical", "group_size": 1}, {}, "topology.group_size"),
        ({"kind": "ring", "group_size": 4}, {}, "topology.group_size: only for hierarchical"),
        (
            {"kind": "full"},
            {"aggregation": {"kind": "tree"}},
            "params.aggregation: aggregation kind",
        ),
        (
            {"kind": "full"},
            {"aggregation": {"kind": "allgather", "group_size": 3}},
            "params.aggregation",
        ),
    ],
)
def test_bad_aggregation_settings_are_named(topology: dict, params: dict, problem: str) -> None:
    raw = dict(base(), topology=topology, params={"rounds": 2, **params})
    problems = scenario_problems(raw)
    assert any(problem in p for p in problems), problems
