"""The parent's side of batched runs: which records run, retried once, then recorded."""

from __future__ import annotations

import pytest

from p2pfl.runtime.batching import BatchRun, RunOptions, run_options, run_options_problem

RECORDS = [(f"r{i}", f"d{i}") for i in range(10)]


def drain(
    run: BatchRun, fail: dict[str, str] | None = None, crash: set[int] | None = None
) -> list[list[str]]:
    """Run every batch: records in `fail` fail (each time), batches in `crash` fail whole."""
    fail, crash = fail or {}, crash or set()
    seen = []
    while (batch := run.next_batch()) is not None:
        seen.append(list(batch.keys))
        if batch.index in crash:
            run.on_error(batch, "worker crashed")
            continue
        rows = [{"key": k, "prediction": "1", "score": 0.9} for k in batch.keys if k not in fail]
        run.on_result(batch, rows, [(k, fail[k]) for k in batch.keys if k in fail])
    return seen


def test_batches_cover_every_record_once() -> None:
    run = BatchRun(RECORDS, batch_size=4)
    assert run.total == 3
    assert drain(run) == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"], ["r8", "r9"]]
    assert run.done == dict(RECORDS) and not run.failed and run.finished
    assert run.progress() == {
        "batch": 3, "batches": 3, "records_done": 10, "records_failed": 0, "records": 10
    }  # fmt: skip


def test_a_failing_record_is_retried_once_alone_then_recorded() -> None:
    run = BatchRun(RECORDS, batch_size=5)
    seen = drain(run, fail={"r2": "ValueError: truncated file"})
    assert seen[-1] == ["r2"] and len(seen) == 3  # two batches, then r2 on its own
    assert run.failed == {"r2": "ValueError: truncated file"}
    assert len(run.done) == 9 and "r2" not in run.done
    assert run.attempts["r2"] == 2 and run.total == 3


def test_a_crashed_batch_retries_each_of_its_records() -> None:
    run = BatchRun(RECORDS, batch_size=5)
    seen = drain(run, crash={1})
    assert seen[2:] == [["r0"], ["r1"], ["r2"], ["r3"], ["r4"]]
    assert run.done == dict(RECORDS) and not run.failed


def test_rows_for_keys_outside_the_batch_are_ignored() -> None:
    run = BatchRun(RECORDS[:2], batch_size=2)
    batch = run.next_batch()
    assert batch is not None
    run.on_result(batch, [{"key": "r0"}, {"key": "elsewhere"}, {"key": "r0"}], [])
    assert list(run.done) == ["r0"] and len(run.rows) == 1
    assert run.next_batch() is not None  # r1 had no output: retried


def test_test_run_takes_the_first_n() -> None:
    run = BatchRun(RECORDS, RunOptions(test_run=5), batch_size=2)
    drain(run)
    assert list(run.done) == ["r0", "r1", "r2", "r3", "r4"] and run.skipped == 5


def test_new_data_only_skips_unchanged_records() -> None:
    processed = {"r0": "d0", "r1": "d1", "r2": "changed"}
    run = BatchRun(RECORDS, RunOptions(new_data_only=True), processed=processed)
    drain(run)
    assert sorted(run.done) == sorted(["r2"] + [f"r{i}" for i in range(3, 10)])


def test_rerun_failed_runs_only_those() -> None:
    run = BatchRun(
        RECORDS, RunOptions(rerun_failed=True), failed_before={"r7": "boom", "gone": "x"}
    )
    drain(run)
    assert list(run.done) == ["r7"]


def test_run_options_from_an_offer_are_checked() -> None:
    assert run_options_problem(None) is None
    assert run_options_problem({"test_run": 5, "new_data_only": True}) is None
    assert "test_run" in (run_options_problem({"test_run": 0}) or "")
    assert "test_run" in (run_options_problem({"test_run": True}) or "")
    assert "new_data_only" in (run_options_problem({"new_data_only": "yes"}) or "")
    assert "map of" in (run_options_problem({"evil": 1}) or "")
    assert run_options({"test_run": 3}) == RunOptions(test_run=3)
    assert RunOptions(test_run=3, rerun_failed=True).as_dict() == {
        "test_run": 3,
        "rerun_failed": True,
    }


def test_one_batch_at_a_time() -> None:
    run = BatchRun(RECORDS)
    batch = run.next_batch()
    with pytest.raises(RuntimeError):
        run.next_batch()
    assert batch is not None
    run.on_result(batch, [{"key": k} for k in batch.keys], [])
    with pytest.raises(RuntimeError):
        run.on_result(batch, [], [])


def test_what_a_task_returns_is_bounded() -> None:
    from p2pfl.runtime.protocol import check_batch, check_plan

    assert check_plan([["a", "d1"], ["b", "d2"]]) == [("a", "d1"), ("b", "d2")]
    for bad in (
        [["a", "d"], ["a", "e"]],
        [["k" * 600, "d"]],
        [["a", 3]],
        {"a": "d"},
    ):
        with pytest.raises(TypeError):
            check_plan(bad)
    ok = {"rows": [{"key": "a", "prediction": "1", "score": 0.5}], "failed": [["b", "why"]]}
    assert check_batch(ok)["failed"] == [("b", "why")]
    for bad_batch in (
        {"rows": [{"prediction": "1"}]},
        {"rows": [{"key": "a", "x": [1, 2]}]},
        {"rows": [{"key": "a", "x": "y" * 5000}]},
        {"rows": [], "failed": [["a"]]},
    ):
        with pytest.raises(TypeError):
            check_batch(bad_batch)


def test_what_a_run_releases_passes_the_nodes_k_filter() -> None:
    from p2pfl.batched import inference_aggregates
    from p2pfl.policy import filter_release
    from p2pfl.policy.release import ReleaseRules

    records = [(f"r{i}", "d") for i in range(13)]
    run = BatchRun(records, batch_size=13)
    batch = run.next_batch()
    assert batch is not None
    rows = [
        {"key": f"r{i}", "prediction": "cat" if i < 11 else "dog", "score": 0.5} for i in range(12)
    ]
    run.on_result(batch, rows, [("r12", "broken")])
    run.on_result(run.next_batch(), [], [("r12", "broken")])  # type: ignore[arg-type]
    released, _ = filter_release(inference_aggregates(run), ReleaseRules(k=10))
    assert released["records"]["n"] == 12
    assert "failed" not in released  # 1 failed record: a count under k is withheld
    assert released["predictions"]["counts"] == {"cat": 11, "dog": "<k"}
    assert released["mean_score"]["value"] == 0.5
    # Under DP the counts are noised, the mean needs (and has) its bound.
    noisy, _ = filter_release(inference_aggregates(run), ReleaseRules(k=10, epsilon=1.0))
    assert "mean_score" in noisy
