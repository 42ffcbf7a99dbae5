"""A whole flow on simulated nodes: the scenario runs it; the derived data stay home."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from p2pfl.fl.datasets import write_table
from p2pfl.sim.cluster_base import ClusterSpec
from p2pfl.sim.flowsim import FlowSimCluster
from p2pfl.sim.runner import run_scenario
from p2pfl.sim.scenario import load_scenario, parse
from p2pfl.store.cid import cid_of

ROOT = Path(__file__).resolve().parents[2]


def test_a_scenario_may_name_a_flow_and_checks_it(tmp_path: Path) -> None:
    scenario = load_scenario(ROOT / "scenarios" / "heart-disease-flow.yaml")
    assert scenario.flow == ROOT / "flows" / "heart-disease.yaml"
    assert scenario.taskpack == ROOT / "taskpacks" / "standardize"
    base = {
        "name": "x", "nodes": 2, "dataset": {"name": "breast-cancer"},
        "params": {"rounds": 1},
    }  # fmt: skip
    with pytest.raises(Exception, match="taskpack: required"):
        parse(base, base_dir=ROOT)
    with pytest.raises(Exception, match="not both"):
        parse(
            {**base, "flow": "flows/heart-disease.yaml", "taskpack": "taskpacks/standardize"},
            base_dir=ROOT,
        )
    with pytest.raises(Exception, match="no such flow file"):
        parse({**base, "flow": "flows/none.yaml"}, base_dir=ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nsteps: []\n")
    with pytest.raises(Exception, match=r"flow \(.*\): steps"):
        parse({**base, "flow": str(bad)}, base_dir=tmp_path)


@pytest.mark.slow
def test_simulate_runs_the_heart_disease_flow(tmp_path: Path) -> None:
    scenario = load_scenario(ROOT / "scenarios" / "heart-disease-flow.yaml")
    # The file's scenario with fewer rounds of its training step.
    scenario = replace(scenario, params=replace(scenario.params, rounds=3))
    summary = run_scenario(scenario, out_dir=tmp_path / "run", plots=False)
    assert summary.status == "succeeded", summary.reason
    steps = summary.result["steps"]
    assert set(steps) == {"standardise", "train", "validate"}
    assert steps["standardise"]["metrics"]["nodes"] == 4
    assert steps["train"]["rounds"] == 3
    assert steps["validate"]["metrics"]["accuracy"] > 0.6
    with open(tmp_path / "run" / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {int(r["round"]) for r in rows} == {1, 2, 3} and len(rows) == 12


FLOW = """
name: big
datasets: [table]
steps:
  - {{name: prep, taskpack: {root}/taskpacks/standardize, output: table_std}}
  - {{name: fit, taskpack: {root}/taskpacks/fedavg-mlp-tabular, input: table_std,
     params: {{rounds: 2, hidden: [8], local_epochs: 1}}}}
"""


@pytest.mark.slow
def test_the_derived_dataset_never_leaves_its_node(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        X = rng.normal(i, 1.0, size=(20_000, 40))
        X[rng.random(X.shape) < 0.1] = np.nan
        y = (np.nan_to_num(X[:, 0]) > i).astype(int)
        path = tmp_path / f"node-{i}.npz"
        write_table(path, X, y, [f"c{j}" for j in range(40)])
        paths.append(path)
    flow = tmp_path / "big.yaml"
    flow.write_text(FLOW.format(root=ROOT))
    spec = ClusterSpec(seed=1, nodes=3, taskpack_dir=ROOT / "taskpacks" / "standardize",
                       node_data=paths, input_name="table", flow=flow)  # fmt: skip
    cluster = FlowSimCluster(spec, flow)
    registries = []
    try:
        records = list(cluster._run())
        assert cluster.result["status"] == "succeeded", cluster.result
        assert records  # the training step's rounds
        for node in cluster.nodes:
            registry = cluster.derived(node.index)
            registries.append(registry)
            (info,) = registry.list()
            assert info.name == "table_std" and info.scope == cluster.flow_id
            assert info.records == 20_000 and info.sources == ("table",)
            table = info.path.read_bytes()
            sent = cluster.hub.stats(node.identity.peer_id).bytes_sent
            print(f"node {node.index}: derived table {len(table)} bytes, sent {sent} bytes")
            # Everything the node sent in the whole flow is far below its derived table.
            assert sent < len(table) / 10, (sent, len(table))
            # And no node holds it as a blob (nothing of it was ever stored or served).
            cid = cid_of(table)
            assert not any(other.store.has(cid) for other in cluster.nodes)
    finally:
        cluster.runner.close()
        cluster._remove_tmp()


def test_a_flow_scenarios_params_are_checked_against_the_steps_they_reach(
    tmp_path: Path,
) -> None:
    """A plain key reaches the training steps, `STEP.KEY` one step: a typo is named by
    path before anything runs, and a step the flow lacks is named too."""
    text = (ROOT / "scenarios" / "heart-disease-flow.yaml").read_text()
    good = tmp_path / "good.yaml"
    good.write_text(text.replace("flow: flows/", f"flow: {ROOT}/flows/"))
    load_scenario(good)  # lr reaches the training step, which takes it
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        good.read_text().replace("lr: 0.05}", "lrr: 0.05, standardise.foo: 1, nostep.x: 2}")
    )
    with pytest.raises(Exception) as info:
        load_scenario(typo)
    text = str(info.value)
    assert "lrr" in text and "(train)" in text
    assert "standardise" in text and "foo" in text
    assert "no step 'nostep'" in text
