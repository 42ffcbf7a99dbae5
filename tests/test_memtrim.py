"""p2pfl.memtrim: freed large buffers are reused between trims, and a trim still returns
what stays free (each case in a fresh interpreter: the settings are process-wide)."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's mallopt and malloc_trim",
)

# A thread (as the node's event loop and LiveCluster's are: glibc gives it its own arena)
# frees a model-sized buffer and makes another: how many pages does the second one fault?
PROBE = """
import json, resource, sys, threading
from p2pfl import memtrim

out = {"set": memtrim.keep_freed_memory() if sys.argv[1] == "keep" else None}

def faults():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

def work():
    warm = [bytearray(4 << 20) for _ in range(4)]  # a round's worth of buffers
    del warm
    before = faults()
    again = [bytearray(4 << 20) for _ in range(4)]
    out["faults"] = faults() - before
    del again
    out["trimmed"] = memtrim.trim()

t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(out))
"""


def _probe(mode: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_freed_buffers_are_reused_instead_of_faulted_afresh() -> None:
    kept = _probe("keep")
    assert kept["set"] is True and kept["trimmed"] is True
    # 16 MiB is 4,096 pages: glibc's defaults map each 4 MiB buffer afresh, every page
    # faulted again; kept, the second set reuses the first set's pages.
    assert kept["faults"] < 100, kept
    assert _probe("default")["faults"] > 2000
