"""A scenario's byzantine strength changes the run (it used to be parsed and ignored:
scale 1 and scale 50 gave byte-identical runs)."""

from __future__ import annotations

import pytest

from tests.core.simhelp import digits_split, run, spec


@pytest.mark.slow
def test_scale_1_and_scale_50_give_different_runs(tmp_path) -> None:
    paths, test = digits_split(tmp_path, 4, per_node=100)
    results = {}
    for scale in (1.0, 50.0):
        byz = {"nodes": [3], "attack": "scaled", "scale": scale}
        cluster, _ = run(spec(paths, test, params={"rounds": 2}, byzantine=byz))
        assert cluster.result["status"] == "succeeded", cluster.result
        results[scale] = (cluster.result["model_cid"], cluster.final_test_metrics["accuracy"])
    assert results[1.0][0] != results[50.0][0]
    # Scale 1 sends the honest update; 50x the step poisons the plain FedAvg model.
    assert results[50.0][1] < results[1.0][1] - 0.1, results
