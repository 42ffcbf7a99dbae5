from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from p2pfl.errors import ValidationError
from p2pfl.sim.experiment import (
    METRICS,
    ConfigRow,
    expand_grid,
    parse_vary,
    results_md_text,
    run_experiment,
)

from .fakes import FakeCluster

REPO = Path(__file__).resolve().parents[2]
# A real taskpack: scenarios are checked against its manifest and parameter schema.
TASKPACK = str(REPO / "taskpacks/fedavg-mlp-digits")


def write_scenario(tmp_path: Path, **over: object) -> Path:
    raw = {
        "name": "exp",
        "seed": 1,
        "nodes": 4,
        "dataset": {"name": "digits", "partition": {"kind": "iid"}},
        "taskpack": TASKPACK,
        "params": {"rounds": 2},
    }
    raw.update(over)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_parse_vary_values() -> None:
    assert parse_vary("params.aggregator=fedavg,gossip").values == ("fedavg", "gossip")
    assert parse_vary("seed=1,2,3").values == (1, 2, 3)
    assert parse_vary("dataset.partition.alpha=0.1, 1e-2,1").values == (0.1, 0.01, 1)
    assert parse_vary("params.x=true").values == (True,)
    for bad in ("params.aggregator", "=1,2", "params.lr=", "params.lr=1,,2", "seed=1,1"):
        with pytest.raises(ValidationError):
            parse_vary(bad)


def test_grid_expansion(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_scenario(tmp_path).read_text())
    axes = [parse_vary("params.aggregator=fedavg,gossip,median"), parse_vary("seed=1,2"),
            parse_vary("network.latency_ms=5,50")]  # fmt: skip
    points = expand_grid(raw, axes, tmp_path / "out", base_dir=tmp_path)
    assert len(points) == 3 * 2 * 2
    first = points[0]
    assert first.config == (("params.aggregator", "fedavg"), ("network.latency_ms", 5))
    assert first.out_dir == tmp_path / "out/aggregator=fedavg_latency_ms=5/seed-1"
    assert [p.seed for p in points[:2]] == [1, 2]
    assert (
        points[2].scenario.params.protocol == "fedavg"
        and points[4].scenario.params.protocol == "gossip"
    )
    assert points[1].scenario.network.latency_ms == 5.0
    assert len({p.out_dir for p in points}) == len(points)


def test_without_a_seed_axis_each_configuration_runs_five_seeds(tmp_path: Path) -> None:
    """One seed cannot separate an effect from seed noise: the default is five, from the
    scenario's own seed."""
    raw = yaml.safe_load(write_scenario(tmp_path).read_text())
    points = expand_grid(raw, [parse_vary("params.aggregator=fedavg,gossip")], tmp_path / "o",
                         base_dir=tmp_path)  # fmt: skip
    first = raw["seed"]
    assert [p.seed for p in points] == [first + i for i in range(5)] * 2


def test_a_table_over_too_few_seeds_says_so() -> None:
    rows = [ConfigRow((("params.lr", 0.1),), 1, {m: (0.5, 0.0) for m in METRICS}, 0)]
    md = results_md_text(rows, ["params.lr"])
    assert "(1 seed each)" in md
    assert "Warning: a configuration has fewer than 3 seeds" in md


def test_invalid_vary_is_reported_before_running(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_scenario(tmp_path).read_text())
    axes = [parse_vary("params.aggregator=fedavg,mean"), parse_vary("topology.foo=1"),
            parse_vary("seed=1,x")]  # fmt: skip
    with pytest.raises(ValidationError) as info:
        expand_grid(raw, axes, tmp_path / "out", base_dir=tmp_path)
    assert info.value.problems == ["--vary seed: 'x' is not an integer >= 0"]
    axes[2] = parse_vary("seed=1,2")
    with pytest.raises(ValidationError) as info:
        expand_grid(raw, axes, tmp_path / "out", base_dir=tmp_path)
    problems = info.value.problems
    assert any(
        p.startswith("[params.aggregator=mean,topology.foo=1] params.aggregator: unknown")
        for p in problems
    )
    assert any("topology.foo: unknown key" in p for p in problems)
    with pytest.raises(ValidationError, match="nodes is not a mapping"):
        expand_grid(raw, [parse_vary("nodes.x=1")], tmp_path / "out", base_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_run_experiment_tables(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    calls: list[tuple[int, int, str]] = []
    result = run_experiment(
        path,
        ["params.aggregator=fedavg,gossip", "seed=1,2,3"],
        tmp_path / "out",
        cluster_factory=FakeCluster,
        progress=lambda i, n, p, rec, phase: calls.append((i, n, phase)),
    )
    assert [r.n_seeds for r in result.rows] == [3, 3]
    fedavg, gossip = result.rows
    assert fedavg.stats["accuracy"][0] > gossip.stats["accuracy"][0]  # the fake's ceilings
    assert fedavg.stats["accuracy"][1] > 0  # seeds differ
    rows = list(csv.DictReader((tmp_path / "out/results.csv").open()))
    assert list(rows[0]) == [
        "params.aggregator", "accuracy_mean", "accuracy_std", "loss_mean", "loss_std",
        "bytes_sent_total_mean", "bytes_sent_total_std", "wall_s_mean", "wall_s_std", "n_seeds", "n_failed",
    ]  # fmt: skip
    assert [r["params.aggregator"] for r in rows] == ["fedavg", "gossip"]
    assert float(rows[0]["accuracy_mean"]) == pytest.approx(fedavg.stats["accuracy"][0], abs=1e-6)
    md = (tmp_path / "out/results.md").read_text()
    assert md.splitlines()[0].startswith("| params.aggregator | accuracy |") and "± " in md
    assert len(md.splitlines()) == 2 + 2 + 2
    assert (
        md.splitlines()[-1] == "Mean ± sample std over each configuration's seeds (3 seeds each)."
    )
    for name in ("comparison.png", "curves.png", "aggregator=gossip/seed-3/rounds.csv"):
        assert (tmp_path / "out" / name).is_file()
    assert {c[0] for c in calls} == set(range(6)) and {c[1] for c in calls} == {6}
    assert calls[-1][2] == "done"
