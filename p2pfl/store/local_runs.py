"""What a node keeps about its batched runs, beside its data and never sent anywhere.

    DATA_DIR/records.json           per taskpack name and dataset: records processed (key ->
                                    content digest), records failed (key -> reason), runs
    DATA_DIR/reports/TASK.csv       an inference task's per-record report: key, prediction, score
    DATA_DIR/reports/TASK.json      what the report is: taskpack, dataset, counts, test run

(Derived datasets of preprocessing tasks live in the registry of p2pfl.data.)

`p2pfl reports --data-dir D` and `p2pfl datasets --data-dir D` read these files directly.
Every write is atomic (temp file + rename). A corrupt records file is an error, not a
reset: forgetting what was processed would silently run everything again.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError
from p2pfl.fsutil import atomic_write

RECORDS_FILE = "records.json"
REPORTS_DIR = "reports"
MAX_RUNS_KEPT = 50  # per taskpack and dataset
_VERSION = 1


class RecordsError(P2PFLError):
    """DATA_DIR/records.json cannot be read or is corrupted."""


def _slot(taskpack: str, dataset: str) -> str:
    return f"{taskpack}|{dataset}"


class RecordsLedger:
    """Which records of a dataset a taskpack has processed on this node, and which failed."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / RECORDS_FILE
        self._slots: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise RecordsError(f"{self.path} is unreadable ({exc}); fix or restore it") from None
        slots = doc.get("slots") if isinstance(doc, dict) else None
        if doc.get("version") != _VERSION or not isinstance(slots, dict):
            raise RecordsError(f"{self.path} is corrupted; fix or restore it")
        for name, slot in slots.items():
            if not (
                isinstance(slot, dict)
                and isinstance(slot.get("processed"), dict)
                and isinstance(slot.get("failed"), dict)
                and isinstance(slot.get("runs"), list)
            ):
                raise RecordsError(f"{self.path}: entry {name!r} is corrupted")
        return slots

    def _get(self, taskpack: str, dataset: str) -> dict[str, Any]:
        return self._slots.get(_slot(taskpack, dataset)) or {
            "processed": {},
            "failed": {},
            "runs": [],
        }

    def processed(self, taskpack: str, dataset: str) -> dict[str, str]:
        return dict(self._get(taskpack, dataset)["processed"])

    def failed(self, taskpack: str, dataset: str) -> dict[str, str]:
        return dict(self._get(taskpack, dataset)["failed"])

    def record_run(
        self,
        taskpack: str,
        dataset: str,
        *,
        task_id: str,
        when: float,
        done: dict[str, str],
        failed: dict[str, str],
        test_run: bool,
    ) -> None:
        """Remember a finished run; durable before it returns. A test run is listed but
        marks nothing as processed (the real run must still see those records)."""
        slot = self._get(taskpack, dataset)
        if not test_run:
            slot["processed"].update(done)
            for key in done:
                slot["failed"].pop(key, None)
            slot["failed"].update(failed)
        slot["runs"] = (
            slot["runs"]
            + [
                {
                    "task_id": task_id,
                    "t": when,
                    "done": len(done),
                    "failed": len(failed),
                    "test_run": test_run,
                }
            ]
        )[-MAX_RUNS_KEPT:]
        self._slots[_slot(taskpack, dataset)] = slot
        doc = {"version": _VERSION, "slots": self._slots}
        atomic_write(self.path, json.dumps(doc, sort_keys=True), mode=0o600)

    def view(self) -> list[dict[str, Any]]:
        """One row per (taskpack, dataset): processed and failed counts, the last run."""
        out = []
        for name, slot in sorted(self._slots.items()):
            taskpack, _, dataset = name.partition("|")
            runs = slot["runs"]
            out.append(
                {
                    "taskpack": taskpack,
                    "dataset": dataset,
                    "processed": len(slot["processed"]),
                    "failed": len(slot["failed"]),
                    "failures": dict(sorted(slot["failed"].items())[:20]),
                    "runs": len(runs),
                    "last_run": runs[-1] if runs else None,
                }
            )
        return out


def write_report(
    data_dir: Path, task_id: str, rows: list[dict[str, Any]], meta: dict[str, Any]
) -> Path:
    """DATA_DIR/reports/TASK.csv (key, prediction, score) and its TASK.json description.
    `task_id` is a checked 32-hex id, never a peer's free text."""
    folder = Path(data_dir) / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", "prediction", "score"])
    for row in rows:
        writer.writerow([row.get("key", ""), row.get("prediction", ""), row.get("score", "")])
    path = folder / f"{task_id}.csv"
    atomic_write(path, buf.getvalue(), mode=0o600)
    meta = {**meta, "task_id": task_id, "path": str(path), "rows": len(rows)}
    atomic_write(folder / f"{task_id}.json", json.dumps(meta, sort_keys=True), mode=0o600)
    return path


def list_reports(data_dir: Path) -> list[dict[str, Any]]:
    """Every report in DATA_DIR/reports, oldest first; an unreadable description is listed
    as such rather than hidden."""
    folder = Path(data_dir) / REPORTS_DIR
    out = []
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as exc:
            meta = {"task_id": meta_path.stem, "error": f"unreadable: {exc}"}
        meta["path"] = str(meta_path.with_suffix(".csv"))
        out.append(meta)
    return sorted(out, key=lambda m: (m.get("created", 0), m.get("task_id", "")))
