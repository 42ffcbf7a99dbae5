"""Client and CLI with flow ids, over a real ControlServer and a canned flows API (the real
one over real nodes is tests/e2e/test_flows.py)."""

from __future__ import annotations

import copy
import io
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from fakenode import FakeNodeAPI, running_server  # noqa: E402

from p2pfl import Client, TaskFailed, TaskNotFinished, ValidationError  # noqa: E402
from p2pfl.errors import LocalProtocolError  # noqa: E402

GOOD, BAD = "a" * 32, "b" * 32


def status(flow_id: str, state: str, steps: list[str], reason: str = "") -> dict[str, Any]:
    return {
        "flow_id": flow_id, "name": "heart-disease", "status": state, "reason": reason,
        "starter": "me", "started_here": True, "created": 0.0, "datasets": ["heart"],
        "result": None,
        "steps": [
            {"index": i, "name": n, "state": s, "percent": 100 if s == "succeeded" else 0,
             "task_id": None, "attempts": 1, "taskpack": n, "type": "analysis", "input": ["heart"],
             "output": None, "model_from": None, "reason": "", "task": None, "nodes": [],
             "result": {"task_id": "t" * 32, "status": s, "metrics": {"records": 5}, "model_cid": None,
                        "participants": [], "rounds": 1, "reason": "", "reducer": "r"}
             if s in ("succeeded", "failed") else None}
            for i, (n, s) in enumerate(zip(["standardise", "train", "validate"], steps, strict=True))
        ],
    }  # fmt: skip


class FakeFlows:
    def __init__(self) -> None:
        self.runs: list[tuple[str, dict[str, str]]] = []
        self.resumed: list[str] = []
        self.script = {
            GOOD: [
                status(GOOD, "running", ["succeeded", "running", "pending"]),
                status(GOOD, "succeeded", ["succeeded"] * 3),
            ],
            BAD: [
                status(BAD, "failed", ["succeeded", "failed", "pending"], "step train failed: x")
            ],
        }

    async def flow_run(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        if "bad" in Path(path).name:
            raise ValidationError(["steps[0].input: 'x' is neither ..."], "flow")
        self.runs.append((path, params))
        return {"flow_id": GOOD, "name": "heart-disease", "steps": []}

    def _id(self, flow_id: str) -> str:
        for known in self.script:
            if known.startswith(flow_id):
                return known
        raise KeyError(flow_id)

    def flows(self) -> list[dict[str, Any]]:
        return [{"flow_id": f, "name": "heart-disease", "status": s[-1]["status"], "steps": 3,
                 "done": 3, "starter": "me", "created": 0.0, "reason": ""}
                for f, s in self.script.items()]  # fmt: skip

    def flow(self, flow_id: str) -> dict[str, Any]:
        return copy.deepcopy(self.script[self._id(flow_id)][-1])

    def flow_resume(self, flow_id: str) -> dict[str, Any]:
        fid = self._id(flow_id)
        if fid != BAD:
            raise LocalProtocolError(f"flow {fid} is succeeded")
        self.resumed.append(fid)
        return status(BAD, "running", ["succeeded", "running", "pending"])

    def flow_result(self, flow_id: str) -> dict[str, Any]:
        fid = self._id(flow_id)
        last = self.script[fid][-1]
        if last["status"] == "failed":
            raise TaskFailed(f"flow {fid} failed: {last['reason']}")
        if last["status"] != "succeeded":
            raise TaskNotFinished(f"flow {fid} is running")
        return {"flow_id": fid, "name": "heart-disease", "status": "succeeded", "reason": "",
                "steps": {s["name"]: s["result"] for s in last["steps"]}, "result": None}  # fmt: skip

    async def watch_flow(self, flow_id: str) -> AsyncIterator[dict[str, Any]]:
        for snap in self.script[self._id(flow_id)]:
            await trio.sleep(0)
            yield {"kind": "flow", "t": 0.0, "flow": copy.deepcopy(snap)}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FakeFlows]]:
    d = tmp_path_factory.mktemp("node")
    api = FakeNodeAPI()
    flows = FakeFlows()
    api.flows_api = flows  # type: ignore[attr-defined]
    with running_server(d, api):
        yield d, flows


