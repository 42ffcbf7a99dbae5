"""Writing files so that a crash leaves the old file or the new one, never half of one.

Every file p2pfl writes for keeps (keys, task state, reports, models, tables) goes through
here: a temporary file in the same directory (so the rename stays on one filesystem),
flushed and fsynced, then renamed over the target. (The blob store has its own variant: its
temp names are recognised and swept when the store opens.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`.

    For writers that want a file name (numpy, pandas). `mode` None keeps mkstemp's 0600."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | bytearray | memoryview | str,
    *,
    mode: int | None = 0o644,
) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically and durably; returns the path."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)
