"""A pids cgroup per worker: the process limit that also binds a node running as root.

RLIMIT_NPROC is counted per user namespace, so inside bwrap's namespace it limits one
worker alone; but the kernel never applies it to processes whose real uid is host root.
A node run as root therefore also puts each worker into its own pids cgroup (v1 `pids`
hierarchy, or a v2 cgroup whose parent delegates `pids`) when it may create one. The
cgroup also lets the node kill whatever the task left running when the worker ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

PARENT_NAME = "p2pfl-workers"


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, options) of each cgroup mount."""
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, point, fstype, opts, *_ = line.split()
                if fstype in ("cgroup", "cgroup2"):
                    out.append((point, fstype, opts))
    except OSError:
        pass
    return out


def _own_path(v1_controller: str | None) -> str:
    """This process's cgroup path in the v1 hierarchy of `v1_controller` (None: v2)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if (v1_controller is None and controllers == "") or (
                    v1_controller is not None and v1_controller in controllers.split(",")
                ):
                    return path
    except OSError:
        pass
    return "/"


def pids_root() -> Path | None:
    """A directory where this process may create pids cgroups, or None."""
    for point, fstype, opts in _mounts():
        if fstype == "cgroup" and "pids" in opts.split(","):
            base = Path(point) / _own_path("pids").lstrip("/")
        elif fstype == "cgroup2":
            base = Path(point) / _own_path(None).lstrip("/")
            try:  # v2: usable only if our cgroup already hands `pids` to its children
                if "pids" not in (base / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        else:
            continue
        parent = base / PARENT_NAME
        try:
            parent.mkdir(exist_ok=True)
        except OSError:
            continue
        if os.access(parent, os.W_OK):
            return parent
    return None


class PidsCgroup:
    """One worker's pids cgroup: created before the worker, removed after it."""

    def __init__(self, root: Path, max_pids: int) -> None:
        self.path = root / f"w-{uuid.uuid4().hex[:16]}"
        self.path.mkdir()
        try:
            (self.path / "pids.max").write_text(str(max_pids))
        except OSError:
            self.path.rmdir()
            raise
        self.max_pids = max_pids

    @property
    def procs(self) -> Path:
        """Write a pid here to move that process (and its future children) in."""
        return self.path / "cgroup.procs"

    def kill_all(self) -> int:
        """SIGKILL every process still in the cgroup; how many there were."""
        try:
            pids = [int(p) for p in self.procs.read_text().split()]
        except (OSError, ValueError):
            return 0
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def remove(self) -> bool:
        """rmdir the cgroup (it must be empty); False if it still has processes."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True
