"""`p2pfl flow`: run a multi-step flow, follow it as one tree, resume it, read its result."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from p2pfl.cli.node_cmds import client, data_dir_option, emit_json, json_option, parse_param


@click.group("flow")
def flow_group() -> None:
    """Flows: workflows of taskpack steps (flows/*.yaml), started once, followed as a tree."""


def _problems(exc: Any) -> None:
    click.echo(f"error: {str(exc).splitlines()[0]}", err=True)
    for problem in getattr(exc, "problems", []):
        click.echo(f"  {problem}", err=True)
    sys.exit(1)


@flow_group.command("check")
@click.argument("flow_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--param", "params", multiple=True, metavar="STEP.KEY=VALUE")
@json_option
def check_cmd(flow_file: Path, params: tuple[str, ...], as_json: bool) -> None:
    """Check FLOW_FILE and its steps' taskpacks without a node (every problem by path)."""
    from p2pfl.errors import ValidationError
    from p2pfl.flow.spec import apply_overrides, load_flow, resolve_flow

    try:
        spec = apply_overrides(load_flow(flow_file), dict(parse_param(p) for p in params))
        resolved = resolve_flow(spec)
    except ValidationError as exc:
        if as_json:
            emit_json({"ok": False, "problems": exc.problems})
            sys.exit(1)
        _problems(exc)
    steps: list[dict[str, Any]] = [
        {"name": r.step.name, "taskpack": str(r.directory), "type": r.type, "input": list(r.step.inputs),
         "output": r.step.output or None, "model": r.step.model or None}
        for r in resolved
    ]  # fmt: skip
    if as_json:
        emit_json({"ok": True, "name": spec.name, "steps": steps})
        return
    click.echo(f"flow {spec.name}: {len(steps)} steps, valid")
    for s in steps:
        extra = "".join(f" {k}={s[k]}" for k in ("output", "model") if s[k])
        click.echo(
            f"  {s['name']}: {s['type']} {s['taskpack']} input={','.join(s['input'])}{extra}"
        )


@flow_group.command("run")
@click.argument("flow_file", type=click.Path(dir_okay=False, path_type=Path))
@data_dir_option
@click.option(
    "--param", "params", multiple=True, metavar="STEP.KEY=VALUE",
    help="Override a step's parameter, e.g. --param train.rounds=5 (repeatable).",
)  # fmt: skip
@json_option
def run_cmd(flow_file: Path, data_dir: Path, params: tuple[str, ...], as_json: bool) -> None:
    """Publish every step's taskpack and start FLOW_FILE on the node; prints the flow id."""
    from p2pfl.errors import ValidationError

    overrides = dict(parse_param(p) for p in params)
    try:
        flow_id = client(data_dir).create_flow(flow_file, overrides)
    except ValidationError as exc:
        if as_json:
            emit_json({"ok": False, "problems": exc.problems})
            sys.exit(1)
        _problems(exc)
    if as_json:
        emit_json({"flow_id": flow_id})
        return
    click.echo(flow_id)
    click.echo(f"follow it with: p2pfl trace {flow_id} --data-dir {data_dir}", err=True)


@flow_group.command("list")
@data_dir_option
@json_option
def list_cmd(data_dir: Path, as_json: bool) -> None:
    """The flows this node started or follows."""
    flows = client(data_dir).flows()
    if as_json:
        emit_json(flows)
        return
    if not flows:
        click.echo("no flows")
        return
    for f in flows:
        click.echo(
            f"{f['flow_id']}  {f['name']:<20} {f['status']:<10} {f['done']}/{f['steps']} steps"
        )


@flow_group.command("status")
@click.argument("flow_id", metavar="FLOW")
@data_dir_option
@json_option
def status_cmd(flow_id: str, data_dir: Path, as_json: bool) -> None:
    """FLOW as one tree: each step's state and %, per-node progress (FLOW may be a prefix)."""
    from p2pfl.flow.render import flow_tree

    status = client(data_dir).flow(flow_id)
    if as_json:
        emit_json(status)
        return
    from p2pfl.cli import render

    render.console().print(flow_tree(status))


@flow_group.command("resume")
@click.argument("flow_id", metavar="FLOW")
@data_dir_option
@json_option
def resume_cmd(flow_id: str, data_dir: Path, as_json: bool) -> None:
    """Retry a failed FLOW from its failed step (finished steps are not redone)."""
    status = client(data_dir).resume_flow(flow_id)
    if as_json:
        emit_json(status)
        return
    step = next((s for s in status["steps"] if s["state"] == "running"), None)
    where = f"step {step['name']} (task {step['task_id']})" if step else "the failed step"
    click.echo(f"flow {status['flow_id']}: resumed at {where}")


@flow_group.command("result")
@click.argument("flow_id", metavar="FLOW")
@data_dir_option
@json_option
def result_cmd(flow_id: str, data_dir: Path, as_json: bool) -> None:
    """Every step's signed result of a finished FLOW (exit 1 if it failed or still runs)."""
    from p2pfl.errors import TaskFailed, TaskNotFinished

    try:
        result = client(data_dir).call("flow_result", flow_id=flow_id)
    except (TaskFailed, TaskNotFinished) as exc:
        if as_json:
            emit_json(
                {
                    "flow_id": flow_id,
                    "status": "failed" if isinstance(exc, TaskFailed) else "running",
                    "reason": str(exc),
                }
            )
        else:
            click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        emit_json(result)
        return
    click.echo(f"flow {result['flow_id']} ({result['name']}): {result['status']}")
    for name, step in result["steps"].items():
        if step is None:
            click.echo(f"  {name}: -")
            continue
        metrics = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted((step.get("metrics") or {}).items())
            if isinstance(v, int | float)
        )
        model = f" model {step['model_cid']}" if step.get("model_cid") else ""
        click.echo(
            f"  {name}: {step['status']} task {step['task_id']}{model}"
            + (f"  {metrics}" if metrics else "")
        )


def trace_flow(c: Any, flow_id: str, as_json: bool) -> bool:
    """`p2pfl trace FLOW`: the live tree (redrawn per change on a terminal)."""
    import json as _json

    from p2pfl.cli import render
    from p2pfl.flow.render import flow_tree, flow_tree_text

    last: dict[str, Any] | None = None
    con = render.console()
    if as_json or not con.is_terminal:
        for event in c.flow_events(flow_id):
            last = event
            click.echo(
                _json.dumps(event, default=str) if as_json else flow_tree_text(event["flow"]) + "\n"
            )
            sys.stdout.flush()
    else:
        from rich.live import Live

        with Live(flow_tree(c.flow(flow_id)), console=con, refresh_per_second=8) as live:
            for event in c.flow_events(flow_id):
                last = event
                live.update(flow_tree(event["flow"]))
    ok = last is not None and last["flow"]["status"] == "succeeded"
    if not ok and not as_json:
        reason = last["flow"]["reason"] if last else "the node stopped streaming"
        click.echo(f"error: flow {flow_id} did not succeed: {reason}", err=True)
    return ok
