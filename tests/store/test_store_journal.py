"""The append-only journal: replay, torn tail recovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.errors import LocalProtocolError
from p2pfl.store.journal import Journal


def test_append_and_replay(tmp_path: Path) -> None:
    path = tmp_path / "j" / "journal.bin"
    with Journal(path) as j:
        j.append({"task": "t1", "state": "offered"})
        j.append({"task": "t1", "state": "running", "round": 2, "blob": b"\x00\x01"})
    with Journal(path) as j:
        assert list(j.replay()) == [
            {"task": "t1", "state": "offered"},
            {"task": "t1", "state": "running", "round": 2, "blob": b"\x00\x01"},
        ]
        j.append({"n": 3})
        assert len(list(j.replay())) == 3


@pytest.mark.parametrize("cut", [1, 4, 8, 10])
def test_torn_last_record_is_truncated(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "journal.bin"
    with Journal(path) as j:
        j.append({"a": 1})
        j.append({"b": "x" * 20})
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - cut)
    with Journal(path) as j:
        assert list(j.replay()) == [{"a": 1}]
        j.append({"c": 3})
    with Journal(path) as j:
        assert list(j.replay()) == [{"a": 1}, {"c": 3}]


def test_corrupt_tail_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "journal.bin"
    with Journal(path) as j:
        j.append({"a": 1})
        j.append({"b": 2})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with Journal(path) as j:
        assert list(j.replay()) == [{"a": 1}]


def test_bad_records_refused(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.bin") as j:
        with pytest.raises(LocalProtocolError):
            j.append([1, 2])  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            j.append({"x": object()})
        assert list(j.replay()) == []
