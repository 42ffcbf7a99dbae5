"""What batched runs keep on a node: records processed/failed, reports, derived tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from p2pfl.store.local_runs import (
    RecordsError,
    RecordsLedger,
    list_reports,
    write_report,
)


def test_processed_and_failed_records_survive_a_restart(tmp_path: Path) -> None:
    ledger = RecordsLedger(tmp_path)
    ledger.record_run(
        "mlp-inference", "scans", task_id="a" * 32, when=1.0,
        done={"x": "d1", "y": "d2"}, failed={"z": "ValueError: bad"}, test_run=False,
    )  # fmt: skip
    again = RecordsLedger(tmp_path)
    assert again.processed("mlp-inference", "scans") == {"x": "d1", "y": "d2"}
    assert again.failed("mlp-inference", "scans") == {"z": "ValueError: bad"}
    assert again.processed("other", "scans") == {}
    # z works on a rerun: no longer failed.
    again.record_run(
        "mlp-inference", "scans", task_id="b" * 32, when=2.0,
        done={"z": "d3"}, failed={}, test_run=False,
    )  # fmt: skip
    view = RecordsLedger(tmp_path).view()
    assert view == [
        {
            "taskpack": "mlp-inference", "dataset": "scans", "processed": 3, "failed": 0,
            "failures": {}, "runs": 2,
            "last_run": {"task_id": "b" * 32, "t": 2.0, "done": 1, "failed": 0, "test_run": False},
        }
    ]  # fmt: skip


def test_a_test_run_marks_nothing_processed(tmp_path: Path) -> None:
    ledger = RecordsLedger(tmp_path)
    ledger.record_run(
        "p", "d", task_id="c" * 32, when=1.0, done={"x": "1"}, failed={"y": "no"}, test_run=True
    )
    assert ledger.processed("p", "d") == {} and ledger.failed("p", "d") == {}
    assert ledger.view()[0]["runs"] == 1


def test_a_corrupt_records_file_is_an_error_not_a_reset(tmp_path: Path) -> None:
    (tmp_path / "records.json").write_text('{"version": 1, "slots": {"p|d": {"processed": 3}}}')
    with pytest.raises(RecordsError, match="corrupted"):
        RecordsLedger(tmp_path)
    (tmp_path / "records.json").write_text("{not json")
    with pytest.raises(RecordsError, match="unreadable"):
        RecordsLedger(tmp_path)


def test_reports_are_written_and_listed(tmp_path: Path) -> None:
    rows = [
        {"key": "a", "prediction": "1", "score": 0.9},
        {"key": "b,c", "prediction": "0", "score": 0.6},
    ]
    path = write_report(
        tmp_path, "d" * 32, rows, {"taskpack": "p", "created": 5.0, "test_run": True}
    )
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [
            ["key", "prediction", "score"],
            ["a", "1", "0.9"],
            ["b,c", "0", "0.6"],
        ]
    (tmp_path / "reports" / ("e" * 32 + ".json")).write_text("[broken")
    listed = list_reports(tmp_path)
    assert [r["task_id"] for r in listed] == ["e" * 32, "d" * 32]
    assert "unreadable" in listed[0]["error"]
    assert (
        listed[1]["rows"] == 2 and listed[1]["test_run"] is True and listed[1]["path"] == str(path)
    )
    assert json.loads((tmp_path / "reports" / ("d" * 32 + ".json")).read_text())["rows"] == 2
    assert list_reports(tmp_path / "nowhere") == []
