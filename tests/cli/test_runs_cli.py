"""Run options on publish/run, and the node-local views `p2pfl reports` and `p2pfl datasets
--data-dir` (read from the data dir itself)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fakenode import FakeNodeAPI, running_server

from p2pfl.cli.main import cli
from p2pfl.driver import parse_run_options
from p2pfl.errors import LocalProtocolError
from p2pfl.store.local_runs import RecordsLedger, write_report


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Path, FakeNodeAPI]]:
    with running_server(tmp_path / "node") as api:
        yield tmp_path / "node", api


def test_run_options_become_run_parameters(node: tuple[Path, FakeNodeAPI], tmp_path: Path) -> None:
    data_dir, api = node
    tp = tmp_path / "tp"
    tp.mkdir()
    (tp / "manifest.yaml").write_text("kind: TaskPackage\n")
    base = ["publish", str(tp), "--data-dir", str(data_dir), "--run", "--json"]
    assert run(*base, "--test-run").exit_code == 0
    assert run(*base, "--test-run", "5", "--new-data-only").exit_code == 0
    assert run(*base, "--force-rerun-failed").exit_code == 0
    assert [p for _, _, p in api.published] == [
        {"run.test_run": "10"},
        {"run.test_run": "5", "run.new_data_only": "true"},
        {"run.rerun_failed": "true"},
    ]
    bad = CliRunner().invoke(cli, [*base, "--test-run", "0"])
    assert bad.exit_code != 0 and "--test-run" in bad.output


def test_parse_run_options() -> None:
    assert parse_run_options({}) is None
    assert parse_run_options({"test_run": ""}) == {"test_run": 10}
    assert parse_run_options({"test_run": "5", "new_data_only": "true"}) == {
        "test_run": 5,
        "new_data_only": True,
    }
    assert parse_run_options({"rerun_failed": "false"}) is None
    for bad, why in [
        ({"test_run": "many"}, "not a number"),
        ({"test_run": "0"}, "test_run"),
        ({"new_data_only": "perhaps"}, "not true or false"),
        ({"evil": "1"}, "unknown run option"),
    ]:
        with pytest.raises(LocalProtocolError, match=why):
            parse_run_options(bad)


def test_reports_lists_and_locates(tmp_path: Path) -> None:
    assert run("reports", "--data-dir", str(tmp_path)).output.strip() == "no reports yet"
    rows = [{"key": "a", "prediction": "1", "score": 0.9}]
    meta = {"taskpack": "mlp-inference", "dataset": "scans", "created": 1.0, "test_run": True}
    path = write_report(tmp_path, "a" * 32, rows, meta)
    out = run("reports", "--data-dir", str(tmp_path)).output
    assert "mlp-inference on scans: 1 records, 0 failed  TEST RUN" in out
    assert str(path) in out
    listed = json.loads(run("reports", "--data-dir", str(tmp_path), "--json").output)
    assert listed[0]["path"] == str(path) and listed[0]["rows"] == 1
    missing = CliRunner().invoke(cli, ["reports", "--data-dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "not a node's data directory" in missing.output


def test_datasets_shows_what_a_node_processed(tmp_path: Path) -> None:
    assert "no batched runs" in run("datasets", "--data-dir", str(tmp_path)).output
    RecordsLedger(tmp_path).record_run(
        "mlp-inference", "scans", task_id="b" * 32, when=1.0,
        done={"x": "1", "y": "2"}, failed={"z": "ValueError: truncated"}, test_run=False,
    )  # fmt: skip
    out = run("datasets", "--data-dir", str(tmp_path)).output
    assert "mlp-inference" in out and "scans" in out and "failed z: ValueError: truncated" in out
    assert all(len(line) <= 80 for line in out.splitlines())
    view = json.loads(run("datasets", "--data-dir", str(tmp_path), "--json").output)
    assert (view[0]["processed"], view[0]["failed"]) == (2, 1)
    # The group's subcommands still work, and bare `p2pfl datasets` prints its help.
    assert "digits" in run("datasets", "list").output
    assert "split" in run("datasets").output


def test_each_new_command_loads_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """Lazy loading imports a command's module first: no import cycle may hide there."""
    import subprocess
    import sys

    for argv in (["reports", "--data-dir", str(tmp_path), "--json"], ["publish", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-m", "p2pfl.cli.main", *argv], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr


def test_parse_window() -> None:
    from p2pfl.driver import parse_window

    assert parse_window("30") == 30.0
    for bad in ("soon", "0", "-1", "1e9"):
        with pytest.raises(LocalProtocolError, match="volunteer_window_s"):
            parse_window(bad)
