"""Local training helpers: round trip of weights, determinism, FedProx pull, DP budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from p2pfl.fl.torch_utils import (  # noqa: E402
    BudgetExhausted,
    evaluate_model,
    load_numpy_into,
    state_to_numpy,
    train_local,
)
from p2pfl.taskpack.sdk import DPConfig  # noqa: E402


def _data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)
    return X, y


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_numpy_round_trip_and_shape_errors() -> None:
    m = _model()
    w = state_to_numpy(m)
    assert list(w) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_numpy_into(other, w)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(w.values(), state_to_numpy(other).values(), strict=True)
    )
    with pytest.raises(ValueError, match="missing"):
        load_numpy_into(other, {"0.weight": w["0.weight"]})
    bad = dict(w, **{"0.bias": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ValueError, match="0.bias"):
        load_numpy_into(other, bad)


def test_training_learns_and_is_deterministic() -> None:
    X, y = _data()
    runs = []
    for _ in range(2):
        m = _model()
        stats = train_local(m, X, y, epochs=5, batch_size=16, lr=0.1, seed=3)
        runs.append(state_to_numpy(m))
    assert stats.num_samples == 200 and stats.epsilon is None
    assert all(
        a.tobytes() == b.tobytes() for a, b in zip(runs[0].values(), runs[1].values(), strict=True)
    )
    metrics = evaluate_model(m, X, y)
    assert metrics["accuracy"] > 0.9 and metrics["num_samples"] == 200


def test_fedprox_stays_closer_to_global() -> None:
    X, y = _data()
    g = state_to_numpy(_model())

    def drift(mu: float) -> float:
        m = _model()
        train_local(m, X, y, epochs=3, batch_size=16, lr=0.1, seed=1, global_weights=g, mu=mu)
        w = state_to_numpy(m)
        return float(sum(((w[k] - g[k]) ** 2).sum() for k in g))

    assert drift(1.0) < 0.8 * drift(0.0)


def test_dp_spends_within_budget_then_stops() -> None:
    X, y = _data(120)
    m = _model()
    state: dict = {}
    dp = DPConfig(epsilon=4.0, delta=1e-5, max_grad_norm=1.0)
    eps = []
    for r in range(3):
        s = train_local(
            m, X, y, epochs=1, batch_size=30, lr=0.1, seed=r, dp=dp, dp_state=state, rounds=3
        )
        eps.append(s.epsilon)
        state = json.loads(json.dumps(state))  # what persists across restarts
    assert eps[0] < eps[1] < eps[2] <= 4.0
    assert eps[2] > 3.5  # the calibration uses the budget, not a tiny fraction
    with pytest.raises(BudgetExhausted, match="budget 4.000"):
        train_local(
            m, X, y, epochs=1, batch_size=30, lr=0.1, seed=9, dp=dp, dp_state=state, rounds=3
        )
