"""DP noise and Poisson sampling: secret on real nodes, reproducible only when asked
(simulations). The attack of issue 9 regenerated noise seeded from public values."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from p2pfl.fl.torch_utils import state_to_numpy, train_local  # noqa: E402
from p2pfl.taskpack.sdk import DPConfig  # noqa: E402


def _train(dp: DPConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    # The same public seed (task id, round) in both runs: all a peer could know.
    train_local(model, X, y, epochs=1, batch_size=30, lr=0.1, seed=42, dp=dp, dp_state={})
    return state_to_numpy(model)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_real_node_dp_noise_differs_between_identical_runs() -> None:
    assert DPConfig(epsilon=4.0).deterministic is False  # the default is the safe one
    first, second = _train(DPConfig(epsilon=4.0)), _train(DPConfig(epsilon=4.0))
    assert not _same(first, second)


def test_deterministic_dp_is_reproducible_for_simulations() -> None:
    dp = DPConfig(epsilon=4.0, deterministic=True)
    assert _same(_train(dp), _train(dp))
