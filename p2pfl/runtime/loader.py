"""Shared by both runners: load a taskpack's Task class, build Contexts, run jobs on hooks.

`TaskSession` is one live Task instance with its preprocessed data and its ctx.state, for
one (task_id, node). `session.run(job)` returns `(result, logs)` or raises `JobError`;
anything the task raises becomes a JobError, so callers handle exactly one exception.

Task modules are loaded as `<unique package>.task`, the package's path being the
taskpack's `src/`: helper modules beside task.py are imported relatively
(`from .model import Net`); `src/` is never put on sys.path, so two taskpacks that
both ship a `model.py` cannot collide in the shared simulation process.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import itertools
import json
import math
import sys
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.fsutil import atomic_write
from p2pfl.runtime.jobs import (
    KIND_BUDGET,
    KIND_ERROR,
    KIND_LOAD,
    KIND_MEMORY,
    Evaluate,
    Finalize,
    InitialWeights,
    Job,
    JobError,
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
from p2pfl.taskpack.sdk import Context, Partial, Task, Update, Weights
from p2pfl.wire import decode_tensors, encode_tensors

MAX_LOG_LINES = 500  # per job: a chatty task must not flood the trace
MAX_LOG_LINE = 2000  # characters per line
MAX_TRACEBACK_LINES = 30

_module_ids = itertools.count()


# --- loading -----------------------------------------------------------------------


def load_task_class(taskpack_dir: Path) -> type[Task]:
    """Import `taskpack_dir/src/task.py` and return its one Task subclass (JobError if not)."""
    src = Path(taskpack_dir) / "src"
    path = src / "task.py"
    if not path.is_file():
        raise JobError(f"taskpack has no src/task.py (looked in {src})", KIND_LOAD)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    pkg_name = f"_p2pfl_taskpack_{digest}_{next(_module_ids)}"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(src)]  # makes `from .helper import x` work inside task.py
    pkg.__package__ = pkg_name
    name = f"{pkg_name}.task"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise JobError(f"cannot import {path}", KIND_LOAD)
    module = importlib.util.module_from_spec(spec)
    # Registered before exec: dataclasses and pickling-free introspection look modules up.
    sys.modules[pkg_name] = pkg
    sys.modules[name] = module
    # The taskpack dir is content-addressed storage: no __pycache__ written into it.
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        for key in [k for k in sys.modules if k == pkg_name or k.startswith(pkg_name + ".")]:
            del sys.modules[key]
        raise JobError(
            f"cannot load src/task.py: {describe(e)}", KIND_LOAD, traceback_lines(e)
        ) from None
    finally:
        sys.dont_write_bytecode = saved
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Task)
        and obj is not Task
        and obj.__module__ == name  # defined here, not imported (e.g. a base class)
    ]
    if len(found) != 1:
        what = "no Task subclass" if not found else f"{len(found)} Task subclasses"
        names = ", ".join(sorted(c.__name__ for c in found))
        raise JobError(
            f"src/task.py defines {what}{f' ({names})' if names else ''}; exactly one is needed",
            KIND_LOAD,
        )
    return found[0]


# --- describing failures ----------------------------------------------------------


def describe(e: BaseException) -> str:
    """One line naming an exception: "ValueError: column 'age' missing"."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:MAX_LOG_LINE] if text else type(e).__name__


def traceback_lines(e: BaseException) -> list[str]:
    lines = "".join(traceback.format_exception(e)).rstrip().splitlines()
    if len(lines) > MAX_TRACEBACK_LINES:
        lines = ["..."] + lines[-MAX_TRACEBACK_LINES:]
    return [line[:MAX_LOG_LINE] for line in lines]


def job_error(e: BaseException, logs: list[str]) -> JobError:
    """The JobError for an exception raised by task code."""
    if isinstance(e, JobError):
        e.logs = logs + e.logs
        return e
    if isinstance(e, MemoryError):
        return JobError(f"memory limit: {describe(e)}", KIND_MEMORY, logs)
    return JobError(describe(e), KIND_ERROR, logs + traceback_lines(e))


