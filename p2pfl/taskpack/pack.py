"""Deterministic taskpack archives and their safe extraction.

``pack_dir`` makes the same bytes (hence the same CID) from the same tree on any machine
and Python version: an *uncompressed* POSIX ustar archive (gzip output depends on the zlib
build, so compressing would tie the CID to it), entries sorted by their UTF-8 path (NFC
normalised, so macOS and Linux agree), mtime 0, uid/gid 0, empty owner names, mode 0644
(0755 when any executable bit is set) for files and 0755 for directories.

``unpack`` and ``read_member`` treat the archive as a peer's bytes: anything but plain
files and directories under relative, clean paths, or more than the size/count limits,
raises RemoteProtocolError naming the member.
"""

from __future__ import annotations

import fnmatch
import io
import os
import stat
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.taskpack.manifest import MANIFEST_FILE, load_manifest

__all__ = [
    "IGNORED",
    "MAX_FILES",
    "MAX_MEMBER_BYTES",
    "MAX_TOTAL_BYTES",
    "Member",
    "pack_dir",
    "read_member",
    "scan",
    "unpack",
]

# Names (fnmatch patterns, matched against each path component) never packed.
IGNORED = (
    "__pycache__",
    "*.pyc",
    ".git",
    ".hg",
    ".svn",
    ".DS_Store",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
    ".venv",
)
MAX_FILES = 10_000
MAX_TOTAL_BYTES = 256 * 1024 * 1024  # sum of member sizes
MAX_MEMBER_BYTES = 16 * 1024 * 1024  # default cap for read_member
_MAX_PATH = 255  # ustar: 155-byte prefix + 100-byte name


@dataclass(frozen=True)
class Member:
    """One entry of a checked archive."""

    name: str  # relative POSIX path, no trailing slash
    is_dir: bool
    size: int
    executable: bool


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in IGNORED)


def _walk(root: Path) -> list[tuple[str, Path, os.stat_result]]:
    """(archive name, path, lstat) for every entry under root, refusing links and devices."""
    out: list[tuple[str, Path, os.stat_result]] = []
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if _ignored(entry.name):
                    continue
                try:
                    name = unicodedata.normalize("NFC", prefix + entry.name)
                    name.encode("utf-8")
                except UnicodeEncodeError:
                    raise LocalProtocolError(
                        f"{Path(entry.path)}: file name is not valid UTF-8"
                    ) from None
                path = Path(entry.path)
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    raise LocalProtocolError(
                        f"{path}: symbolic links are not allowed in a taskpack "
                        "(copy the target in instead)"
                    )
                if stat.S_ISDIR(st.st_mode):
                    out.append((name, path, st))
                    stack.append((path, name + "/"))
                elif stat.S_ISREG(st.st_mode):
                    out.append((name, path, st))
                else:
                    raise LocalProtocolError(f"{path}: not a regular file or directory")
    return out


