from __future__ import annotations

import numpy as np
import pytest

from p2pfl.fl.attacks import attack


def test_attacks() -> None:
    g = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    h = {"w": np.array([2.0, 0.0], dtype=np.float32)}
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(attack("sign-flip", h, g, rng)["w"], [0.0, 2.0])
    np.testing.assert_array_equal(attack("scaled", h, g, rng, scale=3)["w"], [4.0, -2.0])
    noisy = attack("gaussian-noise", h, g, np.random.default_rng(1), scale=0.5)
    assert noisy["w"].dtype == np.float32 and not np.array_equal(noisy["w"], h["w"])
    again = attack("gaussian-noise", h, g, np.random.default_rng(1), scale=0.5)
    assert noisy["w"].tobytes() == again["w"].tobytes()
    with pytest.raises(ValueError, match="unknown attack 'flip'"):
        attack("flip", h, g, rng)
