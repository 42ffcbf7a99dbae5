"""The parent's side of a batched run: which records to run, in which batches, and what
happened to each. Pure: no I/O, no clock; the driver feeds it job outcomes.

    run = BatchRun(records, RunOptions(test_run=5), processed=ledger_view)
    while (batch := run.next_batch()) is not None:
        ... run the RunBatch job ...
        run.on_result(batch, rows, failed)   # or run.on_error(batch, reason)
    run.done, run.failed, run.rows

Selection, in order: `rerun_failed` keeps only the records that failed last time;
`new_data_only` drops records whose (key, digest) this node already processed for the same
taskpack and dataset; `test_run` keeps the first N of what is left.

A record that fails (its own failure, or the whole batch's) is tried once more on its own
(a batch of one at the end of the queue); failing again, it is recorded as failed with
its reason, and the run goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_ATTEMPTS = 2  # the first try and one retry
MAX_BATCH = 10_000
MAX_TEST_RUN = 1_000_000
DEFAULT_TEST_RUN = 10


@dataclass(frozen=True)
class RunOptions:
    """How an offer asks a node to run (part of the signed offer: `TaskOffer.run`)."""

    test_run: int | None = None  # at most this many records per node
    new_data_only: bool = False
    rerun_failed: bool = False

    def as_dict(self) -> dict[str, Any] | None:
        d: dict[str, Any] = {}
        if self.test_run is not None:
            d["test_run"] = self.test_run
        if self.new_data_only:
            d["new_data_only"] = True
        if self.rerun_failed:
            d["rerun_failed"] = True
        return d or None


def run_options_problem(d: Any) -> str | None:
    """Why an offer's `run` field is unacceptable (it comes from a peer), or None."""
    if d is None:
        return None
    if not isinstance(d, dict) or not set(d) <= {"test_run", "new_data_only", "rerun_failed"}:
        return "run must be a map of test_run, new_data_only, rerun_failed"
    n = d.get("test_run")
    if n is not None and (
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TEST_RUN
    ):
        return f"run.test_run must be an integer in [1, {MAX_TEST_RUN}]"
    for flag in ("new_data_only", "rerun_failed"):
        if flag in d and not isinstance(d[flag], bool):
            return f"run.{flag} must be true or false"
    return None


def run_options(d: Any) -> RunOptions:
    """RunOptions from an offer's checked `run` field (None: a normal run)."""
    if not isinstance(d, dict):
        return RunOptions()
    return RunOptions(
        test_run=d.get("test_run"),
        new_data_only=bool(d.get("new_data_only", False)),
        rerun_failed=bool(d.get("rerun_failed", False)),
    )


@dataclass
class Batch:
    index: int  # 1-based
    keys: list[str]


@dataclass
class BatchRun:
    """One node's batched run of one task."""

    records: list[tuple[str, str]]  # (key, digest) as the task listed them
    options: RunOptions = RunOptions()
    processed: Mapping[str, str] = field(default_factory=dict)  # key -> digest done before
    failed_before: Mapping[str, str] = field(default_factory=dict)  # key -> reason
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.batch_size = max(1, min(int(self.batch_size), MAX_BATCH))
        chosen = list(self.records)
        total = len(chosen)
        if self.options.rerun_failed:
            chosen = [r for r in chosen if r[0] in self.failed_before]
        if self.options.new_data_only:
            chosen = [r for r in chosen if self.processed.get(r[0]) != r[1]]
        if self.options.test_run is not None:
            chosen = chosen[: self.options.test_run]
        self.selected = chosen
        self.skipped = total - len(chosen)
        self.digest = dict(chosen)
        self.attempts: dict[str, int] = {}
        self.rows: list[dict[str, Any]] = []
        self.done: dict[str, str] = {}  # key -> digest processed in this run
        self.failed: dict[str, str] = {}  # key -> reason, after the retry
        keys = [k for k, _ in chosen]
        self._queue = [keys[i : i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        self.total = len(self._queue)  # grows when records are retried on their own
        self._issued = 0
        self.running: Batch | None = None

    def next_batch(self) -> Batch | None:
        if self.running is not None:
            raise RuntimeError("one batch at a time")
        if not self._queue:
            return None
        keys = self._queue.pop(0)
        self._issued += 1
        for k in keys:
            self.attempts[k] = self.attempts.get(k, 0) + 1
        self.running = Batch(self._issued, keys)
        return self.running

    @property
    def finished(self) -> bool:
        return self.running is None and not self._queue

    def on_result(
        self, batch: Batch, rows: list[dict[str, Any]], failed: list[tuple[str, str]]
    ) -> None:
        """A batch came back: rows for the records that worked, reasons for the rest. Rows
        for keys outside the batch (a confused task) are ignored."""
        self._check(batch)
        asked = set(batch.keys)
        seen: set[str] = set()
        for row in rows:
            key = row.get("key")
            if key in asked and key not in seen:
                seen.add(key)
                self.rows.append(row)
                self.done[key] = self.digest[key]
        reasons = {k: why for k, why in failed if k in asked and k not in seen}
        for key in batch.keys:
            if key not in seen:
                self._failed_once(key, reasons.get(key, "no output for this record"))

    def on_error(self, batch: Batch, reason: str) -> None:
        """The whole batch failed (the task raised, the worker died): each record of it is
        retried on its own."""
        self._check(batch)
        for key in batch.keys:
            self._failed_once(key, reason)

    def _check(self, batch: Batch) -> None:
        if self.running is not batch:
            raise RuntimeError(f"batch {batch.index} is not the one running")
        self.running = None

    def _failed_once(self, key: str, reason: str) -> None:
        if self.attempts.get(key, 0) < MAX_ATTEMPTS:
            self._queue.append([key])
            self.total += 1
        else:
            self.failed[key] = reason[:500]

    def progress(self) -> dict[str, Any]:
        """For the trace: batch i/N and records done."""
        return {
            "batch": self._issued,
            "batches": self.total,
            "records_done": len(self.done),
            "records_failed": len(self.failed),
            "records": len(self.selected),
        }
