"""Dataset loaders, the no-leak standardisation, table files, and the datasets CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from p2pfl.cli.datasets_cmd import datasets_group
from p2pfl.fl.datasets import (
    FASHION_DIR,
    Standardizer,
    load_dataset,
    load_table,
    split_dataset,
    write_table,
)


def test_digits_is_scaled_and_cached() -> None:
    ds = load_dataset("digits")
    assert ds.X.shape == (1797, 64) and ds.X.dtype == np.float32 and ds.y.dtype == np.int64
    assert 0.0 <= ds.X.min() and ds.X.max() <= 1.0 and ds.classes == 10
    assert load_dataset("digits") is ds


def test_heart_disease_sites_and_no_leak_standardisation() -> None:
    ds = load_dataset("heart-disease")
    assert len(ds) == 920 and ds.classes == 2 and ds.sites is not None
    assert sorted(set(ds.sites.tolist())) == [
        "Cleveland",
        "Hungary",
        "Switzerland",
        "VA Long Beach",
    ]
    assert np.isnan(ds.X).any()  # raw: imputed later, with training statistics only
    train, test = split_dataset(ds, 0.2, np.random.default_rng(0))
    assert not np.isnan(train.X).any() and not np.isnan(test.X).any()
    np.testing.assert_allclose(train.X.mean(axis=0), 0.0, atol=1e-5)
    assert np.abs(test.X.mean(axis=0)).max() > 1e-3  # test rows did not feed the stats


def test_standardizer_uses_only_fit_rows() -> None:
    s = Standardizer.fit(np.array([[1.0, np.nan], [3.0, 4.0], [5.0, 4.0]]))
    out = s.transform(np.array([[np.nan, np.nan]]))
    np.testing.assert_allclose(out, [[0.0, 0.0]], atol=1e-6)  # medians 3 and 4


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_shape() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.X.shape == (70000, 784) and ds.X.max() <= 1.0
    assert np.bincount(ds.y).tolist() == [7000] * 10


def test_unknown_dataset_is_named() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_table_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3)).astype(np.float32)
    y = rng.integers(0, 4, 20)
    path = tmp_path / f"t{suffix}"
    write_table(path, X, y, ["a", "b", "c"])
    X2, y2, names = load_table(path)
    assert names == ["a", "b", "c"] and X2.dtype == np.float32 and y2.dtype == np.int64
    np.testing.assert_array_equal(X2, X)
    np.testing.assert_array_equal(y2, y)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_load_table_errors(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="no 'label' column"):
        load_table(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="unsupported"):
        load_table(tmp_path / "a.parquet")


def test_cli_split_and_list(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["split", "iris", "--nodes", "3", "--out", str(out), "--seed", "1", "--json"]
    res = runner.invoke(datasets_group, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert [n["samples"] for n in summary["nodes"]] == [40, 40, 40]
    assert summary["test"]["samples"] == 30
    X, y, names = load_table(out / "node-1" / "iris.csv")
    assert X.shape == (40, 4) and sum(summary["nodes"][1]["labels"]) == 40
    assert (out / "test.csv").exists()
    # existing out dir without --force: one-line error, non-zero exit
    res = runner.invoke(datasets_group, args)
    assert res.exit_code != 0 and "not empty" in res.output
    assert runner.invoke(datasets_group, [*args, "--force"]).exit_code == 0
    res = runner.invoke(
        datasets_group,
        ["split", "iris", "--nodes", "2", "--out", str(tmp_path / "b"), "--partition", "natural"],
    )
    assert res.exit_code != 0 and "no sites" in res.output
    res = runner.invoke(
        datasets_group,
        ["split", "iris", "--nodes", "2", "--out", str(tmp_path / "c"), "--partition", "zipf:2"],
    )
    assert res.exit_code != 0 and "bad partition spec" in res.output
    res = runner.invoke(datasets_group, ["list", "--json"])
    assert "heart-disease" in [r["name"] for r in json.loads(res.output)]
