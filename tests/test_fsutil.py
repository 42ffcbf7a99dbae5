"""Atomic writes: whole file or the old one, the right mode, no temp file left behind."""

import pytest

from p2pfl.fsutil import atomic_path, atomic_write


def test_atomic_write_replaces_whole_file_with_mode(tmp_path) -> None:
    target = tmp_path / "sub" / "f.bin"
    atomic_write(target, b"old")
    atomic_write(target, "new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_failed_writer_leaves_the_old_file_and_no_temp(tmp_path) -> None:
    target = tmp_path / "t.csv"
    atomic_write(target, b"keep")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