def _tarinfo(name: str, is_dir: bool, size: int, executable: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir or executable else 0o644
    info.size = 0 if is_dir else size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_dir(root: str | Path, *, validate: bool = True) -> bytes:
    """The deterministic tar archive of taskpack directory `root`.

    Requires ``manifest.yaml`` at the top (validated unless ``validate=False``: raises
    ValidationError). Symlinks, devices, non-UTF-8 names, over-long paths, two names equal
    after NFC normalisation, or more than MAX_FILES / MAX_TOTAL_BYTES raise LocalProtocolError.
    """
    root = Path(root)
    if not root.is_dir():
        raise LocalProtocolError(f"{root}: not a directory")
    if not (root / MANIFEST_FILE).is_file():
        raise LocalProtocolError(f"{root}: no {MANIFEST_FILE} at the top of the taskpack")
    if validate:
        load_manifest(root)
    entries = _walk(root)
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    names = [name for name, _, _ in entries]
    for before, after in zip(names, names[1:], strict=False):
        if before == after:
            raise LocalProtocolError(f"{root}: two entries are named {after!r} after normalising")
    if len(entries) > MAX_FILES:
        raise LocalProtocolError(f"{root}: {len(entries)} entries, more than {MAX_FILES}")
    total = sum(st.st_size for _, _, st in entries if stat.S_ISREG(st.st_mode))
    if total > MAX_TOTAL_BYTES:
        raise LocalProtocolError(f"{root}: {total} bytes of files, more than {MAX_TOTAL_BYTES}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8") as tar:
        for name, path, st in entries:
            if len(name.encode("utf-8")) > _MAX_PATH:
                raise LocalProtocolError(f"{path}: path longer than {_MAX_PATH} bytes")
            if stat.S_ISDIR(st.st_mode):
                tar.addfile(_tarinfo(name, True, 0, False))
                continue
            data = path.read_bytes()  # read whole: the size in the header must match
            info = _tarinfo(name, False, len(data), bool(st.st_mode & 0o111))
            try:
                tar.addfile(info, io.BytesIO(data))
            except ValueError as exc:  # ustar cannot hold this name (split point)
                raise LocalProtocolError(f"{path}: cannot be stored: {exc}") from exc
    return buf.getvalue()


def _check_name(raw: str) -> str:
    """A member name made safe or RemoteProtocolError: relative, no '..', no oddities."""
    name = raw.rstrip("/") if raw not in ("/", "") else raw
    if not name:
        raise RemoteProtocolError(f"archive member {raw!r}: empty name")
    if "\\" in name or "\x00" in name:
        raise RemoteProtocolError(f"archive member {raw!r}: backslash or NUL in name")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise RemoteProtocolError(f"archive member {raw!r}: absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RemoteProtocolError(f"archive member {raw!r}: '..', '.' or empty path component")
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_PATH:
        raise RemoteProtocolError(f"archive member {raw[:80]!r}...: path too long")
    return name


def _open(archive: bytes) -> tarfile.TarFile:
    try:
        # "r:" -- uncompressed only: no decompression bombs, and it is the only kind we make.
        return tarfile.open(fileobj=io.BytesIO(archive), mode="r:", encoding="utf-8")
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise RemoteProtocolError(f"not a taskpack archive (uncompressed tar): {exc}") from exc


def _members(
    tar: tarfile.TarFile, max_files: int, max_total_bytes: int
) -> list[tuple[Member, tarfile.TarInfo]]:
    out: list[tuple[Member, tarfile.TarInfo]] = []
    seen: dict[str, bool] = {}
    total = 0
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError) as exc:
            raise RemoteProtocolError(f"corrupt archive after {len(out)} members: {exc}") from exc
        if info is None:
            return out
        name = _check_name(info.name)
        if len(out) >= max_files:
            raise RemoteProtocolError(f"archive member {name!r}: more than {max_files} members")
        if info.isdir():
            member = Member(name, True, 0, False)
        elif info.isreg():
            total += info.size
            if total > max_total_bytes:
                raise RemoteProtocolError(
                    f"archive member {name!r}: archive expands past {max_total_bytes} bytes"
                )
            member = Member(name, False, info.size, bool(info.mode & 0o111))
        else:
            kind = "link" if info.issym() or info.islnk() else "special file"
            raise RemoteProtocolError(f"archive member {name!r}: a {kind}, only files and dirs")
        if name in seen:
            raise RemoteProtocolError(f"archive member {name!r}: appears twice")
        # A file cannot also be the parent of another member.
        parent = name.rpartition("/")[0]
        while parent:
            if seen.get(parent) is False:
                raise RemoteProtocolError(f"archive member {name!r}: its parent is a file")
            parent = parent.rpartition("/")[0]
        seen[name] = member.is_dir
        out.append((member, info))


def scan(
    archive: bytes, *, max_files: int = MAX_FILES, max_total_bytes: int = MAX_TOTAL_BYTES
) -> list[Member]:
    """Check every member of `archive` without extracting; RemoteProtocolError if unsafe."""
    with _open(archive) as tar:
        return [m for m, _ in _members(tar, max_files, max_total_bytes)]


def unpack(
    archive: bytes,
    dest: str | Path,
    *,
    max_files: int = MAX_FILES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> list[Member]:
    """Extract `archive` into `dest` (created if missing; must be empty if it exists).

    Every member is checked before anything is written, so a refused archive leaves
    nothing behind. Files get mode 0644 (0755 if executable), directories 0755.
    """
    dest = Path(dest)
    with _open(archive) as tar:
        members = _members(tar, max_files, max_total_bytes)
        if dest.exists() and any(dest.iterdir()):
            raise LocalProtocolError(f"{dest}: not empty; unpack into a fresh directory")
        dest.mkdir(parents=True, exist_ok=True)
        for member, info in members:
            target = dest / member.name
            if member.is_dir:
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
                continue
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            src = tar.extractfile(info)
            if src is None:  # cannot happen for a regular file; keep the type checker honest
                raise RemoteProtocolError(f"archive member {member.name!r}: unreadable")
            data = src.read()
            if len(data) != member.size:
                raise RemoteProtocolError(f"archive member {member.name!r}: truncated")
            # O_EXCL|O_NOFOLLOW: never write through a link or over an earlier member.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(target, flags, 0o755 if member.executable else 0o644)
            except FileExistsError:  # e.g. "A" and "a" on a case-insensitive file system
                raise RemoteProtocolError(
                    f"archive member {member.name!r}: clashes with an earlier member"
                ) from None
            with os.fdopen(fd, "wb") as out:
                out.write(data)
    return [m for m, _ in members]


def read_member(archive: bytes, name: str, *, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
    """The bytes of regular-file member `name`.

    KeyError if there is no such file; RemoteProtocolError if the archive is unsafe or the
    member is larger than `max_bytes`.
    """
    with _open(archive) as tar:
        for member, info in _members(tar, MAX_FILES, MAX_TOTAL_BYTES):
            if member.name != name or member.is_dir:
                continue
            if member.size > max_bytes:
                raise RemoteProtocolError(f"archive member {name!r}: larger than {max_bytes}")
            src = tar.extractfile(info)
            data = src.read() if src is not None else b""
            if len(data) != member.size:
                raise RemoteProtocolError(f"archive member {name!r}: truncated")
            return data
    raise KeyError(name)
