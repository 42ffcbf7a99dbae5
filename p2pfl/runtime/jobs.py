"""What the runtime is asked to do (jobs), with what (TaskSpec), and what comes back.

Jobs are frozen dataclasses; each has exactly one result type (see `run` in the runners):

    Validate()                         -> None        (JobError on refusal)
    InitialWeights()                   -> bytes | None  (p2pfl.wire.encode_tensors)
    Train(round, weights)              -> TrainResult
    Evaluate(round, weights)           -> dict         (metrics)
    Finalize(num_samples, metrics, aggregates) -> Partial  (Task.postprocess)
    Reduce(partials)                   -> dict
    Plan()                             -> [[key, digest], ...] | None  (None: not batched)
    RunBatch(index, total, keys, weights) -> {"rows": [...], "failed": [[key, reason], ...]}
    Transform(round, weights)          -> TransformResult (a derived table, npz bytes)

Both runners return `JobOutput(result, logs)`: the result above and the lines the task
wrote with `ctx.log` or `print` during the job, for the task's trace. Every failure is a
`JobError` carrying the same kind of logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from p2pfl.taskpack.sdk import DPConfig, Partial


@dataclass(frozen=True)
class Limits:
    """Resource limits of one task's worker (enforced by ChildProcessRunner only)."""

    timeout_s: float = 300.0  # per job, including (re)starting the worker
    memory_bytes: int | None = None  # RLIMIT_AS: address space, so leave room for imports
    cpu_seconds: int | None = None  # RLIMIT_CPU over the worker's whole life
    nproc: int | None = None  # processes and threads (RLIMIT_NPROC / pids cgroup)


@dataclass
class TaskSpec:
    """Everything needed to run one task's code on one node."""

    task_id: str
    node: str  # this node's peer id
    taskpack_dir: Path  # an extracted taskpack: holds src/task.py
    params: dict[str, Any]
    inputs: dict[str, Path]  # input name -> local dataset path
    seed: int
    rounds: int = 1
    protocol: str = "fedavg"
    mu: float = 0.0
    dp: DPConfig | None = None
    # Per-node persistent ctx.state (a JSON file written atomically); None: not persisted.
    state_path: Path | None = None
    limits: Limits = Limits()


@dataclass(frozen=True)
class Validate:
    """Dry-run `validate_inputs`: refuse (JobError) if the inputs are unusable."""


@dataclass(frozen=True)
class InitialWeights:
    """The initial global model as tensor-blob bytes, or None for a task without a model."""


@dataclass(frozen=True)
class Train:
    """One round of local work (`execute`) from the given global weights."""

    round: int
    weights: bytes | None  # tensor-blob bytes (p2pfl.wire.encode_tensors) or None


@dataclass(frozen=True)
class Evaluate:
    """Metrics of the given weights on local held-out data (`evaluate`)."""

    round: int
    weights: bytes | None


@dataclass(frozen=True)
class Finalize:
    """Shape this node's final partial (`postprocess`); its node is always this node."""

    num_samples: int
    metrics: dict[str, Any] = field(default_factory=dict)
    aggregates: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reduce:
    """The final step at the elected peer (`reduce`); needs no local data."""

    partials: list[Partial]


@dataclass(frozen=True)
class Plan:
    """A batched task's records (p2pfl.taskpack.batch): key and content digest of each,
    or None for a task that does not run in batches."""


@dataclass(frozen=True)
class RunBatch:
    """Run one batch of a batched task on the records named by `keys` (batch `index` of
    `total`, 1-based, for the task's log); `weights` is the model it applies, if any."""

    index: int
    total: int
    keys: list[str]
    weights: bytes | None = None


@dataclass(frozen=True)
class Transform:
    """Preprocessing: this node's derived table from the final statistics (`transform`)."""

    round: int
    weights: bytes | None


Job = Validate | InitialWeights | Train | Evaluate | Finalize | Reduce | Transform | Plan | RunBatch


@dataclass(frozen=True)
class TransformResult:
    """A derived table as npz bytes (X, y, feature_names; loaded without pickle)."""

    table: bytes
    records: int
    columns: list[str]


@dataclass(frozen=True)
class TrainResult:
    """The outcome of a Train job. `update` is what gets content-addressed and sent."""

    update: bytes | None  # encode_tensors(Update.weights), None for analysis tasks
    num_samples: int
    metrics: dict[str, Any] = field(default_factory=dict)
    aggregates: dict[str, Any] = field(default_factory=dict)


class JobOutput(NamedTuple):
    """What a runner's `run` returns: the job's result and the task's log lines."""

    result: Any
    logs: list[str]


# JobError kinds, so the node can branch without parsing reasons.
KIND_ERROR = "error"  # the task raised (or returned something unusable)
KIND_LOAD = "load"  # src/task.py could not be loaded (no/several Task subclasses, bad import)
KIND_MEMORY = "memory"  # MemoryError under the memory limit
KIND_TIMEOUT = "timeout"  # the job overran limits.timeout_s; the worker was killed
KIND_CPU = "cpu-limit"  # RLIMIT_CPU ran out (SIGXCPU)
KIND_CRASHED = "crashed"  # the worker died (signal or exit code)
KIND_BUDGET = "budget-exhausted"  # the DP epsilon reported exceeds the task's budget
KIND_CLOSED = "closed"  # close_task/aclose ended the worker while the job ran
KIND_PROTOCOL = "protocol"  # the worker sent something that is not a valid reply
KIND_SANDBOX = "sandbox"  # no usable sandbox: the node refuses to run taskpack code


class JobError(Exception):
    """A job failed. Never fatal to the node: it is a failed contribution.

    `reason` is one line for people ("timeout after 300 s", "crashed (signal 9 SIGKILL)",
    "ValueError: column 'age' missing", "memory limit: ...", "budget-exhausted: ...");
    `kind` is one of the KIND_* constants; `logs` holds the task's log lines up to the
    failure (for a dead worker: the tail of its stderr).
    """

    def __init__(self, reason: str, kind: str = KIND_ERROR, logs: list[str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.logs: list[str] = list(logs or [])

    def __repr__(self) -> str:
        return f"JobError({self.reason!r}, kind={self.kind!r})"
