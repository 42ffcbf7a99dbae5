"""Confinement the worker applies to itself before any task code runs.

This is the second layer: the first is bubblewrap (p2pfl.runtime.bwrap), which already
hides everything but the runtime, the task's code, inputs and scratch dir, and the network.
- Resource limits (setrlimit, soft = hard so task code cannot raise them again):
  RLIMIT_AS from memory_bytes, RLIMIT_CPU from cpu_seconds (SIGXCPU at the limit, SIGKILL
  5 s later), RLIMIT_NPROC from nproc (counted per user namespace, so per worker under
  bwrap; never applied by the kernel to host root, hence also the pids cgroup),
  RLIMIT_CORE 0, RLIMIT_NOFILE 1024. The node's ResourcePolicy fills in the values.
- Landlock (Linux >= 5.13, unprivileged, no root tricks), when the kernel has it:
  writes are allowed only beneath the worker's temp dir and the given dirs (the private
  /tmp and /dev/shm; /dev/null), so the input data are read-only to the task; with
  ABI >= 4 TCP bind/connect are denied; with ABI >= 6 the task cannot signal processes
  outside its sandbox. Reads are not restricted here (bwrap's mount namespace does that).
Everything is best effort and reported back, so the node can log what was enforced.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pfl.runtime.jobs import Limits

MAX_OPEN_FILES = 1024

# Linux x86_64/aarch64 syscall numbers are the same for landlock (generic table).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem access rights (uapi/linux/landlock.h). Reads and execution are never handled,
# which leaves them allowed everywhere.
_WRITE_FILE = 1 << 1
_REMOVE_DIR = 1 << 4
_REMOVE_FILE = 1 << 5
_MAKE_CHAR = 1 << 6
_MAKE_DIR = 1 << 7
_MAKE_REG = 1 << 8
_MAKE_SOCK = 1 << 9
_MAKE_FIFO = 1 << 10
_MAKE_BLOCK = 1 << 11
_MAKE_SYM = 1 << 12
_REFER = 1 << 13  # ABI 2
_TRUNCATE = 1 << 14  # ABI 3
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_SIGNAL = 1 << 1  # ABI 6

_FILE_RIGHTS = _WRITE_FILE | _TRUNCATE  # the rights that apply to a single file


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel header
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def apply_rlimits(limits: Limits) -> dict[str, Any]:
    """Set the resource limits; returns what was set."""
    done: dict[str, Any] = {}

    def setlimit(name: str, which: int, soft: int, hard: int) -> None:
        try:
            resource.setrlimit(which, (soft, hard))
            done[name] = soft
        except (ValueError, OSError) as e:
            done[name] = f"not set: {e}"

    setlimit("core", resource.RLIMIT_CORE, 0, 0)
    setlimit("nofile", resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES)
    if limits.memory_bytes is not None:
        setlimit("as", resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes)
    if limits.cpu_seconds is not None:
        setlimit("cpu", resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 5)
    if limits.nproc is not None:
        setlimit("nproc", resource.RLIMIT_NPROC, limits.nproc, limits.nproc)
    return done


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 if unavailable."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        abi = libc.syscall(
            _SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
        )
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


def apply_landlock(writable_dir: Path, extra: Sequence[Path] = ()) -> dict[str, Any]:
    """Restrict writes to `writable_dir` and `extra` (deny TCP, signals out) for this process."""
    abi = landlock_abi()
    if abi < 1:
        return {"landlock": 0}
    libc = ctypes.CDLL(None, use_errno=True)
    fs = (
        _WRITE_FILE
        | _REMOVE_DIR
        | _REMOVE_FILE
        | _MAKE_CHAR
        | _MAKE_DIR
        | _MAKE_REG
        | _MAKE_SOCK
        | _MAKE_FIFO
        | _MAKE_BLOCK
        | _MAKE_SYM
    )
    if abi >= 2:
        fs |= _REFER
    if abi >= 3:
        fs |= _TRUNCATE
    attr = _RulesetAttr(fs, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_SIGNAL
        size = 24
    ruleset = libc.syscall(
        _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        return {"landlock": abi, "error": os.strerror(ctypes.get_errno())}
    try:
        allowed = [(writable_dir, fs)]
        allowed += [(p, fs) for p in extra if p.is_dir()]
        allowed += [(Path(os.devnull), _FILE_RIGHTS & fs)]
        for path, rights in allowed:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneathAttr(rights, fd)
                if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0):
                    err = os.strerror(ctypes.get_errno())
                    return {"landlock": abi, "error": f"add rule {path}: {err}"}
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            return {"landlock": abi, "error": "no_new_privs: " + os.strerror(ctypes.get_errno())}
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0):
            return {"landlock": abi, "error": "restrict: " + os.strerror(ctypes.get_errno())}
    finally:
        os.close(ruleset)
    return {
        "landlock": abi,
        "fs_writes": "workdir only",
        "tcp": "denied" if abi >= 4 else "allowed",
        "signals": "scoped" if abi >= 6 else "unscoped",
    }