# --- plain values ------------------------------------------------------------------


def plain(value: Any, where: str) -> Any:
    """`value` as msgpack/JSON-able plain data (numpy scalars and arrays converted)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise JobError(f"{where}: key {k!r} is not a str")
            out[k] = plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise JobError(f"{where}: {type(value).__name__} is not plain data (str, number, list, dict)")


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise JobError(f"{where} must be an int >= 0, got {value!r}")
    return int(value)


def _partial(p: Any, where: str) -> Partial:
    if not isinstance(p, Partial):
        raise JobError(f"{where} must return a Partial, got {type(p).__name__}")
    return Partial(
        node=str(p.node),
        num_samples=_count(p.num_samples, f"{where}: num_samples"),
        metrics=plain(p.metrics, f"{where}: metrics"),
        aggregates=plain(p.aggregates, f"{where}: aggregates"),
    )


def encode_weights(weights: Any, where: str) -> bytes:
    """Tensor-blob bytes for weights a hook returned, checked the way peers will check them."""
    if not isinstance(weights, dict):
        raise JobError(f"{where} must be a dict of arrays, got {type(weights).__name__}")
    try:
        blob = bytes(encode_tensors(weights))
        decode_tensors(blob)  # peers reject NaN/Inf: refuse to release what they would drop
    except Exception as e:
        raise JobError(f"{where}: {describe(e)}") from None
    return blob


def decode_weights(blob: bytes | None) -> Weights | None:
    """Writable copies: task code may update arrays in place (torch.from_numpy, +=)."""
    if blob is None:
        return None
    try:
        return {k: np.array(v, copy=True) for k, v in decode_tensors(blob).items()}
    except Exception as e:
        raise JobError(f"weights given to the task are invalid: {describe(e)}") from None


# --- state -------------------------------------------------------------------------


def load_state(path: Path | None) -> dict[str, Any]:
    """The persisted ctx.state ({} if none yet). A corrupt file is an error, not a reset:
    silently forgetting state could e.g. reset a privacy budget."""
    if path is None or not Path(path).exists():
        return {}
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise JobError(f"cannot read task state {path}: {describe(e)}", KIND_LOAD) from None
    if not isinstance(state, dict):
        raise JobError(f"task state {path} is not a JSON object", KIND_LOAD)
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ctx.state atomically, so a crash leaves the old state or the new (mode 0600:
    it is the task's private state)."""
    atomic_write(path, json.dumps(state, sort_keys=True), mode=None)


def persist_state(session: TaskSession) -> None:
    """Save the session's state if its last job changed it (JobError if the disk fails)."""
    path = session.spec.state_path
    if session.state_changed and path is not None:
        try:
            save_state(path, session.state)
        except OSError as e:
            raise JobError(f"cannot save task state {path}: {describe(e)}") from None
        session.state_changed = False


# --- logs --------------------------------------------------------------------------


