"""How a task runs on each node (test runs, new data only, failed records again), and what
batched runs leave on a node: `p2pfl reports`, and the per-node view of `p2pfl datasets`.

The run options become `run.*` entries of the task's parameters, which the node turns into
the signed offer's `run` field (p2pfl.driver.parse_run_options): every node enforces them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--test-run [N], --new-data-only, --force-rerun-failed."""
    f = click.option(
        "--force-rerun-failed",
        "rerun_failed",
        is_flag=True,
        help="Run only the records that failed in earlier runs of this taskpack (batched).",
    )(f)
    f = click.option(
        "--new-data-only",
        is_flag=True,
        help="Each node runs only records it has not processed with this taskpack (batched).",
    )(f)
    return click.option(
        "--test-run",
        type=click.IntRange(min=1),
        is_flag=False,
        flag_value=10,
        default=None,
        metavar="[N]",
        help="Run end to end on at most N records per node (default 10); the result is "
        "marked as a test run.",
    )(f)


def emit_json(obj: Any) -> None:
    # As node_cmds.emit_json (not imported: node_cmds imports this module's decorators).
    click.echo(json.dumps(obj, default=str))


def run_params(test_run: int | None, new_data_only: bool, rerun_failed: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    if test_run is not None:
        out["run.test_run"] = str(test_run)
    if new_data_only:
        out["run.new_data_only"] = "true"
    if rerun_failed:
        out["run.rerun_failed"] = "true"
    return out


def _data_dir(data_dir: Path) -> Path:
    path = data_dir.expanduser()
    if not path.is_dir():
        raise click.ClickException(f"{path} is not a node's data directory")
    return path


@click.command("reports")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The node's data directory.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def reports_cmd(data_dir: Path, as_json: bool) -> None:
    """List the inference reports this node wrote (they never leave it), with their paths."""
    from p2pfl.store.local_runs import list_reports

    reports = list_reports(_data_dir(data_dir))
    if as_json:
        emit_json(reports)
        return
    if not reports:
        click.echo("no reports yet")
        return
    for r in reports:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(r.get("created", 0))))
        test = "  TEST RUN" if r.get("test_run") else ""
        failed = len(r.get("failed") or {})
        click.echo(
            f"{str(r.get('task_id', ''))[:12]}  {when}  {r.get('taskpack', '?')} on "
            f"{r.get('dataset', '?')}: {r.get('rows', 0)} records, {failed} failed{test}"
        )
        click.echo(f"  {r['path']}")


def datasets_view(data_dir: Path, as_json: bool) -> None:
    """`p2pfl datasets --data-dir D`: per taskpack and dataset, what this node processed."""
    from p2pfl.store.local_runs import RecordsError, RecordsLedger

    try:
        rows = RecordsLedger(_data_dir(data_dir)).view()
    except RecordsError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no batched runs on this node yet")
        return
    click.echo(f"{'taskpack':<24} {'dataset':<16} {'processed':>9} {'failed':>6} {'runs':>4}")
    for r in rows:
        click.echo(
            f"{r['taskpack'][:24]:<24} {r['dataset'][:16]:<16} {r['processed']:>9,} "
            f"{r['failed']:>6,} {r['runs']:>4}"
        )
        for key, why in r["failures"].items():
            click.echo(f"    failed {key[:30]}: {why[:40]}")
