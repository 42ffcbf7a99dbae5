"""Commands that run a node or talk to one: node, peers, publish, taskpacks, tasks, trace,
wait, result. Everything but `node` goes through `p2pfl.Client` (the control socket)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from p2pfl.cli.main import fail
from p2pfl.client import DATA_DIR_ENV, Client, event_failed, event_succeeded
from p2pfl.core.messages import LABEL_RE
from p2pfl.fsutil import atomic_write

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def data_dir_option(f: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get(DATA_DIR_ENV) or str(Path("~/.p2pfl").expanduser()),
        show_default=f"${DATA_DIR_ENV} or ~/.p2pfl",
        help="The node's data directory (its control socket is DATA_DIR/control.sock).",
    )(f)


def json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")(f)


def rollout_option(f: Any) -> Any:
    return click.option(
        "--rollout",
        default="",
        metavar="V1=F1,V2=F2",
        help="Run versions of the taskpack side by side, each on that fraction of the "
        "participants (e.g. 1.0.0=0.8,1.1.0=0.2; fractions sum to 1).",
    )(f)


def check_rollout(text: str) -> None:
    """A malformed --rollout is refused here, before the node is asked."""
    if not text:
        return
    from p2pfl.core.versions import parse_rollout

    try:
        parse_rollout(text)
    except ValueError as exc:
        why = str(exc).removeprefix("--rollout: ")
        raise click.BadParameter(why, param_hint="--rollout") from None


def wide_option(f: Any) -> Any:
    return click.option(
        "--wide", is_flag=True, help="Show every value in full (ids, cids), however wide."
    )(f)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


def run_options(f: Any) -> Any:
    from p2pfl.cli.runs_cmds import run_options as options

    return options(f)


def run_params(test_run: int | None, new_data_only: bool, rerun_failed: bool) -> dict[str, str]:
    from p2pfl.cli.runs_cmds import run_params as params

    return params(test_run, new_data_only, rerun_failed)


def client(data_dir: Path) -> Client:
    return Client(data_dir.expanduser())


# ---------------------------------------------------------------------------------------------
# p2pfl node


def parse_dataset(text: str) -> tuple[str, Path]:
    """NAME=PATH, with a name of letters, digits, '_', '.', '-' and an existing file."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"{text!r} is not NAME=PATH", param_hint="--dataset")
    if not _NAME_RE.match(name):
        raise click.BadParameter(
            f"dataset name {name!r} must be letters, digits, '_', '.', '-'", param_hint="--dataset"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise click.BadParameter(f"dataset {name}: no such file {path}", param_hint="--dataset")
    return name, p.resolve()


def parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not _PARAM_RE.match(key):
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--param")
    return key, value


def check_multiaddr(text: str, option: str) -> str:
    from multiaddr import Multiaddr

    try:
        Multiaddr(text)
    except Exception as exc:
        raise click.BadParameter(
            f"{text!r} is not a multiaddr ({exc})", param_hint=option
        ) from None
    return text


def check_announce(text: str) -> str:
    check_multiaddr(text, "--announce")
    parts = text.split("/")
    if len(parts) > 2 and parts[2] in ("0.0.0.0", "::"):
        raise click.BadParameter(
            f"{text!r}: {parts[2]} is not an address a peer can dial", param_hint="--announce"
        )
    return text


def check_relay(text: str) -> str:
    check_multiaddr(text, "--relay-via")
    if "/p2p/" not in text or "/p2p-circuit" in text:
        raise click.BadParameter(
            f"{text!r} must be the relay's address ending in /p2p/PEER_ID",
            param_hint="--relay-via",
        )
    return text


def parse_bulk_port(text: str) -> int | None:
    """'off' -> None (no bulk listener); else a port number, 0 meaning any free port."""
    if text.strip().lower() == "off":
        return None
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise click.BadParameter(
            f"{text!r} is neither a port (0-65535) nor 'off'", param_hint="--bulk-port"
        )
    return port


def check_peer_id(text: str) -> str:
    from p2pfl.identity import public_bytes_from_peer_id

    if public_bytes_from_peer_id(text) is None:
        raise click.BadParameter(
            f"{text!r} is not an Ed25519 peer id (12D3KooW...)", param_hint="--trust"
        )
    return text


@click.command("node")
@data_dir_option
@click.option(
    "--listen",
    multiple=True,
    metavar="MULTIADDR",
    help="Address to listen on (repeatable) [default: /ip4/127.0.0.1/tcp/0].",
)
@click.option(
    "--announce",
    multiple=True,
    metavar="MULTIADDR",
    help="Advertise this address instead of the listen addresses (repeatable): what peers"
    " elsewhere can dial, e.g. a NAT's public address [default: the listen addresses, a"
    " 0.0.0.0 one as each interface's address].",
)
@click.option(
    "--bulk-port",
    default="0",
    show_default=True,
    metavar="PORT|off",
    help="TCP port of the fast blob path (a second listener on the first /ip4 listen"
    " address): 0 picks a free one; set and open it behind a firewall, or 'off' to move"
    " blobs over the main connection (slower).",
)
@click.option(
    "--bootstrap",
    multiple=True,
    metavar="MULTIADDR",
    help="A peer to join through, with its /p2p/PEER_ID (repeatable).",
)
@click.option(
    "--relay-via",
    multiple=True,
    metavar="MULTIADDR",
    help="Behind a NAT: a relay (a node run with --relay-service, with its /p2p/PEER_ID)"
    " to reserve a slot at; peers that cannot dial this node reach it through the relay"
    " (repeatable).",
)
@click.option(
    "--relay-service",
    is_flag=True,
    help="Relay connections for nodes behind NATs (circuit relay v2; bounded per circuit).",
)
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    metavar="NAME=PATH",
    help="A local dataset (csv / npz) offered to tasks (repeatable).",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="A site label, e.g. region=eu: hierarchical tasks may group nodes by it (repeatable).",
)
@click.option(
    "--trust",
    multiple=True,
    metavar="PEER_ID",
    help="A publisher whose taskpacks this node runs (repeatable).",
)
@click.option(
    "--trust-any", is_flag=True, help="Run ANYONE's taskpacks (development only: arbitrary code!)."
)
@click.option(
    "--allow-any-requester",
    is_flag=True,
    help="Let ANY peer use datasets the site policy does not name (development only!).",
)
@click.option(
    "--unsafe-no-sandbox",
    is_flag=True,
    help="Run taskpack code WITHOUT the bubblewrap sandbox (it can read the node's key).",
)
@click.option(
    "--min-records",
    type=click.IntRange(min=1),
    default=None,
    help="Never release an aggregate over fewer records (k) [default: 10].",
)
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
)
def node_cmd(
    data_dir: Path,
    listen: tuple[str, ...],
    announce: tuple[str, ...],
    bulk_port: str,
    bootstrap: tuple[str, ...],
    relay_via: tuple[str, ...],
    relay_service: bool,
    datasets: tuple[str, ...],
    labels: tuple[str, ...],
    trust: tuple[str, ...],
    trust_any: bool,
    allow_any_requester: bool,
    unsafe_no_sandbox: bool,
    min_records: int | None,
    log_level: str,
) -> None:
    """Run a node until Ctrl-C (or SIGTERM).

    Other commands on this machine reach it through DATA_DIR/control.sock.
    """
    from p2pfl.config import DEFAULT_LISTEN, NodeConfig

    ds: dict[str, Path] = {}
    for text in datasets:
        name, path = parse_dataset(text)
        if name in ds:
            raise click.BadParameter(f"dataset {name!r} given twice", param_hint="--dataset")
        ds[name] = path
    site_labels: dict[str, str] = {}
    for text in labels:
        key, sep, value = text.partition("=")
        if not sep or not LABEL_RE.fullmatch(key) or not LABEL_RE.fullmatch(value):
            raise click.BadParameter(
                f"{text!r} is not KEY=VALUE of 1-64 letters, digits, '.', '_', '-'",
                param_hint="--label",
            )
        site_labels[key] = value
    config = NodeConfig(
        data_dir=data_dir.expanduser().resolve(),
        labels=site_labels,
        listen=[check_multiaddr(a, "--listen") for a in listen] or [DEFAULT_LISTEN],
        bootstrap=[check_multiaddr(a, "--bootstrap") for a in bootstrap],
        announce=[check_announce(a) for a in announce],
        relay_via=[check_relay(a) for a in relay_via],
        relay_service=relay_service,
        bulk_port=parse_bulk_port(bulk_port),
        datasets=ds,
        trusted=frozenset(check_peer_id(p) for p in trust),
        trust_any=trust_any,
        allow_any_requester=allow_any_requester,
        unsafe_no_sandbox=unsafe_no_sandbox,
        log_level=log_level.lower(),
    )
    if min_records is not None:
        config.min_records = min_records
    if trust_any:
        click.secho(
            "WARNING: --trust-any: this node will run code from ANY publisher on the network.\n"
            "WARNING: use it only on a private test network, never with real data.",
            fg="red",
            bold=True,
            err=True,
        )
    if allow_any_requester:
        click.secho(
            "WARNING: --allow-any-requester: ANY peer may run tasks on datasets that\n"
            "WARNING: DATA_DIR/policy.yaml does not name. Never use it with real data.",
            fg="red",
            bold=True,
            err=True,
        )
    if unsafe_no_sandbox:
        click.secho(
            "WARNING: --unsafe-no-sandbox: taskpack code runs WITHOUT bubblewrap: it can read "
            "this node's key,\nWARNING: its datasets and $HOME, and reach the network. "
            "Never beside real data.",
            fg="red",
            bold=True,
            err=True,
        )
    import trio

    try:
        from p2pfl.node import run_node
    except ImportError as exc:
        fail(f"cannot start a node: {exc}")
    trio.run(run_node, config)


