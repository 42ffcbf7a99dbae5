"""The append-only audit log, ``DATA_DIR/audit.jsonl``: one JSON object per line.

What it records (each with ``t``, seconds since the epoch, and ``kind``):

* ``offer``:   task, requester, decision (allowed | declined), rule, reason
* ``release``: task, round, what (update, partial, result...; ``kind=`` is accepted), bytes,
  dp_spend
* ``policy``:  action (load | reload | change | error), digest (sha256 of the effective policy)

Each line is written with one ``write`` on an ``O_APPEND`` descriptor, flushed and fsynced
before `record` returns: a crash loses at most the line being written. `read` skips a torn
last line (a crash in mid-write) and shows a corrupted line elsewhere as
``{"kind": "corrupt", "line": N}`` rather than hiding it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"
REQUIRED: dict[str, tuple[str, ...]] = {
    "offer": ("task", "requester", "decision", "rule", "reason"),
    "release": ("task", "round", "what", "bytes", "dp_spend"),
    "policy": ("action", "digest"),
    "privacy": ("task", "dataset", "epsilon"),  # a DP spend charged to a dataset's budget
    "usage": ("task", "records", "datasets"),  # a run counted against its requester's caps
}


class AuditLog:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._checked_tail = False

    def record(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Append one entry (durably) and return it. `kind` is offer | release | policy.

        A release's own kind (update, partial, result...) may be passed as ``kind=`` too;
        it is stored as ``what`` (the entry's ``kind`` is "release")."""
        if kind == "release" and "kind" in fields:
            fields["what"] = fields.pop("kind")
        need = REQUIRED.get(kind)
        if need is None:
            raise ValueError(f"unknown audit kind {kind!r} (one of {', '.join(REQUIRED)})")
        missing = [f for f in need if f not in fields]
        if missing:
            raise ValueError(f"audit {kind} entry lacks {', '.join(missing)}")
        entry: dict[str, Any] = {"t": self.clock(), "kind": kind, **fields}
        line = json.dumps(entry, sort_keys=False, default=str, allow_nan=False) + "\n"
        self._append(line.encode("utf-8"))
        return entry

    def _append(self, data: bytes) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if not self._checked_tail:
                # A torn last line from a crash: end it, so our entry starts on its own line.
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data
                self._checked_tail = True
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.path.parent)  # the file's name is durable too

    def read(self, task: str | None = None) -> list[dict[str, Any]]:
        """Every entry (of one task, if given), oldest first."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        torn_tail = not data.endswith(b"\n")
        out: list[dict[str, Any]] = []
        for i, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
            except ValueError:
                if torn_tail and i == len(lines):
                    continue  # the write a crash interrupted
                entry = {"kind": "corrupt", "line": i}
            if task is None or entry.get("task") == task:
                out.append(entry)
        return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the data itself is synced
    finally:
        os.close(fd)
