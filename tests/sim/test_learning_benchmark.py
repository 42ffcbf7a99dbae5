"""benchmarks/learning.py measures what it says: the centralised baseline is a plain
weighted mean written there (not the project's aggregation code), gossip is reported as the
nodes' own models beside the final merge, and every figure is mean ± std over seeds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "learning.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("learning_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_central_baseline_is_an_independent_weighted_mean() -> None:
    learning = _module()
    source = SCRIPT.read_text()  # independent of the code it checks:
    assert "from p2pfl.fl.aggregate" not in source and "import aggregate" not in source
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.0], np.float32)}
    b = {"w": np.array([4.0, -1.0], np.float32), "b": np.array([3.0], np.float32)}
    out = learning.weighted_mean([(a, 1.0), (b, 2.0)])  # (1*a + 2*b) / 3
    np.testing.assert_array_equal(out["w"], np.array([3.0, 0.0], np.float32))
    np.testing.assert_array_equal(out["b"], np.array([2.0], np.float32))
    assert out["w"].dtype == np.float32


def test_figures_are_mean_and_std_over_seeds() -> None:
    learning = _module()
    rows = [{"acc": 0.90}, {"acc": 0.94}, {"acc": 0.86}]
    out = learning.summarise(rows)["acc"]
    assert out["mean"] == pytest.approx(0.90) and out["std"] == pytest.approx(0.04)
    assert out["per_seed"] == [0.9, 0.94, 0.86]


@pytest.mark.slow
def test_the_benchmark_reports_own_models_and_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    learning = _module()
    assert learning.main(["--nodes", "4", "--rounds", "2", "--seeds", "1,2"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["n_seeds"] == 2 and figures["seeds"] == [1, 2]
    for key in ("fedavg_acc", "central_acc", "gossip_node_acc_mean", "gossip_merge_acc"):
        assert len(figures[key]["per_seed"]) == 2 and 0 < figures[key]["mean"] <= 1
    node_min, node_mean = figures["gossip_node_acc_min"], figures["gossip_node_acc_mean"]
    assert all(m <= a for m, a in zip(node_min["per_seed"], node_mean["per_seed"], strict=True))
    # The protocol's FedAvg and the independent mean agree up to float rounding.
    assert figures["fedavg_central_max_abs_diff"]["mean"] < 1e-5