class _LogCollector:
    """Collects ctx.log and print() lines of one job, capped."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.dropped = 0

    def add(self, text: object) -> None:
        for line in str(text).splitlines() or [""]:
            if len(self.lines) < MAX_LOG_LINES:
                self.lines.append(line[:MAX_LOG_LINE])
            else:
                self.dropped += 1

    def result(self) -> list[str]:
        if self.dropped:
            return self.lines + [f"... {self.dropped} more log lines dropped"]
        return list(self.lines)


class _PrintCapture(io.TextIOBase):
    """A sys.stdout stand-in: print() output becomes log lines."""

    def __init__(self, sink: Callable[[object], None]) -> None:
        self._sink = sink
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self._sink(line)
        return len(s)

    def flush(self) -> None:
        if self._buf:
            self._sink(self._buf)
            self._buf = ""


# --- the session -------------------------------------------------------------------


class TaskSession:
    """One Task instance, its preprocessed data and ctx.state for one (task_id, node).

    `state` starts as given (the runner loads it) and `state_changed` tells the runner
    after each job whether to persist `state` again. Data is preprocessed lazily by the
    first Train/Evaluate: Validate, InitialWeights, Finalize and Reduce never need it.
    """

    def __init__(
        self, task_cls: type[Task], spec: TaskSpec, workdir: Path, state: dict[str, Any]
    ) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.state = state
        self._saved = json.dumps(state, sort_keys=True)
        self.state_changed = False
        self._data: Any = None
        self._have_data = False
        self._batch_weights: Weights | None = None  # a batched task's model, decoded once
        collector = _LogCollector()
        try:
            with contextlib.redirect_stdout(_PrintCapture(collector.add)):
                self.task = task_cls()
        except (Exception, SystemExit) as e:
            raise JobError(
                f"cannot create {task_cls.__name__}(): {describe(e)}",
                KIND_LOAD,
                collector.result() + traceback_lines(e),
            ) from None

    def context(self, round: int, log: Callable[[str], None]) -> Context:
        s = self.spec
        return Context(
            task_id=s.task_id,
            node=s.node,
            params=copy.deepcopy(s.params),  # a hook mutating params must not leak into the next
            seed=s.seed,
            round=round,
            rounds=s.rounds,
            protocol=s.protocol,
            mu=s.mu,
            dp=copy.deepcopy(s.dp),
            state=self.state,  # the same dict every job: that is how state persists
            workdir=self.workdir,
            log=log,
        )

    def run(self, job: Job) -> tuple[Any, list[str]]:
        """Run one job; returns (result, logs). Raises JobError only."""
        collector = _LogCollector()
        capture = _PrintCapture(collector.add)
        try:
            with contextlib.redirect_stdout(capture):
                try:
                    result = self._dispatch(job, collector.add)
                finally:
                    capture.flush()
        except (Exception, SystemExit) as e:
            self._check_state(collector)
            raise job_error(e, collector.result()) from None
        self._check_state(collector)
        return result, collector.result()

    def _check_state(self, collector: _LogCollector) -> None:
        """Note whether ctx.state changed; unserialisable state is rolled back and logged."""
        try:
            now = json.dumps(self.state, sort_keys=True)
        except (TypeError, ValueError) as e:
            collector.add(f"ctx.state is not JSON-serialisable ({describe(e)}); change dropped")
            self.state.clear()
            self.state.update(json.loads(self._saved))
            self.state_changed = False
            return
        self.state_changed = now != self._saved
        self._saved = now

    def _data_for(self, ctx: Context) -> Any:
        if not self._have_data:
            self._data = self.task.preprocess(ctx, dict(self.spec.inputs))
            self._have_data = True
        return self._data

    def _dispatch(self, job: Job, log: Callable[[str], None]) -> Any:
        name = type(self.task).__name__
        match job:
            case Validate():
                self.task.validate_inputs(self.context(0, log), dict(self.spec.inputs))
                return None
            case InitialWeights():
                weights = self.task.initial_weights(self.context(0, log))
                if weights is None:
                    return None
                return encode_weights(weights, f"{name}.initial_weights")
            case Train(round=rnd, weights=blob):
                ctx = self.context(rnd, log)
                data = self._data_for(ctx)
                update = self.task.execute(ctx, data, decode_weights(blob))
                return self._train_result(update, f"{name}.execute")
            case Evaluate(round=rnd, weights=blob):
                ctx = self.context(rnd, log)
                data = self._data_for(ctx)
                metrics = self.task.evaluate(ctx, data, decode_weights(blob))
                if not isinstance(metrics, dict):
                    raise JobError(f"{name}.evaluate must return a dict of metrics")
                return plain(metrics, f"{name}.evaluate")
            case Transform(round=rnd, weights=blob):
                ctx = self.context(rnd, log)
                table = self.task.transform(ctx, self._data_for(ctx), decode_weights(blob))
                return encode_table(table, f"{name}.transform")
            case Finalize(num_samples=n, metrics=metrics, aggregates=aggregates):
                partial = Partial(self.spec.node, n, dict(metrics), dict(aggregates))
                out = _partial(self.task.postprocess(self.context(0, log), partial), name)
                out.node = self.spec.node  # a task cannot speak for another node
                return out
            case Plan():
                return self._plan(log)
            case RunBatch(index=index, total=total, keys=keys, weights=blob):
                return self._run_batch(index, total, keys, blob, log)
            case Reduce(partials=partials):
                result = self.task.reduce(self.context(0, log), list(partials))
                if not isinstance(result, dict):
                    raise JobError(f"{name}.reduce must return a dict")
                return plain(result, f"{name}.reduce")
        raise JobError(f"unknown job {type(job).__name__}")

    def _plan(self, log: Callable[[str], None]) -> list[list[str]] | None:
        from p2pfl.taskpack.batch import BatchTask

        if not isinstance(self.task, BatchTask):
            return None
        records = self.task.records(self.context(0, log), dict(self.spec.inputs))
        return [[str(r.key), str(r.digest)] for r in records]

    def _run_batch(
        self,
        index: int,
        total: int,
        keys: list[str],
        blob: bytes | None,
        log: Callable[[str], None],
    ) -> dict[str, Any]:
        from p2pfl.taskpack.batch import BatchOutput, BatchTask

        name = type(self.task).__name__
        if not isinstance(self.task, BatchTask):
            raise JobError(f"{name} is not a batched task (derive from BatchTask)")
        ctx = self.context(1, log)
        if self._batch_weights is None and blob is not None:
            self._batch_weights = decode_weights(blob)
        out = self.task.run_batch(ctx, dict(self.spec.inputs), list(keys), self._batch_weights)
        if not isinstance(out, BatchOutput):
            raise JobError(f"{name}.run_batch must return a BatchOutput")
        return {
            "rows": plain(out.rows, f"{name} batch {index}/{total}: rows"),
            "failed": [[str(k), str(why)] for k, why in out.failed],
        }

    def _train_result(self, update: Any, where: str) -> TrainResult:
        if not isinstance(update, Update):
            raise JobError(f"{where} must return an Update, got {type(update).__name__}")
        metrics = plain(update.metrics, f"{where}: metrics")
        dp = self.spec.dp
        eps = metrics.get("epsilon") if isinstance(metrics, dict) else None
        # A node stops contributing when its privacy budget would be exceeded: an update
        # trained past the budget never leaves the runtime.
        if dp is not None and isinstance(eps, int | float) and not math.isnan(eps):
            if eps > dp.epsilon * (1 + 1e-9):
                raise JobError(
                    f"budget-exhausted: epsilon {eps:.4g} > budget {dp.epsilon:.4g}", KIND_BUDGET
                )
        blob = None if update.weights is None else encode_weights(update.weights, where)
        return TrainResult(
            update=blob,
            num_samples=_count(update.num_samples, f"{where}: num_samples"),
            metrics=metrics,
            aggregates=plain(update.aggregates, f"{where}: aggregates"),
        )


def encode_table(table: Any, where: str) -> TransformResult:
    """A `Table` as npz bytes (plain arrays only: it is read back without pickle)."""
    from p2pfl.taskpack.sdk import Table

    if not isinstance(table, Table):
        raise JobError(f"{where} must return a Table, got {type(table).__name__}")
    X = np.asarray(table.X, dtype=np.float32)
    y = np.asarray(table.y, dtype=np.int64)
    names = [str(n) for n in table.feature_names]
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[1] != len(names):
        raise JobError(f"{where}: X {X.shape}, y {y.shape} and {len(names)} names disagree")
    if not np.all(np.isfinite(X)):
        raise JobError(f"{where}: the table holds NaN or Inf")
    buf = io.BytesIO()
    np.savez(buf, X=X, y=y, feature_names=np.array(names, dtype=str))
    return TransformResult(buf.getvalue(), int(X.shape[0]), names)
