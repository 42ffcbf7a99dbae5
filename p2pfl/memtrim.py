"""Give freed heap memory back to the operating system (glibc's malloc_trim).

A burst of large messages from peers (each up to MAX_GOSSIP_BYTES, read in 64 KiB pieces)
leaves the C heap fragmented: freed, yet still counted in the node's RSS, because glibc
only returns the top of the heap by itself. Measured on a node flooded with 600 gossip
messages of 450 KB: 200 MB of RSS after the flood, 101 MB after one malloc_trim(0).
The real node calls `trim()` periodically; elsewhere (no glibc) it does nothing.

The other way round, between trims: `keep_freed_memory()` makes glibc keep large freed
buffers for reuse instead of handing each back at once (its defaults map every buffer
over 128 KiB afresh, or trim the heap's top once 256 KiB are free, up to dynamic limits a
node's mix of sizes keeps resetting). A round moves many buffers of a model's size, and a
fresh page costs a fault: on this project's 2-core VMs, 3.5 us per 4 KiB page, ten times
copying it; measured here, a float64 copy of a 1 MB slice took 0.60 ms on fresh pages
and 0.05 ms on reused ones, and a reduce-scatter round over 8 hosts in one process faulted
18,000 pages in the event loop's own slice steps. The periodic trim still returns what
stays free, so a node's resident memory after a burst is bounded as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger("p2pfl.node")

TRIM_EVERY_S = 15.0  # a trim walks the heap: milliseconds, so a few times a minute is free
# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets: buffers up
# to MMAP_THRESHOLD come from the heap (glibc's dynamic ceiling for it), and up to
# TRIM_THRESHOLD of free heap is kept between periodic trims.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024

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


def keep_freed_memory() -> bool:
    """Let freed large buffers be reused (see the module's doc); False when this libc
    cannot (not glibc) or refused a setting. Process-wide; call once at start-up."""
    libc = _load()
    if libc is None:
        return False
    try:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) and ok
    except Exception:  # an optimisation only: never let it stop a node
        log.debug("mallopt failed", exc_info=True)
        return False
    return bool(ok)
