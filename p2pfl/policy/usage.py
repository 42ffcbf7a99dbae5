"""Usage limits: how many runs and records a requester may use with a taskpack per period.

The rule lives in policy.yaml, per dataset (or in `defaults`)::

    datasets:
      scans:
        usage:
          - {requester: lab-a, taskpack: mlp-inference, period: month,
             max_runs: 20, max_records: 1000}

`requester` is a group, a peer id, `self` or `*`; `taskpack` a taskpack name or `*`;
`period` `day`, `week` (from Monday) or `month`, calendar periods in UTC. Each requester is
counted on its own, per taskpack name. The count is this node's `UsageLedger`
(DATA_DIR/usage-ledger.json): one entry per task and dataset, written when the task's
execution here finishes (records: what it actually processed).

A task that would go over a cap is declined by the site policy's decision
(`SitePolicy.decide`), e.g. ``limit exceeded: 1,200 of 1,000 records this month``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError
from p2pfl.fsutil import atomic_write

USAGE_FILE = "usage-ledger.json"
PERIODS = ("day", "week", "month")
KEEP_S = 400 * 86400.0  # entries older than any period are pruned
_VERSION = 1

# (requester, taskpack name, dataset, period) -> (runs, records) in the period now
UsageCounts = Callable[[str, str, str, str], tuple[int, int]]


class UsageError(P2PFLError):
    """The usage ledger cannot be read or is corrupted (never reset: that would lift caps)."""


@dataclass(frozen=True)
class UsageRule:
    where: str  # "datasets.scans.usage[0]": the rule a decline names
    requesters: frozenset[str] | None  # resolved peer ids; None: anyone
    requester_text: str
    taskpack: str  # a name or "*"
    period: str
    max_runs: int | None
    max_records: int | None

    def applies(self, requester: str, taskpack: str) -> bool:
        who = self.requesters is None or requester in self.requesters
        return who and self.taskpack in ("*", taskpack)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requester": self.requester_text,
            "taskpack": self.taskpack,
            "period": self.period,
            "max_runs": self.max_runs,
            "max_records": self.max_records,
        }


def period_start(period: str, now: float) -> float:
    """The start (epoch seconds) of the UTC calendar period containing `now`."""
    t = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start = day
    elif period == "week":
        start = day - dt.timedelta(days=day.weekday())
    elif period == "month":
        start = day.replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return start.timestamp()


def usage_refusal(
    rules: tuple[UsageRule, ...],
    *,
    dataset: str,
    requester: str,
    taskpack: str,
    records: int,
    counts: UsageCounts | None,
) -> tuple[str, str] | None:
    """(rule, reason) for the first cap this task would exceed, or None."""
    for rule in rules:
        if not rule.applies(requester, taskpack):
            continue
        runs_used, records_used = (
            counts(requester, taskpack, dataset, rule.period) if counts else (0, 0)
        )
        if rule.max_runs is not None and runs_used + 1 > rule.max_runs:
            return (
                f"{rule.where}.max_runs",
                f"dataset {dataset}: limit exceeded: {runs_used + 1:,} of {rule.max_runs:,} "
                f"runs this {rule.period}",
            )
        if rule.max_records is not None and records_used + records > rule.max_records:
            return (
                f"{rule.where}.max_records",
                f"dataset {dataset}: limit exceeded: {records_used + records:,} of "
                f"{rule.max_records:,} records this {rule.period}",
            )
    return None


class UsageLedger:
    """Runs and records per (requester, taskpack, dataset), with their times."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        fix = "fix or restore it; deleting it would lift every usage cap"
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UsageError(f"usage ledger {self.path} is unreadable ({exc}); {fix}") from None
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if (
            doc.get("version") != _VERSION
            or not isinstance(entries, list)
            or not all(_valid(e) for e in entries)
        ):
            raise UsageError(f"usage ledger {self.path} is corrupted; {fix}")
        return entries

    def charge(
        self,
        *,
        task_id: str,
        requester: str,
        taskpack: str,
        datasets: tuple[str, ...],
        records: int,
        t: float,
    ) -> None:
        """Record one run of `task_id` on each dataset (again: the larger record count)."""
        changed = False
        for name in datasets:
            found = next(
                (e for e in self._entries if e["task"] == task_id and e["dataset"] == name), None
            )
            if found is None:
                self._entries.append(
                    {
                        "task": task_id,
                        "requester": requester,
                        "taskpack": taskpack,
                        "dataset": name,
                        "records": int(records),
                        "t": float(t),
                    }
                )
                changed = True
            elif records > found["records"]:
                found["records"] = int(records)
                changed = True
        if changed:
            self._entries = [e for e in self._entries if e["t"] >= t - KEEP_S]
            doc = {"version": _VERSION, "entries": self._entries}
            atomic_write(self.path, json.dumps(doc, sort_keys=True), mode=0o600)

    def used(
        self,
        requester: str,
        taskpack: str,
        dataset: str,
        since: float,
        *,
        exclude_task: str | None = None,
    ) -> tuple[int, int]:
        """(runs, records) of `requester` with `taskpack` on `dataset` since `since`."""
        runs = records = 0
        for e in self._entries:
            if (
                e["requester"] == requester
                and e["taskpack"] == taskpack
                and e["dataset"] == dataset
                and e["t"] >= since
                and e["task"] != exclude_task
            ):
                runs += 1
                records += e["records"]
        return runs, records

    def counts(self, now: float, exclude_task: str | None = None) -> UsageCounts:
        """What `SitePolicy.decide(usage=...)` takes, for the periods containing `now`."""

        def count(requester: str, taskpack: str, dataset: str, period: str) -> tuple[int, int]:
            since = period_start(period, now)
            return self.used(requester, taskpack, dataset, since, exclude_task=exclude_task)

        return count

    def as_dict(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._entries]


def _valid(e: Any) -> bool:
    return (
        isinstance(e, dict)
        and all(isinstance(e.get(k), str) for k in ("task", "requester", "taskpack", "dataset"))
        and type(e.get("records")) is int
        and e["records"] >= 0
        and type(e.get("t")) in (int, float)
        and math.isfinite(e["t"])
    )
