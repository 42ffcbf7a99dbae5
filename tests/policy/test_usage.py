"""Usage limits: runs and records per requester and taskpack per period, declined by the
site policy's decision with the numbers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from p2pfl.identity import peer_id_from_public_bytes
from p2pfl.policy import OfferFacts, PolicyError, parse_policy
from p2pfl.policy.usage import UsageError, UsageLedger, period_start


def peer(n: int) -> str:
    return peer_id_from_public_bytes(bytes([n]) * 32)


ME, LAB_A, LAB_B, PUB = peer(1), peer(2), peer(3), peer(5)
NOW = dt.datetime(2026, 12, 2, 15, 30, tzinfo=dt.UTC).timestamp()
POLICY: dict[str, Any] = {
    "requesters": {"lab-a": [LAB_A], "lab-b": [LAB_B]},
    "datasets": {
        "scans": {
            "allow": ["*"],
            "usage": [
                {"requester": "lab-a", "taskpack": "mlp-inference", "period": "month",
                 "max_records": 1000},
                {"requester": "*", "taskpack": "*", "period": "day", "max_runs": 3},
            ],
        }
    },
}  # fmt: skip


def facts(requester: str = LAB_A, records: int = 200, name: str = "mlp-inference") -> OfferFacts:
    return OfferFacts(
        requester=requester,
        datasets=("scans",),
        taskpack_publisher=PUB,
        taskpack_name=name,
        taskpack_version="1.0.0",
        type="inference",
        rounds=1,
        protocol="fedavg",
        aggregator="fedavg",
        dp_epsilon=None,
        dp_delta=None,
        manifest_dp_required=False,
        manifest_type="inference",
        manifest_aggregator="fedavg",
        manifest_protocol="fedavg",
        records={"scans": records},
    )


def charge(ledger: UsageLedger, task: str, requester: str, records: int, t: float) -> None:
    ledger.charge(
        task_id=task * 32, requester=requester, taskpack="mlp-inference",
        datasets=("scans",), records=records, t=t,
    )  # fmt: skip


def test_records_over_the_monthly_cap_are_declined_with_the_numbers(tmp_path: Path) -> None:
    policy = parse_policy(POLICY, own_peer=ME)
    ledger = UsageLedger(tmp_path / "usage-ledger.json")
    charge(ledger, "a", LAB_A, 600, NOW - 86400)  # earlier this month (December 1st)
    charge(ledger, "b", LAB_A, 400, NOW - 2 * 86400)  # November 30th: does not count
    ok = policy.decide(facts(records=400), usage=ledger.counts(NOW))
    assert ok.allowed, ok.reason
    no = policy.decide(facts(records=600), usage=UsageLedger(ledger.path).counts(NOW))
    assert not no.allowed
    assert no.rule == "datasets.scans.usage[0].max_records"
    assert no.reason == "dataset scans: limit exceeded: 1,200 of 1,000 records this month"
    # Another requester, or another taskpack, has its own count.
    assert policy.decide(facts(requester=LAB_B, records=600), usage=ledger.counts(NOW)).allowed
    assert policy.decide(facts(records=600, name="other"), usage=ledger.counts(NOW)).allowed


def test_runs_per_day_for_anyone(tmp_path: Path) -> None:
    policy = parse_policy(POLICY, own_peer=ME)
    ledger = UsageLedger(tmp_path / "u.json")
    for task in "abc":
        charge(ledger, task, LAB_B, 1, NOW - 3600)
    no = policy.decide(facts(requester=LAB_B, records=1), usage=ledger.counts(NOW))
    assert no.rule == "datasets.scans.usage[1].max_runs"
    assert no.reason == "dataset scans: limit exceeded: 4 of 3 runs this day"
    # The task being decided again does not count against itself.
    assert policy.decide(
        facts(requester=LAB_B, records=1), usage=ledger.counts(NOW, exclude_task="c" * 32)
    ).allowed
    # Tomorrow is a new day.
    assert policy.decide(
        facts(requester=LAB_B, records=1), usage=ledger.counts(NOW + 86400)
    ).allowed


def test_charging_a_task_again_keeps_one_run(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "u.json")
    charge(ledger, "a", LAB_A, 10, NOW)
    charge(ledger, "a", LAB_A, 30, NOW)
    charge(ledger, "a", LAB_A, 5, NOW)
    assert UsageLedger(ledger.path).used(LAB_A, "mlp-inference", "scans", 0.0) == (1, 30)


def test_period_starts_are_utc_calendar_periods() -> None:
    day = dt.datetime(2026, 12, 2, tzinfo=dt.UTC).timestamp()
    assert period_start("day", NOW) == day
    assert period_start("week", NOW) == dt.datetime(2026, 11, 30, tzinfo=dt.UTC).timestamp()
    assert period_start("month", NOW) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    with pytest.raises(ValueError):
        period_start("year", NOW)


def test_a_corrupt_usage_ledger_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    path.write_text('{"version": 1, "entries": [{"task": "x", "records": -1}]}')
    with pytest.raises(UsageError, match="corrupted"):
        UsageLedger(path)


def test_bad_usage_rules_are_listed() -> None:
    doc = {
        "datasets": {
            "scans": {
                "usage": [
                    {"requester": "nobody", "taskpack": "*", "period": "month", "max_runs": 1},
                    {"requester": "*", "taskpack": "*", "period": "year", "max_runs": 0},
                    {"requester": "*", "taskpack": "*", "period": "day"},
                ]
            }
        }
    }
    with pytest.raises(PolicyError) as exc:
        parse_policy(doc, own_peer=ME)
    problems = "\n".join(exc.value.problems)
    assert "datasets.scans.usage[0].requester: unknown requester group 'nobody'" in problems
    assert "datasets.scans.usage[1].period: must be one of day | week | month" in problems
    assert "datasets.scans.usage[1].max_runs: must be >= 1" in problems
    assert "datasets.scans.usage[2]: give max_runs, max_records or both" in problems


def test_policy_show_lists_usage_rules() -> None:
    shown = parse_policy(POLICY, own_peer=ME).as_dict()["datasets"]["scans"]["usage"]
    assert shown[0] == {
        "requester": "lab-a", "taskpack": "mlp-inference", "period": "month",
        "max_runs": None, "max_records": 1000,
    }  # fmt: skip


def test_policy_lines_show_usage_caps() -> None:
    from p2pfl.cli.policy_cmds import policy_lines

    lines = policy_lines(parse_policy(POLICY, own_peer=ME).as_dict(), {})
    assert "  usage       lab-a with mlp-inference: <= 1,000 records per month" in lines
    assert "  usage       * with *: <= 3 runs per day" in lines
