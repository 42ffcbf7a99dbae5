"""Push-sum: conservation, convergence to the (weighted) mean, deterministic partners."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.fl.aggregate import (
    estimate,
    gossip_sources,
    gossip_targets,
    init_state,
    merge_shares,
    split_shares,
)


def test_split_and_merge_conserve_mass_and_numerator() -> None:
    s = init_state({"w": np.array([3.0, -1.0], dtype=np.float32)}, mass=6.0)
    shares = split_shares(s, 2)
    assert len(shares) == 3
    assert sum(p.mass for p in shares) == pytest.approx(6.0, abs=0)
    back = merge_shares(shares)
    np.testing.assert_allclose(back.weights["w"], [18.0, -6.0])
    assert estimate(back)["w"].dtype == np.float32
    np.testing.assert_array_equal(estimate(back)["w"], np.array([3.0, -1.0], dtype=np.float32))


def test_push_sum_on_a_ring_converges_to_weighted_mean() -> None:
    n = 8
    values = [np.array([float(i), float(i * i)]) for i in range(n)]
    masses = [float(i + 1) for i in range(n)]
    states = [init_state({"v": v}, m) for v, m in zip(values, masses, strict=True)]
    target = sum(m * v for v, m in zip(values, masses, strict=True)) / sum(masses)
    total_mass = sum(masses)
    for _ in range(200):
        inbox: list[list] = [[] for _ in range(n)]
        for i, s in enumerate(states):
            keep, right = split_shares(s, 1)
            inbox[i].append(keep)
            inbox[(i + 1) % n].append(right)
        states = [merge_shares(box) for box in inbox]
        assert sum(s.mass for s in states) == pytest.approx(total_mass, rel=1e-12)
    for s in states:
        np.testing.assert_allclose(estimate(s)["v"], target, rtol=1e-6)


def test_gossip_targets_are_deterministic_and_sources_invert_them() -> None:
    live = [f"peer{i:02d}" for i in range(10)]
    t1 = gossip_targets("task", 3, "peer04", live, 3)
    assert t1 == gossip_targets("task", 3, "peer04", list(reversed(live)), 3)
    assert len(t1) == 3 and "peer04" not in t1 and len(set(t1)) == 3
    assert (
        gossip_targets("task", 4, "peer04", live, 3) != t1
        or gossip_targets("task", 5, "peer04", live, 3) != t1
    )
    for p in live:
        for src in gossip_sources("task", 3, p, live, 3):
            assert p in gossip_targets("task", 3, src, live, 3)
    edges = sum(len(gossip_sources("task", 3, p, live, 3)) for p in live)
    assert edges == 3 * len(live)
    assert gossip_targets("task", 1, "a", ["a", "b"], 5) == ["b"]
