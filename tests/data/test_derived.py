"""The derived-dataset registry: names checked before any path, atomic, bounded."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.data.derived import DerivedError, DerivedRegistry, check_derived_name, check_scope
from p2pfl.fl.datasets import load_table

FLOW = "ab" * 16
OTHER = "cd" * 16


def _table(rows: int = 20, cols: int = 3) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, cols)).astype(np.float32)
    y = (rng.random(rows) > 0.5).astype(np.int64)
    return X, y, [f"c{i}" for i in range(cols)]


def test_put_then_get_reads_back_the_same_table(tmp_path):
    reg = DerivedRegistry(tmp_path / "derived")
    X, y, names = _table()
    info = reg.put_table(FLOW, "heart_std", X, y, names, sources=("heart",), producer="1" * 32)
    got = reg.get(FLOW, "heart_std")
    assert got == info
    assert got.records == 20 and got.columns == ("c0", "c1", "c2") and got.sources == ("heart",)
    X2, y2, names2 = load_table(reg.path(FLOW, "heart_std"))
    assert np.array_equal(X2, X) and np.array_equal(y2, y) and names2 == names
    assert reg.verify(FLOW, "heart_std")


def test_scopes_keep_equal_names_apart(tmp_path):
    reg = DerivedRegistry(tmp_path)
    X, y, names = _table()
    reg.put_table(FLOW, "heart_std", X, y, names)
    assert reg.get(OTHER, "heart_std") is None
    with pytest.raises(KeyError, match="heart_std"):
        reg.path(OTHER, "heart_std")
    reg.put_table(OTHER, "heart_std", X[:5], y[:5], names)
    assert reg.get(FLOW, "heart_std").records == 20
    assert reg.get(OTHER, "heart_std").records == 5
    assert [(i.scope, i.name) for i in reg.list()] == [(FLOW, "heart_std"), (OTHER, "heart_std")]
    assert reg.remove_scope(FLOW) == 1 and reg.get(FLOW, "heart_std") is None
    assert reg.get(OTHER, "heart_std") is not None


@pytest.mark.parametrize(
    "name", ["../etc", "Heart", "", "a" * 49, "x/y", "1abc", "a.b", "a-b", None, 3, "ä"]
)
def test_bad_names_are_refused_before_any_path(tmp_path, name):
    reg = DerivedRegistry(tmp_path / "d")
    X, y, names = _table()
    with pytest.raises(DerivedError, match="derived dataset name"):
        reg.put_table(FLOW, name, X, y, names)
    with pytest.raises(DerivedError):
        reg.get(FLOW, name)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("scope", ["../" + "a" * 29, "A" * 32, "a" * 31, "a" * 33, ""])
def test_bad_scopes_are_refused(tmp_path, scope):
    with pytest.raises(DerivedError, match="scope"):
        DerivedRegistry(tmp_path).get(scope, "x")
    with pytest.raises(DerivedError):
        check_scope(scope)


def test_valid_names():
    for name in ("heart_std", "a", "x" * 48, "s2_out"):
        assert check_derived_name(name) == name


def test_a_replaced_table_is_the_new_one(tmp_path):
    reg = DerivedRegistry(tmp_path)
    X, y, names = _table()
    reg.put_table(FLOW, "t", X, y, names)
    reg.put_table(FLOW, "t", X[:3], y[:3], names)
    assert reg.get(FLOW, "t").records == 3
    assert len(reg.list(FLOW)) == 1


def test_bounds_refuse_before_writing(tmp_path):
    X, y, names = _table()
    reg = DerivedRegistry(tmp_path, max_per_scope=2)
    reg.put_table(FLOW, "a", X, y, names)
    reg.put_table(FLOW, "b", X, y, names)
    with pytest.raises(DerivedError, match="already holds 2"):
        reg.put_table(FLOW, "c", X, y, names)
    reg.put_table(FLOW, "a", X, y, names)  # replacing is not adding
    small = DerivedRegistry(tmp_path / "small", max_total_bytes=1000)
    with pytest.raises(DerivedError, match="exceed"):
        small.put_table(FLOW, "big", *_table(rows=500))
    assert small.list() == []


def test_bad_tables_are_refused(tmp_path):
    reg = DerivedRegistry(tmp_path)
    X, y, names = _table()
    with pytest.raises(DerivedError, match="disagree"):
        reg.put_table(FLOW, "t", X, y[:-1], names)
    X[0, 0] = np.nan
    with pytest.raises(DerivedError, match="NaN"):
        reg.put_table(FLOW, "t", X, y, names)
    assert reg.list() == []


def test_a_half_written_entry_reads_as_absent(tmp_path):
    reg = DerivedRegistry(tmp_path)
    X, y, names = _table()
    info = reg.put_table(FLOW, "t", X, y, names)
    info.path.write_bytes(b"truncated")  # the table no longer matches its record
    assert reg.get(FLOW, "t") is None
    (tmp_path / FLOW / "u.json").write_text("{not json")
    assert reg.get(FLOW, "u") is None
    assert reg.list(FLOW) == []
    assert reg.remove(FLOW, "t") and not reg.remove(FLOW, "t")
