"""Plan and RunBatch through both runners (the child one sandboxed, with a folder input
read-only): records with digests, a corrupt file failing alone, the model decoded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from runtime_helpers import Harness, make_pack, spec_for

from p2pfl.runtime import Plan, RunBatch
from p2pfl.taskpack.batch import file_digest
from p2pfl.wire import encode_tensors

FILES_TASK = """
from p2pfl.taskpack.batch import InferenceTask


class Scale(InferenceTask):
    def predict(self, ctx, model, items):
        factor = float(model["k"][0])
        return [(round(sum(float(v) for v in data.split()) * factor, 3), 1.0) for _, data in items]
"""

NOT_BATCHED = """
from p2pfl.taskpack.sdk import Task, Update


class Plain(Task):
    def execute(self, ctx, data, weights):
        return Update(num_samples=1)
"""


async def test_plan_and_batches(runner: Harness, tmp_path: Path) -> None:
    pack = make_pack(tmp_path / "packs", "files", FILES_TASK)
    folder = tmp_path / "data" / "files"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("1 2")
    (folder / "b.txt").write_bytes(b"\xff\xfe")
    (folder / "c.txt").write_text("4")
    spec = spec_for(pack, inputs={"files": folder})
    plan = (await runner.run(spec, Plan())).result
    assert [tuple(r) for r in plan] == [
        (name, file_digest(folder / name)) for name in ("a.txt", "b.txt", "c.txt")
    ]
    model = bytes(encode_tensors({"k": np.array([2.0])}))
    out = (await runner.run(spec, RunBatch(1, 1, ["a.txt", "b.txt", "c.txt"], model))).result
    assert out["rows"] == [
        {"key": "a.txt", "prediction": "6.0", "score": 1.0},
        {"key": "c.txt", "prediction": "8.0", "score": 1.0},
    ]
    assert [tuple(f)[0] for f in out["failed"]] == ["b.txt"]
    assert out["failed"][0][1].startswith("ValueError: could not convert")


async def test_a_task_that_is_not_batched_plans_nothing(runner: Harness, tmp_path: Path) -> None:
    pack = make_pack(tmp_path / "packs", "plain", NOT_BATCHED)
    assert (await runner.run(spec_for(pack), Plan())).result is None
