"""Partitioners and train/test split: coverage, determinism, the promised skew."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.fl.partition import (
    dirichlet,
    iid,
    natural,
    parse_partition,
    shards,
    split_train_test,
)

LABELS = np.repeat(np.arange(10), 50)  # 500 samples, 10 classes


def _is_partition(parts: list[np.ndarray], n: int) -> bool:
    allidx = np.concatenate(parts)
    return allidx.size == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_sizes_and_determinism() -> None:
    parts = iid(103, 4, np.random.default_rng(1))
    assert _is_partition(parts, 103)
    assert sorted(p.size for p in parts) == [25, 26, 26, 26]
    again = iid(103, 4, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_small_alpha_is_skewed() -> None:
    parts = dirichlet(LABELS, 5, 0.1, np.random.default_rng(0), min_size=5)
    assert _is_partition(parts, LABELS.size)
    assert min(p.size for p in parts) >= 5
    # With alpha=0.1 most nodes are dominated by few classes.
    top_share = [np.bincount(LABELS[p], minlength=10).max() / p.size for p in parts]
    assert np.mean(top_share) > 0.3
    wide = dirichlet(LABELS, 5, 1000.0, np.random.default_rng(0))
    assert max(np.bincount(LABELS[p], minlength=10).max() / p.size for p in wide) < 0.2
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 5, 0.0, np.random.default_rng(0))


def test_shards_give_few_classes_per_node() -> None:
    parts = shards(LABELS, 5, 2, np.random.default_rng(3))
    assert _is_partition(parts, LABELS.size)
    assert all(np.unique(LABELS[p]).size <= 2 for p in parts)


def test_natural_one_site_per_node_and_names_sites_on_error() -> None:
    sites = np.array(["b", "a", "b", "c", "a"])
    parts = natural(sites, 3)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
    with pytest.raises(ValueError, match=r"3: a, b, c"):
        natural(sites, 2)
    with pytest.raises(ValueError, match="no sites"):
        natural(None, 2)


def test_split_train_test_stratified() -> None:
    train, test = split_train_test(LABELS, 0.2, np.random.default_rng(0))
    assert test.size == 100 and train.size == 400
    assert np.intersect1d(train, test).size == 0
    assert np.all(np.bincount(LABELS[test]) == 10)
    tr2, te2 = split_train_test(57, 0.25, np.random.default_rng(0))
    assert te2.size == 14 and tr2.size == 43


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:-1", "shards:0", "iid:3", "x"])
def test_bad_partition_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="bad partition spec"):
        parse_partition(spec)
    assert parse_partition("dirichlet:0.5") == ("dirichlet", 0.5)
