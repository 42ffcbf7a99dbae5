"""The batched-task SDK: records of a folder or a table, one bad record failing alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.fl.datasets import write_table
from p2pfl.taskpack.batch import (
    BatchTask,
    InferenceTask,
    file_digest,
    folder_records,
    read_rows,
    row_records,
)
from p2pfl.taskpack.sdk import Context, Weights


def ctx(**params: Any) -> Context:
    return Context(task_id="t", node="n", params=params, seed=1)


class SumOfNumbers(InferenceTask):
    """A file holds whitespace-separated numbers: positive sum -> class 1."""

    def predict(
        self, ctx: Context, model: Any, items: list[tuple[str, Any]]
    ) -> list[tuple[Any, float]]:
        out = []
        for _, data in items:
            values = [float(x) for x in data.decode().split()]  # a corrupt file raises here
            out.append((int(sum(values) > 0), 0.75))
        return out


def test_folder_records_are_files_by_relative_path_with_content_digests(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("1 2")
    (tmp_path / "sub" / "b.txt").write_text("-3")
    (tmp_path / ".hidden").write_text("x")
    records = folder_records(tmp_path)
    assert [r.key for r in records] == ["a.txt", "sub/b.txt"]
    assert records[0].digest == file_digest(tmp_path / "a.txt")
    (tmp_path / "a.txt").write_text("1 3")
    assert folder_records(tmp_path)[0].digest != records[0].digest


def test_one_corrupt_file_fails_alone_and_the_batch_goes_on(tmp_path: Path) -> None:
    for name, text in {"a": "1 2", "b": "\x00\xffgarbage", "c": "-5"}.items():
        (tmp_path / name).write_bytes(text.encode("latin-1"))
    task = SumOfNumbers()
    inputs = {"files": tmp_path}
    keys = [r.key for r in task.records(ctx(), inputs)]
    out = task.run_batch(ctx(), inputs, keys, None)
    assert out.rows == [
        {"key": "a", "prediction": "1", "score": 0.75},
        {"key": "c", "prediction": "0", "score": 0.75},
    ]
    assert [k for k, _ in out.failed] == ["b"] and "UnicodeDecodeError" in out.failed[0][1]


def test_a_key_outside_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "secret").write_text("1")
    out = SumOfNumbers().run_batch(ctx(), {"files": tmp_path / "in"}, ["../secret"], None)
    assert not out.rows and "outside the input folder" in out.failed[0][1]


def test_rows_of_csv_and_npz_tables(tmp_path: Path) -> None:
    write_table(
        tmp_path / "t.npz", np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0, 1]), ["x", "y"]
    )
    assert read_rows(tmp_path / "t.npz") == [
        {"x": 1.0, "y": 2.0, "label": 0},
        {"x": 3.0, "y": 4.0, "label": 1},
    ]
    (tmp_path / "t.csv").write_text("id,x\n7,1\n9,2\n")
    rows = read_rows(tmp_path / "t.csv")
    assert [r.key for r in row_records(rows, "id")] == ["7", "9"]
    assert [r.key for r in row_records(rows, None)] == ["row-1", "row-2"]
    with pytest.raises(ValueError, match="no key column"):
        row_records(rows, "nope")


def test_scores_outside_zero_one_are_refused(tmp_path: Path) -> None:
    class Bad(InferenceTask):
        def predict(
            self, ctx: Context, model: Any, items: list[tuple[str, Any]]
        ) -> list[tuple[Any, float]]:
            return [(1, 7.0) for _ in items]

    (tmp_path / "t.csv").write_text("x\n1\n")
    out = Bad().run_batch(ctx(), {"t": tmp_path / "t.csv"}, ["row-1"], None)
    assert not out.rows and "not in [0, 1]" in out.failed[0][1]


def test_inference_gets_the_model_once(tmp_path: Path) -> None:
    calls = []

    class Linear(InferenceTask):
        def load_model(self, ctx: Context, weights: Weights | None) -> Any:
            calls.append(weights)
            return weights

        def predict(
            self, ctx: Context, model: Any, items: list[tuple[str, Any]]
        ) -> list[tuple[Any, float]]:
            return [(float(row["x"]) * float(model["w"][0]), 1.0) for _, row in items]

    (tmp_path / "t.csv").write_text("x\n1\n2\n")
    task = Linear()
    model = {"w": np.array([3.0])}
    for key in ("row-1", "row-2"):
        task.run_batch(ctx(), {"t": tmp_path / "t.csv"}, [key], model)
    assert len(calls) == 1


def test_a_batch_task_has_no_execute() -> None:
    with pytest.raises(NotImplementedError, match="batched"):
        BatchTask().execute(ctx(), None, None)


def test_inference_reduce_adds_what_nodes_released() -> None:
    from p2pfl.taskpack import sdk

    def partial(node: str, n: int, counts: dict[str, Any], score: float) -> sdk.Partial:
        aggs = {
            "records": sdk.count(n),
            "failed": sdk.count(0),
            "predictions": {"_release": "groups", "counts": counts},
            "mean_score": sdk.mean(score, n, bound=1.0),
        }
        return sdk.Partial(node, n, aggregates=aggs)

    result = SumOfNumbers().reduce(
        ctx(),
        [partial("b", 30, {"cat": 20, "dog": "<k"}, 0.6), partial("a", 10, {"cat": 10}, 0.9)],
    )
    assert result == {
        "nodes": 2,
        "records": 40,
        "failed": 0,
        "predictions": {"cat": 30, "dog": "<k"},
        "mean_score": pytest.approx((0.6 * 30 + 0.9 * 10) / 40),
    }
    # A node whose numbers were all withheld adds nothing.
    assert SumOfNumbers().reduce(ctx(), [sdk.Partial("c", 0)])["records"] is None
