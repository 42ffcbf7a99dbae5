"""The `p2pfl` command line against a fake node (CliRunner, in-process)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fakenode import MODEL, PEER_A, PEER_B, SELF_ID, FakeNodeAPI, running_server

from p2pfl.cli.main import COMMANDS, LazyGroup, cli
from p2pfl.client import short_id
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity

MINE = [
    "node",
    "peers",
    "publish",
    "taskpacks",
    "tasks",
    "trace",
    "wait",
    "result",
    "cancel",
    "withdraw",
]


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("node")
    with running_server(d):
        yield d


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def test_help_is_fast_and_lazy() -> None:
    # In a fresh interpreter: listing commands imports none of their modules.
    code = (
        "import sys; from click.testing import CliRunner; from p2pfl.cli.main import cli;"
        "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output;"
        "print(sorted(m for m in sys.modules if m.startswith('p2pfl.cli.') or m in"
        " ('trio', 'rich', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['p2pfl.cli.main']"


def test_every_command_listed_and_has_help() -> None:
    listing = run("--help").output
    for name in COMMANDS:
        assert name in listing
    for name in MINE:
        r = run(name, "--help")
        assert r.exit_code == 0 and "--data-dir" in r.output, name


def test_broken_module_breaks_only_its_command() -> None:
    import click

    @click.group(cls=LazyGroup, lazy={"gone": ("p2pfl.cli.no_such_module:x", "Gone.")})
    def group() -> None:
        pass

    r = CliRunner().invoke(group, ["--help"])
    assert r.exit_code == 0 and "Gone." in r.output
    r = CliRunner().invoke(group, ["gone", "--anything"])
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "'gone' command is unavailable" in line and "no_such_module" in line


def test_peers_json_shape(node_dir: Path) -> None:
    r = run("peers", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {
        "self": {
            "peer_id": SELF_ID,
            "addrs": ["/ip4/127.0.0.1/tcp/4001"],
            "datasets": [{"name": "wages", "rows": 100, "columns": 3}],
        },
        "peers": [
            {
                "peer_id": PEER_A,
                "addrs": ["/ip4/127.0.0.1/tcp/4002"],
                "capabilities": {"datasets": [{"name": "wages"}], "cpus": 2},
            },
            {"peer_id": PEER_B, "addrs": ["/ip4/127.0.0.1/tcp/4003"], "capabilities": None},
        ],
    }


def test_peers_table(node_dir: Path) -> None:
    r = run("peers", "--data-dir", str(node_dir))
    assert r.exit_code == 0
    assert short_id(SELF_ID) in r.output and short_id(PEER_A) in r.output
    assert "wages" in r.output and "/ip4/127.0.0.1/tcp/4002" in r.output
    r = run("peers", "--data-dir", str(node_dir), "--wide")
    assert SELF_ID in r.output and PEER_A in r.output


def test_data_dir_from_environment(node_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PFL_DATA_DIR", str(node_dir))
    r = run("peers", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["self"]["peer_id"] == SELF_ID


@pytest.mark.parametrize(
    "cmd", [["peers"], ["tasks"], ["taskpacks"], ["trace", "x"], ["wait", "x"], ["result", "x"]]
)
def test_dead_node_is_one_line_error(tmp_path: Path, cmd: list[str]) -> None:
    r = run(*cmd, "--data-dir", str(tmp_path / "nothing"))
    assert r.exit_code == 1
    assert "no node is running in" in one_line_error(r)


def test_publish(node_dir: Path, tmp_path: Path) -> None:
    tp = tmp_path / "tp"
    tp.mkdir()
    (tp / "manifest.yaml").write_text("kind: TaskPackage\n")
    r = run("publish", str(tp), "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {
        "cid": "bafycidgood1",
        "name": "wages",
        "version": "1.0.0",
        "publisher": SELF_ID,
    }
    r = run(
        "publish",
        str(tp),
        "--data-dir",
        str(node_dir),
        "--run",
        "--param",
        "rounds=3",
        "--param",
        "note=a=b",
        "--json",
    )
    assert r.exit_code == 0
    assert json.loads(r.stdout)["task_id"] == "good1"
    r = run("publish", str(tp), "--data-dir", str(node_dir), "--run")
    assert r.exit_code == 0 and "p2pfl trace good1" in r.output


def test_publish_errors(node_dir: Path, tmp_path: Path) -> None:
    r = run("publish", str(tmp_path), "--data-dir", str(node_dir), "--run", "--param", "novalue")
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = run("publish", str(tmp_path), "--data-dir", str(node_dir))  # no manifest.yaml
    assert r.exit_code == 1 and "manifest.yaml: missing" in one_line_error(r)
    r = run("publish", str(tmp_path / "nope"), "--data-dir", str(node_dir))
    assert r.exit_code == 2


def test_lists(node_dir: Path) -> None:
    r = run("taskpacks", "--data-dir", str(node_dir), "--json")
    assert [p["status"] for p in json.loads(r.stdout)] == ["verified", "verified", "rejected"]
    r = run("taskpacks", "--data-dir", str(node_dir))
    assert r.exit_code == 0 and "rejected" in r.output and "trusted" in r.output
    r = run("tasks", "--data-dir", str(node_dir), "--json")
    assert {t["task_id"] for t in json.loads(r.stdout)} == {"good1", "bad1", "slow1"}
    r = run("tasks", "--data-dir", str(node_dir))
    assert r.exit_code == 0 and "good1" in r.output and "succeeded" in r.output


def test_taskpacks_versions_side_by_side(node_dir: Path, tmp_path: Path) -> None:
    r = run("taskpacks", "--versions", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 0
    names = json.loads(r.stdout)
    assert [n["name"] for n in names] == ["evil", "wages"]
    wages = names[1]["versions"]
    assert [(v["version"], v["cid"]) for v in wages] == [
        ("1.1.0", "bafycidgood2"),
        ("1.0.0", "bafycidgood1"),
    ]  # newest first
    r = run("taskpacks", "--versions", "--data-dir", str(node_dir))
    assert r.exit_code == 0 and "1.1.0" in r.output and "wages@1" in r.output
    assert all(len(line) <= 80 for line in r.output.splitlines()), r.output
    # --rollout goes with --run, and is checked before the node is asked.
    tp = tmp_path / "tp"
    tp.mkdir()
    (tp / "manifest.yaml").write_text("kind: TaskPackage\n")
    r = run("publish", str(tp), "--data-dir", str(node_dir), "--rollout", "1.0.0=0.5,1.1.0=0.5")
    assert r.exit_code == 2 and "only makes sense with --run" in r.output
    r = run("publish", str(tp), "--data-dir", str(node_dir), "--run", "--rollout", "1.0.0=2")
    assert r.exit_code == 2 and "--rollout" in r.output


def test_trace(node_dir: Path) -> None:
    r = run("trace", "good1", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 0
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["kind"] for e in events] == ["state", "roster", "node", "round", "result"]
    assert set(events[0]) >= {"t", "kind", "peer", "round", "message", "metrics", "task"}
    r = run("trace", "bad1", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 1
    # Not a terminal: one line per event, then the final tree.
    r = run("trace", "good", "--data-dir", str(node_dir))
    assert r.exit_code == 0 and "round 1 done" in r.stdout and "round 2/2" in r.stdout
    r = run("trace", "bad1", "--data-dir", str(node_dir))
    assert r.exit_code == 1 and "no quorum" in r.stderr
    r = run("trace", "zzz", "--data-dir", str(node_dir))
    assert r.exit_code == 1 and one_line_error(r) == "error: unknown task zzz"


def test_wait_exit_codes(node_dir: Path) -> None:
    r = run("wait", "good1", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "succeeded"
    r = run("wait", "bad1", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["status"] == "failed"
    r = run("wait", "slow1", "--data-dir", str(node_dir), "--timeout", "0.2")
    assert r.exit_code == 2 and "did not finish" in one_line_error(r)


def test_result(node_dir: Path, tmp_path: Path) -> None:
    r = run("result", "good1", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    keys = {"task_id", "status", "participants", "rounds", "metrics", "model_cid", "reducer"}
    assert keys <= set(out) and out["model_cid"] == "bafymodel"
    model = tmp_path / "out" / "model.bin"
    r = run("result", "good1", "--data-dir", str(node_dir), "--model-out", str(model))
    assert r.exit_code == 0 and model.read_bytes() == MODEL and "0.9" in r.stdout
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.bin"]
    r = run("result", "slow1", "--data-dir", str(node_dir))
    assert r.exit_code == 1 and "still running" in one_line_error(r)
    r = run("result", "bad1", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 1 and "no quorum" in one_line_error(r)


# -- p2pfl node: argument checking, with run_node replaced ----------------------------------------


@pytest.fixture
def fake_run_node(monkeypatch: pytest.MonkeyPatch) -> list[NodeConfig]:
    seen: list[NodeConfig] = []

    async def run_node(config: NodeConfig) -> None:
        seen.append(config)

    monkeypatch.setitem(sys.modules, "p2pfl.node", types.SimpleNamespace(run_node=run_node))
    return seen


def test_node_builds_config(tmp_path: Path, fake_run_node: list[NodeConfig]) -> None:
    data = tmp_path / "wages.csv"
    data.write_text("a,b\n1,2\n")
    trusted = Identity.generate().peer_id
    r = run(
        "node",
        "--data-dir",
        str(tmp_path / "n"),
        "--listen",
        "/ip4/127.0.0.1/tcp/4001",
        "--bootstrap",
        f"/ip4/127.0.0.1/tcp/4002/p2p/{trusted}",
        "--dataset",
        f"wages={data}",
        "--trust",
        trusted,
        "--min-records",
        "5",
        "--label",
        "region=eu-west",
        "--log-level",
        "DEBUG",
    )
    assert r.exit_code == 0, r.output
    (config,) = fake_run_node
    assert config.data_dir == (tmp_path / "n").resolve()
    assert config.listen == ["/ip4/127.0.0.1/tcp/4001"]
    assert config.bootstrap == [f"/ip4/127.0.0.1/tcp/4002/p2p/{trusted}"]
    assert config.datasets == {"wages": data.resolve()}
    assert config.trusted == frozenset({trusted}) and config.trust_any is False
    assert config.min_records == 5 and config.log_level == "debug"
    assert config.labels == {"region": "eu-west"}


def test_node_defaults_and_trust_any(tmp_path: Path, fake_run_node: list[NodeConfig]) -> None:
    r = run("node", "--data-dir", str(tmp_path), "--trust-any")
    assert r.exit_code == 0
    assert "WARNING" in r.stderr and "ANY publisher" in r.stderr
    (config,) = fake_run_node
    assert config.listen == ["/ip4/127.0.0.1/tcp/0"] and config.trust_any
    assert config.min_records == NodeConfig(data_dir=tmp_path).min_records


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "wages"], "is not NAME=PATH"),
        (["--dataset", "wa ges=/etc/hostname"], "must be letters"),
        (["--dataset", "wages=/no/such/file.csv"], "no such file"),
        (["--listen", "not-a-multiaddr"], "is not a multiaddr"),
        (["--bootstrap", "/ip4/999.1.1.1/tcp/1"], "is not a multiaddr"),
        (["--trust", "12D3KooWnotapeerid"], "is not an Ed25519 peer id"),
        (["--min-records", "0"], "--min-records"),
        (["--label", "region"], "is not KEY=VALUE"),
        (["--label", "region=eu/west"], "is not KEY=VALUE"),
    ],
)
def test_node_rejects_bad_arguments(
    tmp_path: Path, fake_run_node: list[NodeConfig], args: list[str], message: str
) -> None:
    r = run("node", "--data-dir", str(tmp_path), *args)
    assert r.exit_code == 2 and message in r.output
    assert fake_run_node == []


def test_node_without_node_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "p2pfl.node", None)  # import fails
    r = run("node", "--data-dir", str(tmp_path))
    assert r.exit_code == 1 and "cannot start a node" in one_line_error(r)


def _unused(_: Any) -> None:  # keeps FakeNodeAPI imported for readers of this file
    FakeNodeAPI()


def test_cancel_and_withdraw_answer_in_json(node_dir: Path) -> None:
    r = run("cancel", "good1", "--reason", "wrong data", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["reason"] == "cancelled by the publisher: wrong data"
    r = run("withdraw", "good1", "--data-dir", str(node_dir), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["task_id"]
