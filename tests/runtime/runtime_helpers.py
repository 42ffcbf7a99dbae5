"""Small numpy-only taskpacks and a harness that drives both runners the same way.

(A uniquely named module, imported by conftest.py and the tests: several test dirs have
a conftest.py, so none of them can be imported by that name.)

`runner` is parametrised over ["inprocess", "child"]; both are used through the async
`Harness.run` so one test body covers both (the in-process runner is called directly,
synchronously, inside it).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from p2pfl.runtime import ChildProcessRunner, InProcessRunner, JobOutput, TaskSpec

TRAIN_TASK = """
import numpy as np
from p2pfl.taskpack.sdk import Task, Update
from .helper import gradient   # relative import of a module beside task.py

class LinReg(Task):
    def validate_inputs(self, ctx, inputs):
        super().validate_inputs(ctx, inputs)
        if "data" not in inputs:
            raise ValueError("input 'data' missing")

    def preprocess(self, ctx, inputs):
        ctx.state["preprocessed"] = ctx.state.get("preprocessed", 0) + 1
        arr = np.loadtxt(inputs["data"], delimiter=",")
        return arr[:, :-1], arr[:, -1]

    def initial_weights(self, ctx):
        rng = np.random.default_rng(ctx.seed)
        return {"w": rng.normal(size=2).astype(np.float32), "b": np.zeros(1, np.float32)}

    def execute(self, ctx, data, weights):
        x, y = data
        gw, gb = gradient(x, y, weights["w"], weights["b"])
        weights["w"] -= ctx.params["lr"] * gw      # in place: weights must be writable
        weights["b"] -= ctx.params["lr"] * gb
        ctx.state["rounds_done"] = ctx.state.get("rounds_done", 0) + 1
        ctx.log(f"round {ctx.round} of {ctx.rounds} lr={ctx.params['lr']}")
        print("printed by the task")
        loss = float(np.mean((x @ weights["w"] + weights["b"] - y) ** 2))
        return Update(num_samples=len(y), weights=weights, metrics={"loss": np.float32(loss)})

    def evaluate(self, ctx, data, weights):
        x, y = data
        mse = np.mean((x @ weights["w"] + weights["b"] - y) ** 2)
        return {"mse": mse, "num_samples": len(y)}
"""

TRAIN_HELPER = """
import numpy as np

def gradient(x, y, w, b):
    err = x @ w + b - y
    return 2 * x.T @ err / len(y), np.array([2 * err.mean()], dtype=np.float32)
"""

ANALYSIS_TASK = """
import numpy as np
from p2pfl.taskpack.sdk import Task, Update

class Stats(Task):
    def preprocess(self, ctx, inputs):
        return np.loadtxt(inputs["data"], delimiter=",")[:, 0]

    def execute(self, ctx, data, weights):
        return Update(num_samples=len(data), aggregates={
            "count": len(data), "sum": data.sum(), "hist": np.histogram(data, bins=3)[0]})

    def postprocess(self, ctx, partial):
        partial.aggregates["sum"] = round(partial.aggregates["sum"], 3)
        partial.node = "somebody else"   # ignored: a task cannot speak for another node
        return partial

    def reduce(self, ctx, partials):
        count = sum(p.aggregates["count"] for p in partials)
        return {"count": count, "mean": sum(p.aggregates["sum"] for p in partials) / count,
                "nodes": sorted(p.node for p in partials)}
"""

# One taskpack, many misbehaviours, chosen by params["mode"].
MISC_TASK = """
import ctypes, os, time
import numpy as np
from p2pfl.taskpack.sdk import Task, Update

class Misc(Task):
    def execute(self, ctx, data, weights):
        mode = ctx.params["mode"]
        if mode == "exit":
            os._exit(7)
        if mode == "kill":
            os.kill(os.getpid(), 9)
        if mode == "segfault":
            ctypes.string_at(0)
        if mode == "sleep":
            time.sleep(ctx.params.get("seconds", 60))
        if mode == "raise":
            raise ValueError("column 'age' missing")
        if mode == "sysexit":
            raise SystemExit(5)
        if mode == "memory":
            big = np.ones(ctx.params["nbytes"], dtype=np.uint8)
            return Update(num_samples=int(big[0]))
        if mode == "stdout":
            print("hello on stdout")
            os.write(1, b"raw bytes on fd 1\\n")
            return Update(num_samples=1)
        if mode == "env":
            return Update(num_samples=0, aggregates={
                "env": dict(os.environ), "cwd": os.getcwd(), "workdir": str(ctx.workdir)})
        if mode == "write":
            out = {}
            for name, path in {"input": ctx.params["input"], "outside": ctx.params["outside"],
                               "workdir": str(ctx.workdir / "scratch.txt")}.items():
                try:
                    with open(path, "a") as f:
                        f.write("tampered")
                    out[name] = "written"
                except OSError as e:
                    out[name] = type(e).__name__
            return Update(num_samples=0, aggregates=out)
        if mode == "nan":
            return Update(num_samples=1, weights={"w": np.array([np.nan], np.float32)})
        if mode == "epsilon":
            return Update(num_samples=1, metrics={"epsilon": ctx.params["epsilon"]})
        if mode == "bad-return":
            return {"num_samples": 1}
        if mode == "unplain":
            return Update(num_samples=1, aggregates={"x": object()})
        if mode == "state":
            ctx.state["n"] = ctx.state.get("n", 0) + 1
            return Update(num_samples=ctx.state["n"])
        raise AssertionError(mode)
"""

NO_TASK = "x = 1\n"
TWO_TASKS = """
from p2pfl.taskpack.sdk import Task
class A(Task): pass
class B(Task): pass
"""
IMPORT_ERROR = "import definitely_not_a_module\n"


def make_pack(root: Path, name: str, task: str, **extra: str) -> Path:
    """Write a taskpack dir with src/task.py (and src/<module>.py for each extra)."""
    d = root / name
    (d / "src").mkdir(parents=True)
    (d / "src" / "task.py").write_text(textwrap.dedent(task))
    for module, source in extra.items():
        (d / "src" / f"{module}.py").write_text(textwrap.dedent(source))
    return d


def spec_for(pack: Path, node: str = "node-a", task_id: str = "task-1", **kw: Any) -> TaskSpec:
    kw.setdefault("params", {})
    kw.setdefault("inputs", {})
    kw.setdefault("seed", 42)
    return TaskSpec(task_id=task_id, node=node, taskpack_dir=pack, **kw)


class Harness:
    """Drives either runner through one async interface."""

    def __init__(self, kind: str, tmp_root: Path) -> None:
        self.kind = kind
        self.tmp_root = tmp_root
        self.inproc = InProcessRunner(tmp_root=tmp_root) if kind == "inprocess" else None
        self.child = ChildProcessRunner(tmp_root=tmp_root) if kind == "child" else None

    async def run(self, spec: TaskSpec, job: Any) -> JobOutput:
        if self.inproc is not None:
            return self.inproc.run(spec, job)
        assert self.child is not None
        return await self.child.run(spec, job)

    async def close_task(self, task_id: str, node: str) -> None:
        if self.inproc is not None:
            self.inproc.close_task(task_id, node)
        else:
            assert self.child is not None
            await self.child.close_task(task_id, node)

    async def aclose(self) -> None:
        if self.inproc is not None:
            self.inproc.close()
        else:
            assert self.child is not None
            await self.child.aclose()

    def restarted(self) -> Harness:
        """A fresh runner of the same kind (a node restart)."""
        return Harness(self.kind, self.tmp_root)