# ---------------------------------------------------------------------------------------------
# Commands that talk to a running node


@click.command("peers")
@data_dir_option
@json_option
@wide_option
def peers_cmd(data_dir: Path, as_json: bool, wide: bool) -> None:
    """List this node and the peers it knows, with their capabilities."""
    c = client(data_dir)
    info, peers = c.info(), c.peers()
    if as_json:
        emit_json(
            {
                "self": {
                    "peer_id": info["peer_id"],
                    "addrs": list(info.get("addrs") or []),
                    "datasets": list(info.get("datasets") or []),
                },
                "peers": [
                    {
                        "peer_id": p["peer_id"],
                        "addrs": list(p.get("addrs") or []),
                        # the peer's signed capability record; null until one arrived
                        "capabilities": p.get("capabilities"),
                    }
                    for p in peers
                ],
            }
        )
        return
    from p2pfl.cli import render

    render.print_table(render.peers_table(info, peers, wide=wide), wide=wide)


@click.command("publish")
@click.argument(
    "taskpack_dir", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@data_dir_option
@click.option("--run", is_flag=True, help="Also offer a task that runs it.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A task parameter (repeatable; with --run).",
)
@rollout_option
@run_options
@json_option
def publish_cmd(
    taskpack_dir: Path,
    data_dir: Path,
    run: bool,
    params: tuple[str, ...],
    rollout: str,
    test_run: int | None,
    new_data_only: bool,
    rerun_failed: bool,
    as_json: bool,
) -> None:
    """Pack, sign and announce the taskpack in DIR; with --run, also run it."""
    parsed = dict(parse_param(p) for p in params)
    parsed.update(run_params(test_run, new_data_only, rerun_failed))
    if parsed and not run:
        raise click.BadParameter("parameters only make sense with --run", param_hint="--param")
    if rollout and not run:
        raise click.BadParameter("a rollout only makes sense with --run", param_hint="--rollout")
    check_rollout(rollout)
    out = client(data_dir).publish(taskpack_dir, run=run, params=parsed, rollout=rollout)
    if as_json:
        keys = ["cid", "name", "version", "publisher"] + (["task_id"] if run else [])
        keys += ["rollout"] if rollout else []
        emit_json({k: out.get(k) for k in keys})
        return
    click.echo(f"published {out.get('name')}@{out.get('version')}")
    click.echo(f"  cid        {out.get('cid')}")
    click.echo(f"  publisher  {out.get('publisher')}")
    if run:
        click.echo(f"  task       {out.get('task_id')}")
        for arm in out.get("rollout") or []:
            click.echo(f"  version    {arm['version']} on {arm['share'] / 100:g}% of nodes")
        click.echo(f"follow it with: p2pfl trace {out.get('task_id')} --data-dir {data_dir}")


@click.command("taskpacks")
@data_dir_option
@click.option(
    "--versions",
    "by_name",
    is_flag=True,
    help="One entry per name with its versions side by side (newest first, model schemas).",
)
@json_option
@wide_option
def taskpacks_cmd(data_dir: Path, by_name: bool, as_json: bool, wide: bool) -> None:
    """List the taskpacks this node knows, and whether it verified or rejected them."""
    from p2pfl.core.versions import versions_by_name

    packs = client(data_dir).taskpacks()
    if by_name:
        grouped = versions_by_name(packs)
        if as_json:
            emit_json(grouped)
            return
    elif as_json:
        emit_json(packs)
        return
    if not packs:
        click.echo("no taskpacks yet")
        return
    from p2pfl.cli import render

    if by_name:
        render.print_table(render.versions_table(grouped, wide=wide), wide=wide)
        return
    render.print_table(render.taskpacks_table(packs, wide=wide), wide=wide)


@click.command("tasks")
@data_dir_option
@json_option
@wide_option
def tasks_cmd(data_dir: Path, as_json: bool, wide: bool) -> None:
    """List the tasks this node knows."""
    tasks = client(data_dir).tasks()
    if as_json:
        emit_json(tasks)
        return
    if not tasks:
        click.echo("no tasks yet")
        return
    from p2pfl.cli import render

    render.print_table(render.tasks_table(tasks, wide=wide), wide=wide)


@click.command("cancel")
@click.argument("task_id")
@click.option("--reason", default="", help="Why (shown to every participant).")
@data_dir_option
@json_option
def cancel_cmd(task_id: str, reason: str, data_dir: Path, as_json: bool) -> None:
    """End a task this node published, for every participant."""
    task = client(data_dir).cancel(task_id, reason)
    if as_json:
        emit_json(task)
        return
    click.echo(f"task {task['task_id']} cancelled: {task.get('reason') or reason}")


@click.command("withdraw")
@click.argument("task_id")
@data_dir_option
@json_option
def withdraw_cmd(task_id: str, data_dir: Path, as_json: bool) -> None:
    """Take this node out of a task (the others go on without it)."""
    task = client(data_dir).withdraw(task_id)
    if as_json:
        emit_json(task)
        return
    click.echo(f"withdrew from task {task['task_id']}")


@click.command("trace")
@click.argument("task_id", metavar="TASK")
@data_dir_option
@json_option
def trace_cmd(task_id: str, data_dir: Path, as_json: bool) -> None:
    """Follow TASK (or a flow, as its tree) live until it ends (exit 0 on success, 1 on
    failure).

    TASK may be a unique prefix of the task or flow id.
    """
    c = client(data_dir)
    if c.is_flow(task_id):
        from p2pfl.cli.flow_cmds import trace_flow

        sys.exit(0 if trace_flow(c, task_id, as_json) else 1)
    last: dict[str, Any] | None = None
    if as_json:
        for event in c.events(task_id):
            last = event
            click.echo(json.dumps(event, default=str))
            sys.stdout.flush()
    else:
        last = _trace_live(c, task_id)
    ok = last is not None and event_succeeded(last)
    if not ok and not as_json:
        if last is not None and event_failed(last):
            reason = (last.get("task") or {}).get("reason") or last.get("message") or "?"
            click.echo(f"error: task {task_id} failed: {reason}", err=True)
        else:
            click.echo(f"error: the node stopped streaming before task {task_id} ended", err=True)
    sys.exit(0 if ok else 1)


def _trace_live(c: Client, task_id: str) -> dict[str, Any] | None:
    """A tree redrawn per event on a terminal; plain event lines (and the tree) otherwise."""
    from p2pfl.cli import render

    con = render.console()
    logs: list[str] = []
    last: dict[str, Any] | None = None
    if not con.is_terminal:
        for event in c.events(task_id):
            last = event
            con.print(render.event_line(event), markup=False)
        if last is not None:
            con.print(render.task_tree(last.get("task") or {}))
        return last
    from rich.live import Live

    task = c.task(task_id)
    with Live(render.task_tree(task), console=con, refresh_per_second=8) as live:
        for event in c.events(task_id):
            last = event
            logs = (logs + [render.event_line(event)])[-12:]
            live.update(render.task_tree(event.get("task") or task, logs))
    return last


@click.command("wait")
@click.argument("task_id", metavar="TASK")
@data_dir_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="S",
    help="Give up after S seconds (exit 2).",
)
@json_option
def wait_cmd(task_id: str, data_dir: Path, timeout: float | None, as_json: bool) -> None:
    """Wait for TASK to end: exit 0 on success, 1 on failure, 2 on timeout.

    With --json, prints the result (or {"task_id", "status", "reason"} when it did not succeed).
    """
    from p2pfl.errors import TaskFailed

    c = client(data_dir)
    try:
        with _Progress(as_json) as on_event:
            result = c.wait(task_id, timeout=timeout, on_event=on_event)
    except TaskFailed as exc:
        _wait_end(as_json, task_id, "failed", str(exc), 1)
    except TimeoutError as exc:
        _wait_end(as_json, task_id, "timeout", str(exc), 2)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"task {result.get('task_id', task_id)} {result.get('status', 'succeeded')}")


