from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfl.cli.sim_cmds import experiment_cmd, simulate_cmd
from p2pfl.sim import runner

from .fakes import FakeCluster
from .test_experiment import write_scenario


@pytest.fixture(autouse=True)
def fake_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "sim_cluster", FakeCluster)


def test_simulate_json(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    res = CliRunner().invoke(
        simulate_cmd, [str(path), "--out", str(tmp_path / "run"), "--seed", "7", "--json"]
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["seed"] == 7 and summary["scenario"] == "exp" and summary["network"] == "sim"
    assert (tmp_path / "run/rounds.csv").is_file() and (tmp_path / "run/accuracy.png").is_file()


def test_simulate_default_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_scenario(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(simulate_cmd, [str(path), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "final accuracy" in res.stdout
    assert (tmp_path / "runs/exp-1/summary.json").is_file()


def test_simulate_errors_are_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(simulate_cmd, [str(tmp_path / "missing.yaml")])
    assert res.exit_code != 0
    assert res.stderr.strip().count("\n") == 0 and "no such file" in res.stderr
    bad = write_scenario(tmp_path, nodes=0, params={"rounds": 0})
    res = CliRunner().invoke(simulate_cmd, [str(bad)])
    assert res.exit_code != 0
    err = res.stderr.strip()
    assert err.count("\n") == 0
    assert "nodes: must be >= 1, got 0" in err and "params.rounds: must be >= 1, got 0" in err


def test_experiment_cli(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    out = tmp_path / "exp"
    args = [
        str(path),
        "--vary",
        "params.aggregator=fedavg,median",
        "--vary",
        "seed=1,2",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(experiment_cmd, [*args, "--json", "--no-plots"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip())
    assert [r["params.aggregator"] for r in data["rows"]] == ["fedavg", "median"]
    assert all(r["n_seeds"] == 2 for r in data["rows"])
    assert (out / "results.md").is_file()


def test_experiment_bad_vary_runs_nothing(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    out = tmp_path / "exp"
    res = CliRunner().invoke(
        experiment_cmd, [str(path), "--vary", "params.aggregator=fedavg,mean", "--out", str(out)]
    )
    assert res.exit_code != 0
    assert "params.aggregator: unknown aggregator 'mean'" in res.stderr
    assert res.stderr.strip().count("\n") == 0
    assert not out.exists()


def test_simulate_failed_task_exits_nonzero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Failing(FakeCluster):
        def run(self):  # type: ignore[no-untyped-def]
            yield from super().run()
            self.result = {"status": "failed", "reason": "only 0 volunteers"}

    monkeypatch.setattr(runner, "sim_cluster", Failing)
    path = write_scenario(tmp_path)
    res = CliRunner().invoke(
        simulate_cmd, [str(path), "--out", str(tmp_path / "r"), "--no-plots", "--json"]
    )
    assert res.exit_code == 1
    assert json.loads(res.stdout)["status"] == "failed"
    assert "the task failed: only 0 volunteers" in res.stderr
