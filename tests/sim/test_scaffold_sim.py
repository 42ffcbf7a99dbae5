"""A freshly scaffolded training taskpack runs in `p2pfl simulate` as it is (its nodes get
CSV, the format its input declares), each node logs how the task ended for it, and the
result model loads with `p2pfl.load_model`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import p2pfl
from p2pfl.sim.runner import run_scenario, sim_cluster
from p2pfl.sim.scenario import load_scenario
from p2pfl.taskpack.scaffold import new_taskpack

pytest.importorskip("p2pfl.sim.cluster")
FEATURES = ["mean_radius", "mean_texture", "worst_area"]


@pytest.mark.slow  # a real simulated run of 3 nodes, about 6 s on a loaded machine
def test_scaffolded_training_pack_runs_in_simulate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new_taskpack("wages-logreg", "training", tmp_path)
    scenario_file = tmp_path / "scaffold.yaml"
    scenario_file.write_text(
        yaml.safe_dump(
            {
                "name": "scaffold",
                "nodes": 3,
                "dataset": {"name": "breast-cancer"},  # two classes: the scaffold's 0/1 label
                "taskpack": "wages-logreg",
                "params": {"rounds": 2, "features": FEATURES, "label": "label"},
            }
        )
    )
    clusters: list[Any] = []

    def keep(kwargs: dict[str, Any]) -> Any:
        clusters.append(sim_cluster(kwargs))
        return clusters[-1]

    caplog.set_level(logging.INFO, logger="p2pfl.node")
    summary = run_scenario(
        load_scenario(scenario_file), out_dir=tmp_path / "run", cluster_factory=keep, plots=False
    )
    assert summary.status == "succeeded", summary.reason
    assert summary.rounds_completed == 2 and summary.final["accuracy_mean"] > 0.8

    # Each node says, in its log, how the task ended for it.
    cluster = clusters[0]
    ended = [r.getMessage() for r in caplog.records if "ended here" in r.getMessage()]
    for node in cluster.nodes:
        me = node.identity.peer_id[-8:]
        assert any(m.startswith(me) and m.endswith("ended here: succeeded") for m in ended), (
            me,
            ended,
        )

    # The result model, written as `p2pfl result --model-out` writes it, loads in one call.
    cid = summary.result["model_cid"]
    model_file = tmp_path / "model.p2tn"
    model_file.write_bytes(bytes(cluster.nodes[0].store.get(cid)))
    model = p2pfl.load_model(model_file)
    assert list(model) == ["w", "b"] and model["w"].shape == (len(FEATURES),)
    assert np.isfinite(model["w"]).all() and model["w"].flags.writeable
