"""Runs taskpack code: in a confined child process per task (real nodes) or in one shared
in-process pool (simulations).

    runner = ChildProcessRunner()                    # async (trio); InProcessRunner: sync
    out = await runner.run(spec, Train(round=1, weights=blob))
    out.result  -> TrainResult(update=bytes | None, num_samples, metrics, aggregates)
    out.logs    -> the task's ctx.log / print() lines of this job
    await runner.close_task(task_id, node); await runner.aclose()

Both runners return `JobOutput(result, logs)` and raise `JobError(reason, kind, logs)`
only; see p2pfl.runtime.jobs for the jobs and their results. One Task instance and its
preprocessed data live per (task_id, node) until close_task; the spec of the first job of
that session stays in force. ctx.state persists in spec.state_path (atomic JSON writes),
also after a failed job that the worker survived.

Enforced for ChildProcessRunner only: a bubblewrap jail (p2pfl.runtime.bwrap: only the
runtime, the taskpack's code, its input files and a scratch dir are visible; no network;
own PID namespace; cleared environment), a pids cgroup where possible, per-job timeout,
RLIMIT_AS/CPU/NPROC/CORE/NOFILE from the node's ResourcePolicy (p2pfl.runtime.policy) and,
where the kernel has Landlock, writes only beneath the scratch dir and private tmpfs, no
TCP, no signals out (p2pfl.runtime.sandbox). No usable bwrap: JobError(KIND_SANDBOX),
unless the runner was built with unsafe_no_sandbox=True. InProcessRunner (simulations)
confines nothing.
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
    KIND_SANDBOX,
    KIND_TIMEOUT,
    Evaluate,
    Finalize,
    InitialWeights,
    Job,
    JobError,
    JobOutput,
    Limits,
    Plan,
    Reduce,
    RunBatch,
    TaskSpec,
    Train,
    TrainResult,
    Transform,
    TransformResult,
    Validate,
)
from p2pfl.runtime.policy import ResourcePolicy
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
    "KIND_SANDBOX",
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
    "Plan",
    "Reduce",
    "ResourcePolicy",
    "RunBatch",
    "TaskSpec",
    "Train",
    "TrainResult",
    "Transform",
    "TransformResult",
    "Validate",
]
