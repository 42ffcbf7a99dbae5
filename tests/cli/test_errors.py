"""`p2pfl --help` lists only real commands, and every error has one style:
`error: ...` on stderr and a non-zero exit (2 for a bad command line)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from p2pfl.cli.main import COMMANDS, cli


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_only_commands_that_load() -> None:
    listing = run("--help").stdout
    listed = re.findall(r"^  ([a-z-]+)\s", listing.split("Commands:")[1], re.M)
    assert sorted(listed) == sorted(COMMANDS)
    for name in listed:
        cmd = cli.get_command(click.Context(cli), name)
        assert cmd is not None and "unavailable" not in (cmd.help or ""), name


@pytest.mark.parametrize("group", ["datasets", "policy"])
def test_a_group_summary_names_only_its_real_subcommands(group: str) -> None:
    summary = COMMANDS[group][1]  # e.g. "Offline datasets: list, split."
    named = {w for w in re.split(r"[\s,.]+", summary.split(":", 1)[1]) if w}
    cmd = cli.get_command(click.Context(cli), group)
    assert isinstance(cmd, click.Group)
    assert named == set(cmd.list_commands(click.Context(cmd))), summary


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["publish", "/no/such/dir"],
        ["node", "--dataset", "novalue"],
        ["datasets", "split", "no-such-set", "--nodes", "2", "--out", "x"],
    ],
)
def test_bad_command_lines_exit_2_in_our_style(args: list[str]) -> None:
    r = run(*args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Error:" not in r.output and "Usage:" not in r.stderr


def test_command_errors_exit_1_in_our_style(tmp_path: Path) -> None:
    r = run("pack", str(tmp_path))  # not a taskpack: a list of problems
    assert r.exit_code == 1
    first, *rest = r.stderr.strip().splitlines()
    assert first == "error: invalid manifest:" and rest and rest[0].startswith("  ")
    r = run("simulate", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "no such file" in r.stderr


@pytest.mark.parametrize("args", [[], ["datasets"], ["policy"]])
def test_a_bare_group_prints_its_help_not_an_error(args: list[str]) -> None:
    r = run(*args)
    assert r.exit_code == 2  # click's convention for "no command given"
    assert r.stderr.startswith("Usage: ") and "Commands:" in r.stderr
    assert "error:" not in r.stderr
