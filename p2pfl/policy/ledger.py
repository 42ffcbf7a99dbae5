"""The node's own privacy accountant: lifetime epsilon spent per dataset, across tasks and
restarts (``DATA_DIR/privacy-ledger.json``).

A task's charge is its *cumulative* spend on a dataset: training reports the epsilon spent
so far after each round, so `charge` keeps the largest value seen per (task, dataset) and
charging the same figure twice changes nothing. A dataset's lifetime spend is the sum over
its tasks (sequential composition; conservative for disjoint uses).

Fail closed: an unreadable or corrupted file raises `LedgerError`, never resets the
spend to zero (which would hand every dataset a fresh budget).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError
from p2pfl.fsutil import atomic_write

LEDGER_FILE = "privacy-ledger.json"
_VERSION = 1


class LedgerError(P2PFLError):
    """The privacy ledger cannot be read or is corrupted; the node must not guess."""


class PrivacyLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._charges: dict[str, dict[str, float]] = self._read()  # dataset -> task -> eps

    def _read(self) -> dict[str, dict[str, float]]:
        if not self.path.exists():
            return {}
        fix = "fix or restore it; deleting it would reset every dataset's budget"
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({exc}); {fix}") from None
        charges: Any = doc.get("charges") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("version") != _VERSION or not _valid(charges):
            raise LedgerError(f"privacy ledger {self.path} is corrupted; {fix}")
        return {d: dict(t) for d, t in charges.items()}

    def spent(self, dataset: str, *, exclude_task: str | None = None) -> float:
        """Lifetime epsilon spent on `dataset` (leaving out one task, e.g. the one being
        decided again)."""
        tasks = self._charges.get(dataset, {})
        return math.fsum(e for t, e in sorted(tasks.items()) if t != exclude_task)

    def spent_all(self, *, exclude_task: str | None = None) -> dict[str, float]:
        """{dataset: spent}: what `SitePolicy.decide(spent=...)` takes."""
        return {d: self.spent(d, exclude_task=exclude_task) for d in sorted(self._charges)}

    def charge(self, task_id: str, dataset: str, epsilon: float) -> float:
        """Record that `task_id` has spent `epsilon` in total on `dataset` so far; durable
        before it returns. Returns the dataset's lifetime spend."""
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        tasks = self._charges.setdefault(dataset, {})
        if float(epsilon) > tasks.get(task_id, 0.0) or task_id not in tasks:
            tasks[task_id] = max(float(epsilon), tasks.get(task_id, 0.0))
            self._save()
        return self.spent(dataset)

    def _save(self) -> None:
        doc = {"version": _VERSION, "charges": self._charges}
        atomic_write(self.path, json.dumps(doc, sort_keys=True, indent=1), mode=0o600)

    def as_dict(self) -> dict[str, Any]:
        return {
            d: {"spent": self.spent(d), "tasks": dict(sorted(t.items()))}
            for d, t in sorted(self._charges.items())
        }


def _valid(charges: Any) -> bool:
    if not isinstance(charges, dict):
        return False
    for tasks in charges.values():
        if not isinstance(tasks, dict):
            return False
        for eps in tasks.values():
            if type(eps) not in (int, float) or not math.isfinite(eps) or eps < 0:
                return False
    return True
