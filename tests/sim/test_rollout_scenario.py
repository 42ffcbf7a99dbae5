"""`rollout:` in scenario files: validation by path, and scenarios/rollout.yaml run to the
end with metrics per version and the versions' fractions as the rule gives them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pfl.core.versions import Arm, assign
from p2pfl.errors import ValidationError
from p2pfl.identity import Identity
from p2pfl.sim.runner import run_scenario
from p2pfl.sim.scenario import load_scenario, parse

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "rollout.yaml"
CANARY = "taskpacks/fedavg-mlp-digits-1.1.0"


def _raw(**rollout: Any) -> dict[str, Any]:
    raw = yaml.safe_load(SCENARIO.read_text())
    raw["rollout"] = rollout
    return raw


def _problems(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    source = tmp_path / "bad.yaml"
    source.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValidationError) as err:
        load_scenario(source)
    assert str(source) in str(err.value)  # errors name the file
    return err.value.problems


def test_the_shipped_scenario_parses_to_the_cli_form() -> None:
    scenario = load_scenario(SCENARIO)
    assert scenario.rollout is not None
    assert scenario.rollout.spec() == "1.0.0=0.8,1.1.0=0.2"
    assert [(v, p.name) for v, p in scenario.rollout.taskpacks] == [
        ("1.1.0", "fedavg-mlp-digits-1.1.0")
    ]


@pytest.mark.parametrize(
    ("rollout", "expected"),
    [
        (
            {"shares": {"1.0.0": 0.7, "1.1.0": 0.2}, "taskpacks": {"1.1.0": CANARY}},
            "rollout.shares: fractions sum to 0.9, not 1",
        ),
        (
            {"shares": {"1.0.0": 0.8, "1.1": 0.2}, "taskpacks": {"1.1": CANARY}},
            "rollout.shares: '1.1=0.2' is not VERSION=FRACTION (e.g. 1.1.0=0.2)",
        ),
        (
            {"shares": {"1.0.0": 0.8, "1.1.0": "a fifth"}, "taskpacks": {"1.1.0": CANARY}},
            "rollout.shares.1.1.0: must be a fraction in (0, 1], got 'a fifth'",
        ),
        (
            {"shares": {"1.0.0": 0.8, "1.1.0": 0.2}, "taskpacks": {}},
            "rollout.taskpacks: name a directory for each version but the scenario's"
            " taskpack: 1 for 2 shares, got 0",
        ),
        (
            {"shares": {"1.0.0": 0.8, "1.1.0": 0.2}, "taskpacks": {"1.2.0": CANARY}},
            "rollout.taskpacks.1.2.0: version not in rollout.shares (1.0.0, 1.1.0)",
        ),
        (
            {"shares": {"1.0.0": 0.8, "1.1.0": 0.2}},
            "rollout.taskpacks: required",
        ),
        (
            {"shares": {"1.0.0": 0.8, "1.1.0": 0.2}, "taskpacks": {"1.1.0": CANARY}, "x": 1},
            "rollout.x: unknown key (known: shares, taskpacks)",
        ),
    ],
)
def test_bad_rollouts_are_refused_by_path(
    rollout: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    assert expected in _problems(_raw(**rollout), tmp_path)


def test_an_unquoted_numeric_version_is_refused(tmp_path: Path) -> None:
    # YAML reads `1.5: 0.2` as the number 1.5: say how to write it.
    raw = _raw(shares={"1.0.0": 0.8, 1.5: 0.2}, taskpacks={"1.1.0": CANARY})
    problems = _problems(raw, tmp_path)
    assert 'rollout.shares.1.5: versions must be quoted strings ("1.0.0"), got 1.5' in problems


def test_versions_are_checked_against_the_manifests(tmp_path: Path) -> None:
    # The canary directory listed under a version it is not, and the scenario's own
    # taskpack (1.0.0) missing from the shares.
    raw = _raw(shares={"2.0.0": 0.5, "1.1.0": 0.5}, taskpacks={"1.1.0": CANARY})
    problems = _problems(raw, tmp_path)
    assert any(
        p.startswith("rollout.shares: the scenario's taskpack is fedavg-mlp-digits@1.0.0")
        for p in problems
    ), problems
    raw = _raw(shares={"1.0.0": 0.5, "1.2.0": 0.5}, taskpacks={"1.2.0": CANARY})
    problems = _problems(raw, tmp_path)
    assert any(p.endswith("is version 1.1.0, not 1.2.0") for p in problems), problems
    raw = _raw(
        shares={"1.0.0": 0.5, "1.1.0": 0.5}, taskpacks={"1.1.0": "taskpacks/federated-stats"}
    )
    problems = _problems(raw, tmp_path)
    assert any("a rollout runs versions of 'fedavg-mlp-digits'" in p for p in problems), problems


def test_a_flow_cannot_take_a_rollout() -> None:
    raw = _raw(shares={"1.0.0": 0.8, "1.1.0": 0.2}, taskpacks={"1.1.0": CANARY})
    del raw["taskpack"]
    raw["flow"] = "flows/heart-disease.yaml"
    with pytest.raises(ValidationError) as err:
        parse(raw, base_dir=ROOT, check_files=False)
    assert any(p.startswith("rollout: a flow's steps") for p in err.value.problems)


def test_assignment_fractions_hold_for_many_peers() -> None:
    # The rule (a hash of task and peer against cumulative shares) over 4,000 peers: the
    # count of 1.1.0 nodes is Binomial(4000, 0.2); 4.5 standard deviations either side.
    arms = (Arm("1.0.0", "a", "s", 8000), Arm("1.1.0", "b", "s", 2000))
    n = 4000
    canary = sum(
        assign("task-1", Identity.from_seed(i.to_bytes(32, "big")).peer_id, arms).version == "1.1.0"
        for i in range(n)
    )
    sd = math.sqrt(n * 0.2 * 0.8)
    assert abs(canary - n * 0.2) <= 4.5 * sd, canary


@pytest.mark.slow
def test_the_rollout_scenario_reports_each_version(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIO)
    summary = run_scenario(scenario, out_dir=tmp_path / "run", plots=False)
    assert summary.status == "succeeded", summary.reason
    by_version = summary.result["metrics"]["by_version"]
    assert set(by_version) == {"1.0.0", "1.1.0"}
    counts = {v: row["nodes"] for v, row in by_version.items()}
    assert sum(counts.values()) == scenario.nodes
    # 10 nodes, each on 1.1.0 with probability 0.2: P(count > 7) < 1e-4.
    assert 0 <= counts["1.1.0"] <= 7, counts
    for version, row in by_version.items():
        if row["nodes"]:
            assert 0.0 <= row["accuracy"] <= 1.0 and row["num_samples"] > 0, (version, row)
    # Only 1.1.0's code reports top-2 accuracy: each node ran its own version's archive.
    if counts["1.1.0"]:
        assert by_version["1.1.0"]["top2_accuracy"] >= by_version["1.1.0"]["accuracy"]
    if counts["1.0.0"]:
        assert "top2_accuracy" not in by_version["1.0.0"]
