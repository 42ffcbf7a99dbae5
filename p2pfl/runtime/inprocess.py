"""InProcessRunner: task code in this process, for simulations of many nodes.

A thousand simulated nodes cannot each have a worker process, so all of them share this
process: each imported task module is cached per taskpack dir (1,000 nodes, one import),
and each (task_id, node) keeps its own Task instance, preprocessed data, ctx.state and
temp dir, exactly as a worker would.

Same semantics as ChildProcessRunner, minus isolation: no resource limits and no timeout
(a simulation runs under virtual time, and synchronous code cannot be pre-empted), no
sandbox, and a task that crashes the interpreter (os._exit, a segfault) ends the whole
simulation. Exceptions, SystemExit included, become JobError as they would in a worker.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from p2pfl.runtime.jobs import Job, JobError, JobOutput, TaskSpec
from p2pfl.runtime.loader import TaskSession, load_state, load_task_class, persist_state
from p2pfl.taskpack.sdk import Task

log = logging.getLogger("p2pfl.runtime")


class InProcessRunner:
    """Synchronous runner shared by all simulated nodes of one process."""

    def __init__(self, tmp_root: Path | None = None) -> None:
        self._tmp_root = tmp_root
        self._classes: dict[Path, type[Task]] = {}
        self._sessions: dict[tuple[str, str], TaskSession] = {}

    def run(self, spec: TaskSpec, job: Job) -> JobOutput:
        """Run `job` for (spec.task_id, spec.node); raises JobError only."""
        session = self._session(spec)
        try:
            result, logs = session.run(job)
        finally:
            # State a failing job changed is kept too (e.g. privacy budget spent).
            persist_state(session)
        return JobOutput(result, logs)

    def _session(self, spec: TaskSpec) -> TaskSession:
        key = (spec.task_id, spec.node)
        session = self._sessions.get(key)
        if session is not None:
            return session
        task_cls = self._task_class(spec.taskpack_dir)
        state = load_state(spec.state_path)
        workdir = Path(tempfile.mkdtemp(prefix="p2pfl-task-", dir=self._tmp_root))
        try:
            session = TaskSession(task_cls, spec, workdir, state)
        except JobError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._sessions[key] = session
        return session

    def _task_class(self, taskpack_dir: Path) -> type[Task]:
        key = Path(taskpack_dir).resolve()
        cls = self._classes.get(key)
        if cls is None:
            # A load failure is not cached: the next job retries, as a fresh worker would.
            cls = self._classes[key] = load_task_class(key)
        return cls

    def close_task(self, task_id: str, node: str) -> None:
        """Forget the node's Task instance and data, and wipe its temp dir."""
        session = self._sessions.pop((task_id, node), None)
        if session is not None:
            shutil.rmtree(session.workdir, ignore_errors=True)

    def close(self) -> None:
        """Close every session (the imported modules stay cached)."""
        for task_id, node in list(self._sessions):
            self.close_task(task_id, node)

    def sessions(self) -> list[tuple[str, str]]:
        """The (task_id, node) pairs with a live Task instance."""
        return list(self._sessions)

    def __enter__(self) -> InProcessRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
