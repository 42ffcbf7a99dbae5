"""PrivacyLedger (lifetime budget across tasks and restarts) and AuditLog (append, fsync, read)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from test_site import LAB_A, ME, POLICY, facts

from p2pfl.policy import AuditLog, LedgerError, PrivacyLedger, load_policy


def test_ledger_persists_and_a_budget_spent_over_two_tasks_refuses_the_third(
    tmp_path: Path,
) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)  # wages: budget 5, max 2 per task
    policy = load_policy(tmp_path / "policy.yaml", own_peer=ME)
    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger(path)
    offer = facts(dp_epsilon=2.0)
    for task in ("t1", "t2"):
        assert policy.decide(offer, spent=ledger.spent_all()).allowed
        ledger.charge(task, "wages", 1.0)  # after round 1 (cumulative)
        ledger.charge(task, "wages", 2.0)  # after round 2
        ledger.charge(task, "wages", 2.0)  # the same report again: idempotent
    # A restart: a fresh ledger object reads what was spent.
    again = PrivacyLedger(path)
    assert again.spent("wages") == 4.0 and again.spent("wages", exclude_task="t1") == 2.0
    third = policy.decide(offer, spent=again.spent_all())
    assert not third.allowed and third.rule == "datasets.wages.dp.budget"
    assert "remaining 1" in third.reason
    assert policy.decide(dataclasses.replace(offer, dp_epsilon=1.0), spent=again.spent_all())
    assert again.as_dict() == {"wages": {"spent": 4.0, "tasks": {"t1": 2.0, "t2": 2.0}}}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_ledger_never_lowers_a_charge_and_refuses_nonsense(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json")
    ledger.charge("t", "d", 3.0)
    assert ledger.charge("t", "d", 1.0) == 3.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ledger.charge("t", "d", bad)
    assert ledger.spent("unknown") == 0.0


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"version": 1, "charges": {"d": {"t": -1}}}', b'{"version": 9}'],
)
def test_corrupted_ledger_fails_closed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "l.json"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match="would reset every dataset's budget"):
        PrivacyLedger(path)
    assert path.read_bytes() == content  # never rewritten


def test_audit_append_read_and_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = AuditLog(tmp_path / "audit.jsonl", clock=lambda: 1700000000.0)
    log.record("policy", action="load", digest="ab" * 32)
    log.record(
        "offer",
        task="t1",
        requester=LAB_A,
        decision="declined",
        rule="datasets.wages.allow",
        reason="dataset wages: ...",
    )
    log.record("release", task="t1", round=1, kind="update", bytes=1234, dp_spend=0.5)
    assert len(synced) >= 3  # every append (and the new file's directory)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["t"] == 1700000000.0 for line in lines)
    everything = log.read()
    assert [e["kind"] for e in everything] == ["policy", "offer", "release"]
    assert everything[2]["what"] == "update" and everything[2]["bytes"] == 1234
    assert [e["kind"] for e in log.read(task="t1")] == ["offer", "release"]
    assert log.read(task="nope") == []
    # A second AuditLog on the same file appends, never truncates.
    AuditLog(tmp_path / "audit.jsonl").record("policy", action="reload", digest="cd" * 32)
    assert len(log.read()) == 4


def test_audit_refuses_unknown_kinds_and_missing_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="unknown audit kind"):
        log.record("gossip", task="t")
    with pytest.raises(ValueError, match="lacks decision, rule, reason"):
        log.record("offer", task="t", requester="p")
    assert log.read() == []


def test_audit_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record("policy", action="load", digest="x")
    with open(path, "ab") as fh:
        fh.write(b'{"t": 1, "kind": "offer", "task": "t2", "req')  # a crash mid-write
    assert [e["action"] for e in log.read()] == ["load"]  # the torn line is skipped
    # The next append starts on its own line; the torn fragment stays visible as corrupt.
    AuditLog(path).record("policy", action="reload", digest="y")
    kinds = [e["kind"] for e in log.read()]
    assert kinds == ["policy", "corrupt", "policy"]
    assert log.read()[1] == {"kind": "corrupt", "line": 2}
