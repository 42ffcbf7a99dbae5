"""Aggregation rules: hand computations, robustness to one outlier, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.fl.aggregate import aggregate, fedavg, krum, krum_scores, median, trimmed_mean


def _model(rng: np.random.Generator, center: float = 0.0, spread: float = 0.1):
    return {
        "w": (center + spread * rng.standard_normal((4, 3))).astype(np.float32),
        "b": (center + spread * rng.standard_normal(3)).astype(np.float32),
    }


def test_fedavg_matches_hand_computation() -> None:
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array(4, dtype=np.int64)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "n": np.array(8, dtype=np.int64)}
    out = fedavg([(a, 1), (b, 3)])
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]; int tensor (4+24)/4 = 7
    np.testing.assert_array_equal(out["w"], np.array([2.5, 5.0], dtype=np.float32))
    assert out["w"].dtype == np.float32
    assert out["n"].dtype == np.int64 and int(out["n"]) == 7
    assert list(out) == ["w", "n"]


def test_fedavg_rejects_mismatched_updates() -> None:
    a = {"w": np.zeros(2, dtype=np.float32)}
    with pytest.raises(ValueError, match="no updates"):
        fedavg([])
    with pytest.raises(ValueError, match="shape"):
        fedavg([(a, 1), ({"w": np.zeros(3, dtype=np.float32)}, 1)])
    with pytest.raises(ValueError, match="keys"):
        fedavg([(a, 1), ({"v": np.zeros(2, dtype=np.float32)}, 1)])


def test_median_and_trimmed_mean_by_hand() -> None:
    ups = [({"x": np.array([v], dtype=np.float32)}, 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert float(median(ups)["x"][0]) == 3.0
    # beta=0.2 of 5 trims one at each end: mean(2,3,4) = 3
    assert float(trimmed_mean(ups, beta=0.2)["x"][0]) == 3.0
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(ups, beta=0.5)


@pytest.mark.parametrize(
    "name,kw", [("median", {}), ("trimmed_mean", {"beta": 0.1}), ("krum", {"f": 1})]
)
def test_robust_rules_resist_one_outlier(name: str, kw: dict) -> None:
    rng = np.random.default_rng(0)
    honest = [_model(rng) for _ in range(9)]
    evil = {k: np.full_like(v, 1e6) for k, v in honest[0].items()}
    ups = [(w, 10) for w in honest] + [(evil, 10_000)]
    out = aggregate(name, ups, **kw)
    for key in out:
        assert np.abs(out[key]).max() < 1.0, (name, key)
    # fedavg, by contrast, is dragged away by the outlier
    assert np.abs(fedavg(ups)["w"]).max() > 1e5


def test_krum_picks_an_honest_update_and_multi_krum_averages() -> None:
    rng = np.random.default_rng(1)
    honest = [_model(rng) for _ in range(6)]
    evil = {k: v + 50.0 for k, v in honest[0].items()}
    ups = [(evil, 1)] + [(w, 1) for w in honest]
    chosen = krum(ups, f=1)
    assert any(all(np.array_equal(chosen[k], w[k]) for k in w) for w in honest)
    scores = krum_scores(ups, f=1)
    assert int(np.argmax(scores)) == 0
    multi = krum(ups, f=1, m=3)
    assert np.abs(multi["w"]).max() < 1.0


def test_krum_requires_2f_plus_3() -> None:
    rng = np.random.default_rng(2)
    ups = [(_model(rng), 1) for _ in range(4)]
    with pytest.raises(ValueError, match=r"n >= 2f\+3"):
        krum(ups, f=1)
    with pytest.raises(ValueError, match="m must be"):
        krum([(_model(rng), 1) for _ in range(5)], f=1, m=5)


def test_unknown_aggregator_is_named() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'mean'.*fedavg"):
        aggregate("mean", [({"x": np.zeros(1)}, 1)])


@pytest.mark.parametrize(
    "name,kw",
    [("fedavg", {}), ("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1, "m": 2})],
)
def test_bit_identical_for_same_inputs(name: str, kw: dict) -> None:
    def make():
        rng = np.random.default_rng(42)
        return [(_model(rng, spread=3.0), int(rng.integers(1, 100))) for _ in range(7)]

    a, b = aggregate(name, make(), **kw), aggregate(name, make(), **kw)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes()
        assert a[key].dtype == np.float32
