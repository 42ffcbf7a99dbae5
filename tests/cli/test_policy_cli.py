"""`p2pfl policy show|reload|check`, `p2pfl audit` and `p2pfl run` against a fake node."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fakenode import PEER_B, FakeNodeAPI, running_server

from p2pfl.cli.main import cli
from p2pfl.client import Client

NEW = [["policy", "show"], ["policy", "reload"], ["policy", "check"], ["audit"], ["run"]]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FakeNodeAPI]]:
    d = tmp_path_factory.mktemp("node")
    with running_server(d) as api:
        yield d, api


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("cmd", NEW)
def test_help(cmd: list[str]) -> None:
    r = run(*cmd, "--help")
    assert r.exit_code == 0 and "--data-dir" in r.output
    assert "--json" in r.output


def test_listed_in_top_level_help() -> None:
    listing = run("--help").output
    assert "policy" in listing and "audit" in listing and "run" in listing
    assert "node" in listing and "--allow-any-requester" in run("node", "--help").output


def test_policy_show(node: tuple[Path, FakeNodeAPI]) -> None:
    d, _ = node
    r = run("policy", "show", "--data-dir", str(d), "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert out["policy"]["datasets"]["wages"]["k"] == 10
    assert out["ledger"]["wages"]["spent"] == 4.0
    r = run("policy", "show", "--data-dir", str(d))
    assert r.exit_code == 0
    text = r.output
    assert "dataset wages" in text and "budget 10 (spent 4, left 6)" in text
    assert "defaults (datasets the policy does not name)" in text
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_policy_reload_ok_and_refused(node: tuple[Path, FakeNodeAPI]) -> None:
    d, api = node
    r = run("policy", "reload", "--data-dir", str(d), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    assert "policy reloaded (changed)" in run("policy", "reload", "--data-dir", str(d)).output
    api.policy_valid = False
    try:
        r = run("policy", "reload", "--data-dir", str(d))
        assert r.exit_code == 1
        assert "datasets.wages.k: must be >= 1" in r.stderr and "extra: unknown field" in r.stderr
        assert "keeps its current policy" in r.stderr and "Traceback" not in r.output
        r = run("policy", "reload", "--data-dir", str(d), "--json")
        assert r.exit_code == 1
        assert json.loads(r.stdout)["problems"] == [
            "datasets.wages.k: must be >= 1",
            "extra: unknown field",
        ]
    finally:
        api.policy_valid = True


def test_policy_check(node: tuple[Path, FakeNodeAPI]) -> None:
    d, _ = node
    r = run("policy", "check", "bad", "--data-dir", str(d), "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert out["allowed"] is False and out["rule"] == "datasets.wages.allow"
    r = run("policy", "check", "bad1", "--data-dir", str(d))
    assert "task bad1: declined (rule datasets.wages.allow)" in r.output
    assert f"requester {PEER_B} is not in allow [lab-a]" in r.output
    r = run("policy", "check", "good1", "--data-dir", str(d))
    assert "allowed (rule policy)" in r.output and "rounds <= 50" in r.output
    r = run("policy", "check", "nope", "--data-dir", str(d))
    assert r.exit_code == 1 and "unknown task nope" in r.stderr


def test_audit(node: tuple[Path, FakeNodeAPI]) -> None:
    d, _ = node
    r = run("audit", "--data-dir", str(d), "--json")
    assert [e["kind"] for e in json.loads(r.stdout)] == ["policy", "offer", "release"]
    r = run("audit", "--data-dir", str(d), "--task", "good1", "--json")
    assert [e["kind"] for e in json.loads(r.stdout)] == ["release"]
    r = run("audit", "--data-dir", str(d))
    assert r.exit_code == 0 and "declined datasets.wages.allow" in r.output
    assert all(len(line) <= 80 for line in r.output.splitlines()), r.output
    assert (
        "no audit entries for task zzz"
        in run("audit", "--data-dir", str(d), "--task", "zzz").output
    )


def test_run_by_name_range_and_cid(node: tuple[Path, FakeNodeAPI], tmp_path: Path) -> None:
    d, _ = node
    r = run("run", "wages@^1", "--data-dir", str(d), "--param", "column=age", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"task_id": "good1", "ref": "wages@^1"}
    r = run("run", "bafycidgood1", "--data-dir", str(d))
    assert r.exit_code == 0 and "task good1 offered" in r.output
    r = run("run", "nothing", "--data-dir", str(d))
    assert r.exit_code == 1 and "unknown taskpack nothing" in r.stderr
    r = run("run", str(tmp_path), "--data-dir", str(d))
    assert r.exit_code == 1 and "publish it" in r.stderr
    r = run("run", "wages", "--data-dir", str(d), "--param", "bad")
    assert r.exit_code == 2


def test_run_a_rollout_of_two_versions(node: tuple[Path, FakeNodeAPI]) -> None:
    d, api = node
    r = run("run", "wages", "--data-dir", str(d), "--rollout", "1.0.0=0.8,1.1.0=0.2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["task_id"] == "good1"
    assert api.rollouts[-1] == "1.0.0=0.8,1.1.0=0.2"
    assert Client(d).run("wages", rollout="1.0.0=0.5,1.1.0=0.5") == "good1"
    assert api.rollouts[-1] == "1.0.0=0.5,1.1.0=0.5"
    bad = {
        "1.0.0=0.8,1.1.0=0.3": "fractions sum to 1.1, not 1",
        "1.0.0=1": "give 2 to 8 VERSION=FRACTION pairs",
        "1.0.0=0.8,one=0.2": "'one=0.2' is not VERSION=FRACTION",
    }
    for text, why in bad.items():
        r = run("run", "wages", "--data-dir", str(d), "--rollout", text)
        assert r.exit_code == 2 and why in r.output, r.output


def test_client_api(node: tuple[Path, FakeNodeAPI]) -> None:
    d, _ = node
    c = Client(d)
    assert c.create_task("wages@^1") == "good1" and c.run("wages") == "good1"
    assert c.policy_check("good1")["k"] == 10
    assert len(c.audit()) == 3 and c.audit("bad1")[0]["decision"] == "declined"
    assert c.policy_show()["policy"]["defaults"]["allow"] == ["self"]