def test_client_takes_flow_ids(node: tuple[Path, FakeFlows], tmp_path: Path) -> None:
    d, flows = node
    c = Client(d)
    flow_file = tmp_path / "f.yaml"
    flow_file.write_text("name: f\n")
    assert c.create_flow(flow_file, {"train.rounds": 5}) == GOOD
    assert flows.runs[-1] == (str(flow_file.resolve()), {"train.rounds": "5"})
    assert c.is_flow(GOOD[:6]) and not c.is_flow("good1")
    out = io.StringIO()
    assert c.trace(GOOD, out=out) is True
    assert "Step: train [Active - 0%]" in out.getvalue()
    assert "heart-disease flow aaaaaaaaaaaa - Succeeded" in out.getvalue()
    assert c.wait(GOOD)["steps"]["validate"]["status"] == "succeeded"
    assert c.get_result(GOOD)["status"] == "succeeded"
    with pytest.raises(TaskFailed, match="step train failed"):
        c.wait(BAD)
    with pytest.raises(TaskFailed):
        c.get_result(BAD)
    assert c.resume_flow(BAD)["status"] == "running" and flows.resumed == [BAD]
    with pytest.raises(LocalProtocolError, match="succeeded"):
        c.resume_flow(GOOD)
    with pytest.raises(FileNotFoundError):
        c.create_flow(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("x")
    with pytest.raises(ValidationError) as err:
        c.create_flow(bad)
    assert err.value.problems == ["steps[0].input: 'x' is neither ..."]
    # Task ids still work as before.
    assert c.get_result("good1")["task_id"] == "good1"


def test_cli_flow_commands(node: tuple[Path, FakeFlows], tmp_path: Path) -> None:
    from p2pfl.cli.main import cli

    d, _ = node
    runner = CliRunner()
    flow_file = tmp_path / "f.yaml"
    flow_file.write_text("name: f\n")
    out = runner.invoke(
        cli,
        [
            "flow",
            "run",
            str(flow_file),
            "--data-dir",
            str(d),
            "--param",
            "train.rounds=3",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"flow_id": GOOD}
    out = runner.invoke(cli, ["flow", "status", GOOD[:8], "--data-dir", str(d), "--json"])
    assert json.loads(out.output)["status"] == "succeeded"
    out = runner.invoke(cli, ["flow", "status", GOOD, "--data-dir", str(d)])
    assert out.exit_code == 0 and "Step: validate [Completed]" in out.output
    out = runner.invoke(cli, ["flow", "result", BAD, "--data-dir", str(d)])
    assert out.exit_code == 1 and "step train failed" in out.output
    out = runner.invoke(cli, ["flow", "result", GOOD, "--data-dir", str(d)])
    assert out.exit_code == 0 and "validate: succeeded" in out.output
    out = runner.invoke(cli, ["trace", GOOD, "--data-dir", str(d)])
    assert out.exit_code == 0 and "Step: standardise [Completed]" in out.output
    out = runner.invoke(cli, ["trace", BAD, "--data-dir", str(d)])
    assert out.exit_code == 1
    out = runner.invoke(cli, ["wait", GOOD, "--data-dir", str(d)])
    assert out.exit_code == 0
    out = runner.invoke(cli, ["flow", "list", "--data-dir", str(d)])
    assert GOOD in out.output and BAD in out.output
    out = runner.invoke(cli, ["flow", "resume", BAD, "--data-dir", str(d)])
    assert out.exit_code == 0 and "resumed" in out.output
    out = runner.invoke(cli, ["flow", "status", "c" * 32, "--data-dir", str(d)])
    assert out.exit_code == 1 and "c" * 32 in out.output
