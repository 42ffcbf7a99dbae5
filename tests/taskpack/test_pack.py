from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.store.cid import cid_of
from p2pfl.taskpack.pack import pack_dir, read_member, scan, unpack

from .helpers import manifest_yaml, member, raw_tar, write_tree

FILES = {
    "src/task.py": b"print('hi')\n",
    "configs/default.yaml": b"lr: 0.1\n",
    "README.md": "caf\u00e9\n".encode(),
    "bin/run.sh": b"#!/bin/sh\n",
}


def test_pack_layout_and_normalised_headers(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tp", FILES)
    os.chmod(root / "bin" / "run.sh", 0o700)
    os.chmod(root / "README.md", 0o600)
    for junk in ("__pycache__/x.pyc", "src/a.pyc", ".git/HEAD", "x.egg-info/PKG", ".venv/bin/py"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"junk")
    (root / ".DS_Store").write_bytes(b"junk")
    archive = pack_dir(root)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        infos = tar.getmembers()
    names = [i.name for i in infos]
    assert names == sorted(names, key=str.encode)
    assert names == [
        "README.md",
        "bin",
        "bin/run.sh",
        "configs",
        "configs/default.yaml",
        "manifest.yaml",
        "src",
        "src/task.py",
    ]
    for info in infos:
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
        expected = 0o755 if info.isdir() or info.name == "bin/run.sh" else 0o644
        assert info.mode == expected, info.name
    assert read_member(archive, "README.md") == FILES["README.md"]
    with pytest.raises(KeyError):
        read_member(archive, "nope")


def test_refuses_symlinks_and_missing_manifest(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tp", FILES)
    (root / "src" / "link.py").symlink_to(root / "src" / "task.py")
    with pytest.raises(LocalProtocolError, match=r"link\.py: symbolic links are not allowed"):
        pack_dir(root)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(LocalProtocolError, match="no manifest.yaml"):
        pack_dir(bare)


def test_unpack_round_trip(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tp", FILES)
    os.chmod(root / "bin" / "run.sh", 0o755)
    archive = pack_dir(root)
    dest = tmp_path / "out"
    members = unpack(archive, dest)
    assert sorted(m.name for m in members if not m.is_dir) == sorted([*FILES, "manifest.yaml"])
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    assert stat.S_IMODE((dest / "bin" / "run.sh").stat().st_mode) & 0o100
    # Re-packing the extracted tree gives the very same archive.
    assert pack_dir(dest) == archive
    with pytest.raises(LocalProtocolError, match="not empty"):
        unpack(archive, dest)


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([(member("../evil"), b"x")], "'..'"),
        ([(member("a/../../evil"), b"x")], "'..'"),
        ([(member("/etc/evil"), b"x")], "absolute path"),
        ([(member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), None)], "a link"),
        ([(member("hard", tarfile.LNKTYPE, linkname="manifest.yaml"), None)], "a link"),
        ([(member("fifo", tarfile.FIFOTYPE), None)], "special file"),
        ([(member("dev", tarfile.CHRTYPE), None)], "special file"),
        ([(member("a"), b"1"), (member("a"), b"2")], "appears twice"),
        ([(member("a"), b"1"), (member("a/b"), b"2")], "its parent is a file"),
        ([(member("a\\..\\b"), b"1")], "backslash"),
    ],
)
def test_unpack_refuses_hostile_members(tmp_path: Path, members, match: str) -> None:
    archive = raw_tar([(member("manifest.yaml"), manifest_yaml()), *members])
    dest = tmp_path / "out"
    with pytest.raises(RemoteProtocolError, match=match):
        unpack(archive, dest)
    # Everything is checked before anything is written.
    assert not dest.exists() or not any(dest.iterdir())


def test_unpack_limits(tmp_path: Path) -> None:
    archive = raw_tar([(member(f"f{i}"), b"x" * 100) for i in range(5)])
    with pytest.raises(RemoteProtocolError, match="'f2': archive expands past 250 bytes"):
        unpack(archive, tmp_path / "a", max_total_bytes=250)
    with pytest.raises(RemoteProtocolError, match="'f3': more than 3 members"):
        unpack(archive, tmp_path / "b", max_files=3)
    # The declared size alone is enough to refuse: no need to read the data first.
    big = member("big", size=10**12)
    header = big.tobuf(tarfile.GNU_FORMAT)
    with pytest.raises(RemoteProtocolError, match="'big': archive expands past"):
        scan(header + b"\0" * 1024)
    with pytest.raises(RemoteProtocolError, match="not a taskpack archive"):
        scan(b"certainly not a tar" * 100)
    import gzip

    with pytest.raises(RemoteProtocolError, match="not a taskpack archive"):
        scan(gzip.compress(archive))


# --- determinism ----------------------------------------------------------------------

_segment = st.text(alphabet="abcXYZ019_-.\u00e9", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.endswith((".pyc", ".egg-info"))
)
_trees = st.dictionaries(
    st.lists(_segment, min_size=1, max_size=3).map("/".join),
    st.tuples(st.binary(max_size=300), st.booleans()),
    min_size=1,
    max_size=8,
)


def _consistent(tree: dict[str, tuple[bytes, bool]]) -> bool:
    """No path is both a file and a directory; no clash with manifest.yaml."""
    names = set(tree)
    return "manifest.yaml" not in names and not any(
        other.startswith(name + "/") for name in names for other in names
    )


def _materialise(root: Path, tree, order, mtime: int, noise: int) -> None:
    root.mkdir()
    (root / "manifest.yaml").write_bytes(manifest_yaml())
    for name in order:
        data, executable = tree[name]
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        # Only "is it executable" matters; group/other bits and sticky bits must not.
        os.chmod(path, (0o744 if executable else 0o640) | noise)
        os.utime(path, (mtime, mtime))
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o700 | noise)
        os.utime(dirpath, (mtime + 7, mtime + 7))


@settings(max_examples=25, deadline=None)
@given(tree=_trees.filter(_consistent), data=st.data())
def test_pack_is_deterministic(tree, data) -> None:
    order_a = sorted(tree)
    order_b = data.draw(st.permutations(order_a))
    noise = data.draw(st.sampled_from([0, 0o004, 0o020, 0o060]))
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        _materialise(a, tree, order_a, 1_000_000, 0)
        _materialise(b, tree, order_b, 1_700_000_000, noise)
        packed_a, packed_b = pack_dir(a), pack_dir(b)
        assert packed_a == packed_b
        assert cid_of(packed_a) == cid_of(packed_b)
        out = Path(tmp) / "out"
        unpack(packed_a, out)
        for name, (content, _) in tree.items():
            assert (out / name).read_bytes() == content
        shutil.rmtree(out)


def test_nfc_normalised_names(tmp_path: Path) -> None:
    nfc = write_tree(tmp_path / "nfc", {"caf\u00e9.txt": b"x"})
    nfd = write_tree(tmp_path / "nfd", {"cafe\u0301.txt": b"x"})
    assert pack_dir(nfc) == pack_dir(nfd)
