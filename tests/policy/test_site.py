"""SitePolicy: loading (every problem by path), safe defaults, and each rule's refusal."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from p2pfl.identity import peer_id_from_public_bytes
from p2pfl.policy import OfferFacts, PolicyError, load_policy, parse_policy
from p2pfl.policy.ranges import parse_range, parse_taskpack_pattern, version_in


def peer(n: int) -> str:
    return peer_id_from_public_bytes(bytes([n]) * 32)


ME, LAB_A, LAB_B, STRANGER, PUB = peer(1), peer(2), peer(3), peer(4), peer(5)

POLICY = f"""
requesters: {{lab-a: [{LAB_A}], lab-b: [{LAB_B}]}}
datasets:
  wages:
    allow: [lab-a]
    taskpacks: ["{PUB}/federated-stats@^1"]
    types: [analysis]
    k: 10
    dp: {{required: true, max_epsilon_per_task: 2.0, budget: 5.0, delta: 1.0e-5}}
    limits: {{max_rounds: 50, max_wall_s: 3600, memory: 2Gi, concurrent_tasks: 2}}
    advertise: {{count: coarse}}
  open:
    allow: [lab-a, lab-b, self]
    extremes: allow
    advertise: {{count: exact}}
  secret:
    allow: [lab-a]
    advertise: {{count: hidden}}
