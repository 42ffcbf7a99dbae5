"""Taskpack jobs of a simulation on a Ray cluster: `executor: {kind: ray}`.

The simulated protocol stays in this process under virtual time (p2pfl.sim.io decides
when each job's outcome lands); only the jobs go to Ray. A fixed set of Ray actors
(`JobHost`, one per `cpus_per_job` CPUs of the cluster) each serve a share of the
simulated nodes: every node always goes to the same host, which keeps that node's Task
instance, preprocessed data and ctx.state between rounds (an InProcessRunner), exactly
as the local executor does. Files are shipped once per host: a taskpack's tree when a
host first runs one of its jobs, a node's data file when it first runs that node's job.
Per job only the job itself travels (global weights, a round number).

Everything that crosses to an actor is msgpack (p2pfl.runtime.protocol, the same
encoding the confined worker of a real node speaks) or plain bytes: no pickle of task
data. Jobs of one node run in submission order (one caller, one actor, one thread).

    executor = RayExecutor(address="auto", cpus_per_job=1)
    wait = executor.submit(spec, Train(1, weights))   # returns at once
    output, error = wait()                            # (JobOutput, None) | (None, reason)
    executor.run(spec, job)                           # submit + wait; raises JobError
    executor.close()
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from p2pfl.runtime.inprocess import InProcessRunner
from p2pfl.runtime.jobs import KIND_CRASHED, KIND_PROTOCOL, Job, JobError, JobOutput, TaskSpec
from p2pfl.runtime.protocol import (
    ProtocolError,
    decode_job,
    decode_result,
    decode_spec,
    encode_job,
    encode_result,
    encode_spec,
)

log = logging.getLogger("p2pfl.sim.ray")

RAY_VERSION = "2.60.0"  # the pin of the [ray] extra in pyproject.toml
INSTALL_HINT = (
    f"--executor ray needs Ray: pip install -e '.[ray]' (or pip install 'ray=={RAY_VERSION}')"
)
# A taskpack is small source code; this bounds what one tree ship reads into memory.
MAX_TASKPACK_BYTES = 64 << 20

Outcome = tuple[JobOutput | None, str | None]
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}")


def import_ray() -> Any:
    """The ray module, or ImportError with the one line that says what to install."""
    try:
        import ray
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return ray


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


# --- the actor's side --------------------------------------------------------------


class JobHost:
    """One Ray actor's body: an InProcessRunner for the simulated nodes it serves, and
    its own copies of the files they read, under a temp dir of the actor's machine.

    Files are known by the simulation's path (a key, looked up, never joined into a
    path here): copies are named by a counter."""

    def __init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="p2pfl-ray-host-"))
        self._runner = InProcessRunner(tmp_root=self._root)
        self._copies: dict[str, Path] = {}

    def put_file(self, key: str, data: bytes) -> None:
        """Keep `data` as the file the simulation calls `key`."""
        # The suffix stays: readers pick the table format by it (.npz, .csv).
        suffix = Path(key).suffix
        if not _SUFFIX.fullmatch(suffix):
            suffix = ""
        path = self._root / f"file-{len(self._copies)}{suffix}"
        path.write_bytes(data)
        self._copies[key] = path

    def put_tree(self, key: str, files: list[tuple[str, bytes]]) -> None:
        """Keep a directory (a taskpack) the simulation calls `key`: (relative path, bytes)."""
        base = self._root / f"tree-{len(self._copies)}"
        for rel, data in files:
            parts = Path(rel).parts
            if not parts or Path(rel).is_absolute() or any(p in ("..", ".") for p in parts):
                raise ValueError(f"put_tree: refusing the path {rel!r}")
            target = base.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        base.mkdir(parents=True, exist_ok=True)
        self._copies[key] = base

    def run(self, request: bytes) -> bytes:
        """One job: msgpack {"spec", "job"} in, msgpack reply out (p2pfl.runtime.protocol's
        reply shape: {"ok": true, "result", "logs"} or {"ok": false, "reason", "kind",
        "logs"})."""
        try:
            try:
                msg = _unpack(request)
                job = decode_job(msg["job"])
                spec = self._local_spec(msg["spec"])
            except (ProtocolError, ValueError, TypeError, KeyError) as e:
                raise JobError(f"bad request: {type(e).__name__}: {e}", KIND_PROTOCOL) from None
            output = self._runner.run(spec, job)
        except JobError as e:
            return _pack({"ok": False, "reason": e.reason, "kind": e.kind, "logs": e.logs})
        return _pack({"ok": True, "result": encode_result(job, output.result), "logs": output.logs})

    def _local_spec(self, d: dict[str, Any]) -> TaskSpec:
        spec = decode_spec(d)
        try:
            spec.taskpack_dir = self._copies[str(d["taskpack_dir"])]
            spec.inputs = {name: self._copies[str(p)] for name, p in d["inputs"].items()}
        except KeyError as e:
            raise JobError(f"this Ray host holds no copy of {e.args[0]}") from None
        return spec

    def close_task(self, task_id: str, node: str) -> None:
        self._runner.close_task(task_id, node)

    def close(self) -> None:
        self._runner.close()
        shutil.rmtree(self._root, ignore_errors=True)


# --- the simulation's side ---------------------------------------------------------


class RayExecutor:
    """Runs simulated nodes' jobs on Ray actors (see the module docstring).

    `address`: None starts a Ray on this machine (or joins RAY_ADDRESS), "auto" joins the
    cluster running on this machine, "HOST:PORT" a cluster's head, "ray://HOST:10001"
    through Ray Client. A Ray already initialised in this process is used as it is.
    `hosts`: how many actors (default: the cluster's CPUs / cpus_per_job)."""

    def __init__(
        self,
        *,
        address: str | None = None,
        cpus_per_job: float = 1.0,
        hosts: int | None = None,
    ) -> None:
        if not cpus_per_job > 0:
            raise ValueError(f"cpus_per_job must be > 0, got {cpus_per_job}")
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        if hosts is None:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            hosts = max(1, int(cpus // cpus_per_job))
        actor = ray.remote(JobHost).options(num_cpus=cpus_per_job)
        self._hosts = [actor.remote() for _ in range(hosts)]
        self._host_of: dict[str, int] = {}  # node (peer id) -> index into _hosts
        self._shipped: set[tuple[int, str]] = set()
        self.jobs = 0  # submitted so far (benchmarks and tests read it)

    @property
    def hosts(self) -> int:
        return len(self._hosts)

    def _host(self, node: str) -> int:
        index = self._host_of.get(node)
        if index is None:  # in order of first job: spreads nodes evenly over the hosts
            index = self._host_of[node] = len(self._host_of) % len(self._hosts)
        return index

    def _ship(self, index: int, spec: TaskSpec) -> None:
        """What host `index` needs for `spec` and does not hold yet (asynchronously: the
        actor receives it before the job that follows)."""
        host = self._hosts[index]
        tree = str(spec.taskpack_dir)
        if (index, tree) not in self._shipped:
            host.put_tree.remote(tree, _read_tree(Path(spec.taskpack_dir)))
            self._shipped.add((index, tree))
        for path in spec.inputs.values():
            key = str(path)
            if (index, key) not in self._shipped:
                host.put_file.remote(key, Path(path).read_bytes())
                self._shipped.add((index, key))

    def submit(self, spec: TaskSpec, job: Job) -> Callable[[], Outcome]:
        """Start `job` on the node's host; the returned function waits for its outcome."""
        if spec.state_path is not None:  # simulated nodes have none (no state_dir)
            failed: Outcome = (None, "the Ray executor keeps no ctx.state file")
            return lambda: failed
        index = self._host(spec.node)
        self._ship(index, spec)
        wire = encode_spec(spec)
        if spec.dp is not None:  # encode_spec leaves this out: a real worker never has it
            wire["dp"]["deterministic"] = spec.dp.deterministic
        ref = self._hosts[index].run.remote(_pack({"spec": wire, "job": encode_job(job)}))
        self.jobs += 1

        def wait() -> Outcome:
            try:
                reply = _unpack(self._ray.get(ref))
            except self._ray.exceptions.RayError as e:  # the actor or its node died
                return None, f"{KIND_CRASHED}: Ray: {type(e).__name__}: {str(e)[:200]}"
            if not reply["ok"]:
                return None, str(reply["reason"])
            return JobOutput(decode_result(job, reply["result"]), list(reply["logs"])), None

        return wait

    def run(self, spec: TaskSpec, job: Job) -> JobOutput:
        """Run `job` and wait for it (the cluster's test-set evaluations); JobError on failure."""
        output, error = self.submit(spec, job)()
        if output is None:
            raise JobError(error or "failed")
        return output

    def close_task(self, task_id: str, node: str) -> None:
        index = self._host_of.get(node)
        if index is not None:
            self._hosts[index].close_task.remote(task_id, node)

    def close(self) -> None:
        """End the actors (Ray itself stays up for the next run of this process)."""
        hosts, self._hosts = self._hosts, []
        if hosts:
            try:
                self._ray.get([h.close.remote() for h in hosts])
            except self._ray.exceptions.RayError as e:
                log.warning("closing Ray hosts: %s", e)
        for h in hosts:
            self._ray.kill(h)

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_tree(root: Path) -> list[tuple[str, bytes]]:
    """Every regular file under `root` as (relative path, bytes), caches left out."""
    files: list[tuple[str, bytes]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            total += len(data)
            if total > MAX_TASKPACK_BYTES:
                raise JobError(f"taskpack {root} is over {MAX_TASKPACK_BYTES >> 20} MB")
            files.append((path.relative_to(root).as_posix(), data))
    return files
