"""A scenario or a grid is validated whole, its taskpack's parameters included, before
anything runs or any folder is made; problems name the file and the scenario path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from p2pfl.cli.main import cli
from p2pfl.errors import ValidationError
from p2pfl.sim import runner
from p2pfl.sim.checks import SimInput, node_data_format, sim_input
from p2pfl.sim.data import prepare_node_data
from p2pfl.sim.scenario import load_scenario
from p2pfl.taskpack.scaffold import new_taskpack

from .fakes import FakeCluster
from .test_experiment import TASKPACK


@pytest.fixture(autouse=True)
def fake_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "sim_cluster", FakeCluster)


def write(tmp_path: Path, name: str = "byzantine.yaml", **params: object) -> Path:
    doc = {
        "name": "byz",
        "nodes": 4,
        "dataset": {"name": "digits"},
        "taskpack": TASKPACK,
        "params": {"rounds": 2, **params},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_params_typo_is_named_by_file_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, aggregater="median")
    with pytest.raises(ValidationError) as info:
        load_scenario(path)
    assert info.value.problems == ["params.aggregater: unknown key (did you mean aggregator?)"]
    assert str(path) in str(info.value)


def test_params_values_are_checked_against_the_taskpack_schema(tmp_path: Path) -> None:
    path = write(tmp_path, optimizer="adagrad", hidden=3)
    with pytest.raises(ValidationError) as info:
        load_scenario(path)
    problems = info.value.problems
    assert any(p.startswith("params.optimizer: 'adagrad' is not one of") for p in problems)
    assert any(p.startswith("params.hidden: 3 is not of type 'array'") for p in problems)


def test_a_typo_is_named_even_when_other_parts_are_broken(tmp_path: Path) -> None:
    path = write(tmp_path, aggregater="median", lr=-1)
    with pytest.raises(ValidationError) as info:
        load_scenario(path)
    assert info.value.problems == [
        "params.lr: must be > 0, got -1",
        "params.aggregater: unknown key (did you mean aggregator?)",
    ]


def test_simulate_refuses_before_making_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, aggregater="median")
    before = len(FakeCluster.instances)
    r = CliRunner().invoke(cli, ["simulate", "byzantine.yaml"])
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        "error: byzantine.yaml: params.aggregater: unknown key (did you mean aggregator?)"
    )
    assert not (tmp_path / "runs").exists() and len(FakeCluster.instances) == before


def test_experiment_grid_is_checked_whole_before_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path)
    before = len(FakeCluster.instances)
    args = ["experiment", "byzantine.yaml", "--out", "exp", "--vary", "seed=1,2"]
    r = CliRunner().invoke(cli, [*args, "--vary", "params.lr=0.1,-1"])
    assert r.exit_code == 1
    assert "byzantine.yaml: [params.lr=-1] params.lr: must be > 0" in r.stderr
    r = CliRunner().invoke(cli, [*args, "--vary", "params.aggregater=fedavg,median"])
    assert r.exit_code == 1
    assert "[params.aggregater=fedavg] params.aggregater: unknown key" in r.stderr
    assert not (tmp_path / "exp").exists() and len(FakeCluster.instances) == before


def test_node_data_come_in_the_format_the_input_declares(tmp_path: Path) -> None:
    assert node_data_format("csv") == "csv" and node_data_format("npz|csv") == "npz"
    assert node_data_format("parquet") is None and node_data_format("parquet|csv") == "csv"
    pack = new_taskpack("tp", "training", tmp_path)  # declares `tabular`, format csv
    assert sim_input(pack, "breast-cancer") == SimInput("tabular", "csv")
    assert sim_input(Path(TASKPACK), "digits").format == "npz"  # npz|csv: the first


def test_a_format_the_simulator_cannot_write_is_refused(tmp_path: Path) -> None:
    pack = new_taskpack("tp", "training", tmp_path)
    manifest = pack / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("format: csv", "format: parquet"))
    doc = yaml.safe_load(write(tmp_path).read_text())
    doc["taskpack"] = str(pack)
    doc["params"] = {"rounds": 1, "features": ["pixel_0_1"], "label": "label"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValidationError) as info:
        load_scenario(tmp_path / "s.yaml")
    assert info.value.problems == [
        "taskpack: input 'tabular' has format 'parquet'; the simulator hands nodes csv or npz "
        "tables"
    ]


def test_the_scaffold_reads_what_the_simulator_hands_it(tmp_path: Path) -> None:
    """The training scaffold reads CSV; the simulator now writes CSV for it, and the
    scaffold's own code accepts a node's file (the full run is in test_scaffold_sim)."""
    import importlib.util

    pack = new_taskpack("tp", "training", tmp_path)
    doc = yaml.safe_load(write(tmp_path).read_text())
    doc.update(taskpack=str(pack), dataset={"name": "breast-cancer"})
    doc["params"] = {"rounds": 1, "features": ["mean_radius", "worst_area"], "label": "label"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    scenario = load_scenario(tmp_path / "s.yaml")
    fmt = sim_input(scenario.taskpack, scenario.dataset.name).format
    paths, test_path = prepare_node_data(scenario, 1, tmp_path / "data", fmt)
    assert [p.suffix for p in paths] == [".csv"] * 4 and test_path.suffix == ".csv"
    spec = importlib.util.spec_from_file_location("scaffold_task", pack / "src/task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x, y = module.read_csv(paths[0], ["mean_radius", "worst_area"], "label")
    assert x.shape[1] == 2 and len(x) > 50 and set(np.unique(y)) <= {0.0, 1.0}
