"""filter_release: what an analysis task's outputs may carry off a node."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.policy import ReleaseRules, filter_release, released_epsilon
from p2pfl.taskpack import sdk
from p2pfl.taskpack.params import load_params
from p2pfl.taskpack.sdk import Context

STATS = Path(__file__).resolve().parents[2] / "taskpacks" / "federated-stats"


def _stats_task() -> Any:
    spec = importlib.util.spec_from_file_location("stats_task_rel", STATS / "src" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FederatedStats()


def _leaves(value: Any) -> list[Any]:
    """Every leaf value in a released structure, for 'nothing under k' checks."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


def test_the_histogram_attack_releases_nothing_under_k(tmp_path: Path) -> None:
    """The attack of issue 9: a 30-row private table, bins narrow enough to isolate each
    value. Before: every value, plus exact min/max/sum, left the node. Now: nothing that
    stands for fewer than k records leaves."""
    rng = np.random.default_rng(7)
    wages = np.round(rng.uniform(20_000, 90_000, 30), 2)
    table = tmp_path / "wages.csv"
    table.write_text("wage\n" + "\n".join(repr(float(w)) for w in wages) + "\n")
    edges = sorted({float(w) - 0.005 for w in wages} | {float(w) + 0.005 for w in wages})
    task = _stats_task()
    ctx = Context(
        task_id="attack",
        node="victim",
        params=load_params(STATS, {"column": "wage", "bins": str(edges)}),
        seed=1,
    )
    update = task.execute(ctx, task.preprocess(ctx, {"table": table}), None)
    raw = update.aggregates
    assert sorted(c for c in raw["histogram"]["counts"] if c) == [1] * 30  # the leak, raw

    k = 10
    released, notes = filter_release(raw, ReleaseRules(k=k))
    counts = released["histogram"]["counts"]
    assert set(counts) == {"<k"}  # every bin held fewer than k records
    assert "min" not in released and "max" not in released  # extremes denied by default
    for item in released.values():
        if isinstance(item, dict) and "n" in item:
            assert item["n"] >= k, item
    # Every released integer (a count) stands for at least k records.
    ints = [v for v in _leaves(released) if isinstance(v, int) and not isinstance(v, bool)]
    assert ints and all(v >= k for v in ints), ints
    assert any("min: dropped (exact extremes are denied" in n for n in notes)
    assert any("underflow: dropped (count of 0 < k)" in n for n in notes)
    # The surviving sums stand for all 30 records; the bin edges are the requester's own.
    assert released["count"]["n"] == 30 and released["sum"]["n"] == 30


def test_small_counts_means_and_extremes() -> None:
    aggs = {
        "a": sdk.count(9),
        "b": sdk.count(10),
        "m": sdk.mean(3.5, 4),
        "t": sdk.total(100.0, 12),
        "lo": sdk.extreme("min", 1.0, 12),
        "g": sdk.groups({"x": 12, "y": 2}),
    }
    out, notes = filter_release(aggs, ReleaseRules(k=10))
    assert "a" not in out and out["b"]["n"] == 10 and "m" not in out
    assert out["t"]["value"] == 100.0 and "lo" not in out
    assert out["g"]["counts"] == {"x": 12, "y": "<k"}
    assert "a: dropped (count of 9 < k)" in notes
    out, _ = filter_release(aggs, ReleaseRules(k=10, extremes=True))
    assert out["lo"]["value"] == 1.0
    assert released_epsilon(out) == 0.0 and "_dp" not in out


def test_untagged_and_malformed_values_are_refused() -> None:
    aggs: dict[str, Any] = {
        "raw": [1.0, 2.0, 3.0],
        "name": "alice",
        "loss": 0.25,
        "fake": {"_release": "count", "n": True},
        "odd": {"_release": "teleport", "n": 50},
        "hist": {"_release": "histogram", "edges": [0, 1], "counts": [20, 30]},
    }
    out, notes = filter_release(aggs, ReleaseRules(k=5, plain_metrics=frozenset({"loss"})))
    assert out == {"loss": 0.25}
    assert "raw: refused (not a typed aggregate)" in notes
    assert "name: refused (not a typed aggregate)" in notes
    assert "fake: refused (malformed count: n must be a count)" in notes
    assert "odd: refused (unknown release kind 'teleport')" in notes
    assert "hist: refused (malformed histogram)" in notes


def test_dp_noise_on_counts_and_sums_is_secret_and_accounted() -> None:
    aggs = {
        "n": sdk.count(1000),
        "s": sdk.total(5000.0, 1000, bound=10.0),
        "unbounded": sdk.total(5000.0, 1000),
        "h": sdk.histogram([0, 1, 2, 3], [500, 495, 5]),
        "lo": sdk.extreme("min", 0.1, 1000),
    }
    rules = ReleaseRules(k=10, extremes=True, epsilon=1.0)
    first, notes = filter_release(aggs, rules)
    second, _ = filter_release(aggs, rules)
    assert released_epsilon(first) == 1.0 and first["_dp"]["queries"] == 4  # n, s(2), h
    assert "unbounded" not in first and "lo" not in first
    assert any("cannot be released under DP" in n for n in notes)
    assert first["h"]["counts"][2] == "<k"
    # Fresh secret noise each time: two releases of the same data differ.
    draws = [(first["n"]["n"], first["s"]["value"]), (second["n"]["n"], second["s"]["value"])]
    assert draws[0] != draws[1]
    assert abs(first["n"]["n"] - 1000) < 200 and isinstance(first["n"]["n"], int)


def test_gaussian_mechanism_when_asked_and_eps_small() -> None:
    out, _ = filter_release({"n": sdk.count(1000)}, ReleaseRules(k=10, epsilon=0.5, delta=1e-5))
    assert out["_dp"]["mechanism"] == "gaussian" and out["_dp"]["delta"] == 1e-5


def test_refiltering_keeps_suppression() -> None:
    once, _ = filter_release({"h": sdk.histogram([0, 1, 2], [3, 30])}, ReleaseRules(k=5))
    twice, _ = filter_release(once, ReleaseRules(k=5))
    assert twice["h"]["counts"] == ["<k", 30]


@pytest.mark.parametrize(
    "make",
    [
        lambda: sdk.count(-1),
        lambda: sdk.count(True),
        lambda: sdk.total(float("nan"), 3),
        lambda: sdk.histogram([0, 1], [1, 2]),
        lambda: sdk.extreme("median", 1.0, 3),
        lambda: sdk.mean(1.0, 3, bound=0),
    ],
)
def test_sdk_vocabulary_checks_its_arguments(make: Any) -> None:
    with pytest.raises(ValueError):
        make()