"""


def facts(**over: Any) -> OfferFacts:
    base = OfferFacts(
        requester=LAB_A,
        datasets=("wages",),
        taskpack_publisher=PUB,
        taskpack_name="federated-stats",
        taskpack_version="1.2.0",
        type="analysis",
        rounds=1,
        protocol="fedavg",
        aggregator="fedavg",
        dp_epsilon=1.0,
        dp_delta=1e-5,
        manifest_dp_required=False,
        manifest_type="analysis",
        manifest_aggregator="fedavg",
        manifest_protocol="fedavg",
        params={},
    )
    return dataclasses.replace(base, **over)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def policy(policy_file: Path):  # type: ignore[no-untyped-def]
    return load_policy(policy_file, own_peer=ME)


def test_allowed_offer_and_what_the_node_enforces(policy) -> None:  # type: ignore[no-untyped-def]
    d = policy.decide(facts())
    assert d.allowed and d.rule == "policy", d.reason
    assert d.k == 10 and d.dp_required and d.max_epsilon == 2.0
    assert d.max_rounds == 50 and d.max_wall_s == 3600 and d.memory_bytes == 2 * 2**30
    assert d.concurrent_tasks == 2 and d.extremes is False
    assert d.metrics == "withhold"  # DP is on and the policy says nothing else
    rules = d.release_rules()
    assert rules.k == 10 and rules.epsilon == 1.0 and rules.extremes is False


@pytest.mark.parametrize(
    "over, rule, reason",
    [
        (
            {"requester": STRANGER},
            "datasets.wages.allow",
            f"dataset wages: requester {STRANGER} is not in allow [lab-a]",
        ),
        (
            {"requester": LAB_B},
            "datasets.wages.allow",
            f"dataset wages: requester {LAB_B} is not in allow [lab-a]",
        ),
        (
            {"taskpack_version": "2.0.0"},
            "datasets.wages.taskpacks",
            f"dataset wages: taskpack {PUB}/federated-stats@2.0.0 matches none of "
            f"[{PUB}/federated-stats@^1]",
        ),
        (
            {"taskpack_publisher": STRANGER},
            "datasets.wages.taskpacks",
            f"dataset wages: taskpack {STRANGER}/federated-stats@1.2.0 matches none",
        ),
        (
            {"type": "training", "manifest_type": "training"},
            "datasets.wages.types",
            "dataset wages: type training is not in types [analysis]",
        ),
        (
            {"dp_epsilon": None, "dp_delta": None},
            "datasets.wages.dp.required",
            "dataset wages: DP is required but the offer turns it off",
        ),
        (
            {"dp_epsilon": 2.5},
            "datasets.wages.dp.max_epsilon_per_task",
            "dataset wages: epsilon 2.5 > max_epsilon_per_task 2",
        ),
        ({"dp_delta": 1e-3}, "datasets.wages.dp.delta", "dataset wages: delta 0.001 > 1e-05"),
        (
            {"rounds": 100_000},
            "datasets.wages.limits.max_rounds",
            "dataset wages: 100000 rounds > max_rounds 50",
        ),
        # The offer may only tighten its manifest.
        (
            {"type": "training"},
            "offer.type",
            "the offer declares type training but the manifest says analysis",
        ),
        (
            {"aggregator": "median"},
            "offer.aggregator",
            "the offer declares aggregator median but the manifest says fedavg",
        ),
        (
            {"protocol": "gossip"},
            "offer.protocol",
            "the offer declares protocol gossip but the manifest says fedavg",
        ),
        (
            {"manifest_dp_required": True, "dp_epsilon": None},
            "offer.dp",
            "the manifest requires DP but the offer turns it off",
        ),
        ({"dp_epsilon": float("nan")}, "offer.dp", "is not a positive number"),
    ],
)
def test_each_rule_refuses_with_its_reason(policy, over, rule, reason) -> None:  # type: ignore[no-untyped-def]
    d = policy.decide(facts(**over))
    assert not d.allowed
    assert d.rule == rule
    assert reason in d.reason, d.reason


def test_requester_must_be_allowed_for_every_bound_dataset(policy) -> None:  # type: ignore[no-untyped-def]
    ok = facts(datasets=("open",), requester=LAB_B, dp_epsilon=None, dp_delta=None)
    assert policy.decide(ok).allowed
    both = dataclasses.replace(ok, datasets=("open", "secret"))
    d = policy.decide(both)
    assert not d.allowed and d.rule == "datasets.secret.allow"


def test_several_datasets_take_the_strictest_terms(policy) -> None:  # type: ignore[no-untyped-def]
    d = policy.decide(facts(datasets=("wages", "open")))
    assert d.allowed and d.datasets == ("open", "wages")
    assert d.k == 10 and d.max_rounds == 50 and d.extremes is False  # open alone allows them


def test_lifetime_budget_and_concurrency(policy) -> None:  # type: ignore[no-untyped-def]
    d = policy.decide(facts(dp_epsilon=2.0), spent={"wages": 4.0})
    assert not d.allowed and d.rule == "datasets.wages.dp.budget"
    assert "remaining 1" in d.reason and "spent 4" in d.reason and "budget 5" in d.reason
    assert policy.decide(facts(dp_epsilon=1.0), spent={"wages": 4.0}).allowed
    d = policy.decide(facts(), running={"wages": 2})
    assert not d.allowed and d.rule == "datasets.wages.limits.concurrent_tasks"
    assert "2 task(s) already running (concurrent_tasks 2)" in d.reason


def test_unlisted_dataset_is_for_own_tasks_only(policy) -> None:  # type: ignore[no-untyped-def]
    mine = facts(requester=ME, datasets=("hr",), dp_epsilon=None, dp_delta=None)
    assert policy.decide(mine).allowed
    theirs = dataclasses.replace(mine, requester=LAB_A)
    d = policy.decide(theirs)
    assert not d.allowed and d.rule == "defaults.allow"
    assert f"dataset hr: requester {LAB_A} is not in allow [self]" in d.reason


def test_missing_file_is_the_safe_default(tmp_path: Path) -> None:
    p = load_policy(tmp_path / "policy.yaml", own_peer=ME)
    assert p.datasets == {} and p.defaults.allow == ("self",)
    off = facts(requester=STRANGER, dp_epsilon=None, dp_delta=None)
    assert not p.decide(off).allowed
    assert p.decide(dataclasses.replace(off, requester=ME)).allowed
    assert load_policy(None, own_peer=ME).defaults.k == 10
    # Development: anyone may use unlisted datasets.
    dev = load_policy(None, own_peer=ME, allow_any_requester=True)
    assert dev.decide(off).allowed and dev.as_dict()["allow_any_requester"] is True


def test_defaults_block_applies_to_unlisted_and_fills_listed(tmp_path: Path) -> None:
    doc = {
        "requesters": {"lab-a": [LAB_A]},
        "defaults": {"allow": ["lab-a"], "k": 25, "limits": {"max_rounds": 3}},
        "datasets": {"wages": {"limits": {"concurrent_tasks": 1}}},
    }
    p = parse_policy(doc, own_peer=ME)
    assert p.rules_for("other").k == 25 and p.rules_for("other").allow == ("lab-a",)
    wages = p.rules_for("wages")
    assert wages.k == 25 and wages.max_rounds == 3 and wages.concurrent_tasks == 1
    d = p.decide(facts(datasets=("other",), rounds=4, dp_epsilon=None, dp_delta=None))
    assert d.rule == "defaults.limits.max_rounds"


def test_advertised_rows(policy) -> None:  # type: ignore[no-untyped-def]
    assert policy.advertised_rows("wages", 137) == 130  # coarse: tens
    assert policy.advertised_rows("wages", 9) is None  # coarse: below k (10)
    assert policy.advertised_rows("open", 7) == 7  # exact
    assert policy.advertised_rows("secret", 5000) is None  # hidden
    assert policy.advertised_rows("unlisted", 42) == 40  # default: coarse


def test_as_dict_is_the_effective_policy(policy, policy_file: Path) -> None:  # type: ignore[no-untyped-def]
    d = policy.as_dict()
    assert d["source"] == str(policy_file) and len(d["digest"]) == 64
    assert d["datasets"]["wages"]["dp"]["budget"] == 5.0
    assert d["datasets"]["open"]["k"] == 10  # the node's k filled in
    assert d["defaults"]["allow"] == ["self"]
    assert d["requesters"] == {"lab-a": [LAB_A], "lab-b": [LAB_B]}
    again = load_policy(policy_file, own_peer=ME)
    assert again.digest == policy.digest


def test_policy_error_lists_every_problem_by_path(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"""
requesters: {{lab-a: [{LAB_A}, not-a-peer]}}
datasets:
  wages:
    allow: [lab-a, lab-c]
    taskpacks: ["{PUB}/stats@^x", "nopublisher"]
    types: [analysis, mining]
    k: 0
    dp: {{required: yes, max_epsilon_per_task: 2, budget: 1, delta: 2}}
    limits: {{memory: lots, max_rounds: 0}}
    advertise: {{count: rough}}
    colour: blue
