"""The Node's policy faces (no network): load at start, reload (and SIGHUP), check, audit."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
from test_site import LAB_A, ME, POLICY

from p2pfl.config import NodeConfig
from p2pfl.node import Node, _reload_on_hup, open_site
from p2pfl.policy import LedgerError, PolicyError


class FakeCore:
    me = ME

    def __init__(self) -> None:
        self.tasks: dict[str, Any] = {"t-declined": object()}
        self.decisions = {
            "t-declined": {"allowed": False, "rule": "datasets.wages.allow", "reason": "no"}
        }

    def policy_decision(self, task_id: str) -> dict[str, Any] | None:
        return self.decisions.get(task_id)

    def set_site(self, site: Any, now: float) -> list[Any]:
        self.site = site
        return []


def make_node(data_dir: Path, **config: Any) -> Node:
    core = FakeCore()
    driver = types.SimpleNamespace(
        core=core,
        listeners=[],
        execute=lambda cmds: None,
        io=types.SimpleNamespace(now=lambda: 0.0),
    )
    return Node(NodeConfig(data_dir=data_dir, **config), driver, None, "test")  # type: ignore[arg-type]


def test_start_without_policy_is_safe_and_audited(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    shown = node.policy_show()
    assert shown["policy"]["source"] is None and shown["policy"]["defaults"]["allow"] == ["self"]
    assert shown["ledger"] == {}
    assert [(e["kind"], e["action"]) for e in node.audit()] == [("policy", "load")]


def test_allow_any_requester_reaches_the_policy(tmp_path: Path) -> None:
    node = make_node(tmp_path, allow_any_requester=True, min_records=25)
    assert node.policy.defaults.allow == ("*",) and node.policy.defaults.k == 25


def test_reload_applies_a_good_file_and_keeps_the_old_one_on_a_bad_file(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    (tmp_path / "policy.yaml").write_text(POLICY)
    out = node.policy_reload()
    assert out["changed"] is True and node.policy.rules_for("wages").k == 10
    assert node.policy_reload()["changed"] is False
    good = node.policy.digest
    (tmp_path / "policy.yaml").write_text("datasets: {wages: {k: 0, colour: red}}\n")
    with pytest.raises(PolicyError) as info:
        node.policy_reload()
    assert "datasets.wages.k: must be >= 1" in info.value.problems
    assert node.policy.digest == good  # fail closed: the last good policy stays
    # SIGHUP does the same, and never raises (the node keeps running).
    _reload_on_hup(node)
    actions = [e["action"] for e in node.audit() if e["kind"] == "policy"]
    assert actions == ["load", "reload", "reload", "error", "error"]
    assert node.audit()[-1]["problems"][0].startswith("datasets.wages")


def test_policy_check_explains_the_core_decision(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    assert node.policy_check("t-dec")["rule"] == "datasets.wages.allow"  # a unique prefix
    node.core.tasks["t-other"] = object()
    with pytest.raises(KeyError, match="no policy decision for task t-other"):
        node.policy_check("t-other")
    with pytest.raises(KeyError):
        node.policy_check("unknown")


def test_invalid_policy_or_ledger_stops_the_node_at_start(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(f"requesters: {{lab-a: [{LAB_A}]}}\nbogus: 1\n")
    with pytest.raises(PolicyError, match="bogus: unknown field"):
        open_site(NodeConfig(data_dir=tmp_path), ME)
    (tmp_path / "policy.yaml").unlink()
    (tmp_path / "privacy-ledger.json").write_text("{torn")
    with pytest.raises(LedgerError):
        open_site(NodeConfig(data_dir=tmp_path), ME)