def _wait_end(as_json: bool, task_id: str, status: str, reason: str, code: int) -> None:
    if as_json:
        emit_json({"task_id": task_id, "status": status, "reason": reason})
    click.echo(f"error: {reason}", err=True)
    sys.exit(code)


class _Progress:
    """A spinner with the task's round on a terminal; nothing otherwise."""

    def __init__(self, quiet: bool) -> None:
        from p2pfl.cli import render

        self.con = render.console(stderr=True)
        self.status: Any = None
        self.enabled = not quiet and self.con.is_terminal

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        self.status = self.con.status("waiting for the task...")
        self.status.__enter__()
        return self.on_event

    def on_event(self, event: dict[str, Any]) -> None:
        flow = event.get("flow")
        if flow is not None:  # a flow's snapshot: steps done / all
            done = sum(s["state"] == "succeeded" for s in flow["steps"])
            self.status.update(
                f"flow {flow['name']} {flow['status']}: {done}/{len(flow['steps'])} steps"
            )
            return
        t = event.get("task") or {}
        self.status.update(
            f"task {t.get('task_id', '?')} {t.get('status', '?')} "
            f"round {t.get('round', 0)}/{t.get('rounds', '?')}: {event.get('message', '')}"
        )

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)


@click.command("result")
@click.argument("task_id", metavar="TASK")
@data_dir_option
@json_option
@click.option(
    "--model-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Write the final model (its blob) to FILE.",
)
def result_cmd(task_id: str, data_dir: Path, as_json: bool, model_out: Path | None) -> None:
    """Print TASK's result (exit 1 if it has not finished or failed)."""
    c = client(data_dir)
    result = c.get_result(task_id)
    if model_out is not None:
        cid = result.get("model_cid")
        if not cid:
            fail(f"task {task_id} produced no model (model_cid is empty)")
        write_atomic(model_out, c.read_blob(str(cid)))
    if as_json:
        emit_json(result)
        return
    from p2pfl.cli import render

    render.console().print(render.result_view(result))
    if model_out is not None:
        click.echo(f"model written to {model_out}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write the file so it is whole or absent (a model is not a secret: mode 0644)."""
    atomic_write(path.expanduser(), data)