extra: 1
"""
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path, own_peer=ME)
    problems = info.value.problems
    expected = [
        "datasets.wages.k: must be >= 1",
        "datasets.wages.colour: unknown field",
        "extra: unknown field",
        "datasets.wages.types[1]: must be one of training | analysis | inference | preprocessing",
        "datasets.wages.dp.delta: must be < 1",
        "datasets.wages.limits.memory: 'lots' is not a valid size (e.g. 512Mi, 2Gi, 100MB)",
        "datasets.wages.limits.max_rounds: must be >= 1",
        "datasets.wages.advertise.count: must be one of exact | coarse | hidden",
        "requesters.lab-a[1]: 'not-a-peer' is not an Ed25519 peer id (12D3KooW...)",
        "datasets.wages.allow[1]: unknown requester group 'lab-c' (groups: lab-a)",
        "datasets.wages.dp.budget: 1 is below max_epsilon_per_task 2",
    ]
    for e in expected:
        assert e in problems, (e, problems)
    assert any(p.startswith("datasets.wages.taskpacks[0]: version range") for p in problems)
    assert any(p.startswith("datasets.wages.taskpacks[1]: ") for p in problems)
    assert "invalid policy" in str(info.value)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "(root): ['just', 'a list'] is not of type 'object'"),
        ("datasets: {'bad name!': {}}\n", "datasets.bad name!: 'bad name!' is not a valid name"),
        ("requesters: {self: []}\n", "requesters.self: 'self' is reserved"),
    ],
)
def test_bad_documents(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path, own_peer=ME)
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_empty_file_is_the_default_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("# nothing yet\n")
    assert load_policy(path, own_peer=ME).datasets == {}


def test_ranges() -> None:
    assert parse_range("^1") == (">=1.0.0", "<2.0.0")
    assert parse_range("~1.2") == (">=1.2.0", "<1.3.0")
    assert parse_range("^0.2") == (">=0.2.0", "<0.3.0")
    assert parse_range(">=1.2, <2") == (">=1.2.0", "<2.0.0")
    assert parse_range("") == () and parse_range("*") == ()
    assert version_in("1.9.9", parse_range("^1")) and not version_in("2.0.0", parse_range("^1"))
    assert not version_in("not-a-version", ())
    for bad in ("^x", "1.2.3.4", ">>1", "~"):
        with pytest.raises(ValueError):
            parse_range(bad)
    pat = parse_taskpack_pattern(f"{PUB}/federated-stats@~1.2")
    assert pat.matches(PUB, "federated-stats", "1.2.7")
    assert not pat.matches(PUB, "federated-stats", "1.3.0")
    assert not pat.matches(STRANGER, "federated-stats", "1.2.7")
    assert parse_taskpack_pattern("*/x").matches(STRANGER, "x", "9.0.0")


def test_taskpack_book_find_resolves_ranges() -> None:
    from p2pfl.core.taskpacks import _version_matches

    assert _version_matches("1.4.0", "^1") and _version_matches("1.4.0", "1.4.0")
    assert _version_matches("1.4.0", "") and not _version_matches("2.0.0", "^1")
    assert not _version_matches("1.4.0", "not a range")
