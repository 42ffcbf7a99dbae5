"""A run's folder holds whole files or none: Ctrl-C mid-run leaves the rounds so far and a
summary marked `interrupted`; a run never replaces an earlier one without --force."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pfl.cli.main import cli
from p2pfl.errors import LocalProtocolError
from p2pfl.sim import runner
from p2pfl.sim.experiment import run_experiment
from p2pfl.sim.runner import run_scenario
from p2pfl.sim.scenario import load_scenario

from .fakes import FakeCluster, FakeRecord
from .test_experiment import write_scenario


class CtrlCCluster(FakeCluster):
    """Ctrl-C arrives in the middle of round 2 (after two of its node records)."""

    def run(self) -> Iterator[FakeRecord]:
        for i, record in enumerate(super().run()):
            if i == self.spec["nodes"] + 2:
                raise KeyboardInterrupt
            yield record


class CtrlCAtStart(FakeCluster):
    def run(self) -> Iterator[FakeRecord]:
        raise KeyboardInterrupt
        yield  # pragma: no cover - makes this a generator


def test_ctrl_c_leaves_whole_files_marked_interrupted(tmp_path: Path) -> None:
    scenario = load_scenario(write_scenario(tmp_path))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario, out_dir=out, cluster_factory=CtrlCCluster)
    rows = (out / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("node,round,") and len(rows) == 1 + 4 + 2
    assert all(len(r.split(",")) == 8 for r in rows)  # every row complete
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "round 2" in summary["reason"]
    assert summary["rounds_completed"] == 2
    assert (out / "scenario.yaml").is_file()
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))  # no temp files left


def test_ctrl_c_before_any_round_leaves_no_folder(tmp_path: Path) -> None:
    scenario = load_scenario(write_scenario(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario, out_dir=tmp_path / "run", cluster_factory=CtrlCAtStart)
    assert not (tmp_path / "run").exists()


def test_simulate_cli_says_what_an_interrupt_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "sim_cluster", CtrlCCluster)
    path = write_scenario(tmp_path)
    r = CliRunner().invoke(cli, ["simulate", str(path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 130
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: interrupted: the rounds so far are in {tmp_path / 'run'}/ (status interrupted)"
    )


def test_a_run_never_replaces_an_earlier_one_without_force(tmp_path: Path) -> None:
    scenario = load_scenario(write_scenario(tmp_path))
    out = tmp_path / "run"
    run_scenario(scenario, out_dir=out, cluster_factory=FakeCluster, plots=False)
    first = (out / "summary.json").read_bytes()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LocalProtocolError, match="pass --force"):
        run_scenario(scenario, out_dir=out, cluster_factory=FakeCluster, plots=False)
    assert (out / "summary.json").read_bytes() == first
    run_scenario(scenario, seed=9, out_dir=out, cluster_factory=FakeCluster, force=True)
    assert json.loads((out / "summary.json").read_text())["seed"] == 9
    assert (out / "notes.txt").read_text() == "mine"  # --force removes only a run's files


def test_cli_overwrite_refusal_and_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "sim_cluster", FakeCluster)
    path = write_scenario(tmp_path)
    args = ["simulate", str(path), "--out", str(tmp_path / "run"), "--no-plots"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        f"error: {tmp_path / 'run'} already holds a run (or other files); pass --force to "
        "replace it, or choose another --out"
    )
    assert CliRunner().invoke(cli, [*args, "--force"]).exit_code == 0


def test_experiment_refuses_an_earlier_experiment_without_force(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    out = tmp_path / "exp"
    vary = ["params.aggregator=fedavg,median", "seed=1,2"]
    run_experiment(path, vary, out, cluster_factory=FakeCluster, plots=False)
    before = len(FakeCluster.instances)
    with pytest.raises(LocalProtocolError, match="pass --force"):
        run_experiment(path, vary, out, cluster_factory=FakeCluster, plots=False)
    assert len(FakeCluster.instances) == before  # refused before the first run
    result = run_experiment(path, vary, out, cluster_factory=FakeCluster, plots=False, force=True)
    assert len(result.summaries) == 4 and (out / "results.csv").is_file()


def test_ctrl_c_in_an_experiment_keeps_finished_runs_and_writes_no_table(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    out = tmp_path / "exp"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(path, ["seed=1,2"], out, cluster_factory=CtrlCCluster, plots=False)
    summary = json.loads((out / "base/seed-1/summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert not (out / "base/seed-2").exists() and not (out / "results.csv").exists()
