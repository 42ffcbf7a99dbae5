"""Runs taskpack code: in a confined child process per task (real nodes) or in one shared
in-process pool (simulations). Both runners return `JobOutput(result, logs)` and raise
`JobError` only; see p2pfl.runtime.jobs for the jobs and their results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pfl.runtime.inprocess import InProcessRunner
from p2pfl.runtime.jobs import (
    KIND_BUDGET,
    KIND_CLOSED,
    KIND_CPU,
    KIND_CRASHED,
    KIND_ERROR,
    KIND_LOAD,
    KIND_MEMORY,
    KIND_PROTOCOL,
    KIND_TIMEOUT,
    Evaluate,
    Finalize,
    InitialWeights,
    Job,
    JobError,
    JobOutput,
    Limits,
    Reduce,
    TaskSpec,
    Train,
    TrainResult,
    Validate,
)
from p2pfl.taskpack.sdk import DPConfig, Partial

if TYPE_CHECKING:
    from p2pfl.runtime.child import ChildProcessRunner


def __getattr__(name: str) -> Any:
    # Imported lazily: the worker process imports this package and need not pay for trio.
    if name == "ChildProcessRunner":
        from p2pfl.runtime.child import ChildProcessRunner

        return ChildProcessRunner
    raise AttributeError(f"module 'p2pfl.runtime' has no attribute {name!r}")


__all__ = [
    "KIND_BUDGET",
    "KIND_CLOSED",
    "KIND_CPU",
    "KIND_CRASHED",
    "KIND_ERROR",
    "KIND_LOAD",
    "KIND_MEMORY",
    "KIND_PROTOCOL",
    "KIND_TIMEOUT",
    "ChildProcessRunner",
    "DPConfig",
    "Evaluate",
    "Finalize",
    "InProcessRunner",
    "InitialWeights",
    "Job",
    "JobError",
    "JobOutput",
    "Limits",
    "Partial",
    "Reduce",
    "TaskSpec",
    "Train",
    "TrainResult",
    "Validate",
]
