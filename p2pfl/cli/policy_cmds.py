"""Commands about what a site allows and what left it: policy show/reload/check, audit, and
`run` (a task on a taskpack the node verified, whoever published it). All go through
`p2pfl.Client`; output is plain text readable at 80 columns, or JSON with --json."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import click

from p2pfl.cli.node_cmds import (
    check_rollout,
    client,
    data_dir_option,
    emit_json,
    json_option,
    parse_param,
    rollout_option,
    run_options,
    run_params,
)
from p2pfl.client import short_id

# ---------------------------------------------------------------------------------------------
# p2pfl run


@click.command("run")
@click.argument("ref", metavar="NAME[@RANGE]|CID")
@data_dir_option
@click.option(
    "--param", "params", multiple=True, metavar="KEY=VALUE", help="A task parameter (repeatable)."
)
@rollout_option
@run_options
@json_option
def run_cmd(
    ref: str,
    data_dir: Path,
    params: tuple[str, ...],
    test_run: int | None,
    new_data_only: bool,
    rerun_failed: bool,
    rollout: str,
    as_json: bool,
) -> None:
    """Offer a task on a taskpack this node already verified (by name, name@range such
    as federated-stats@^1, or cid), whoever published it. With --rollout, several
    verified versions of that name run side by side.

    The offer is signed by this node: other sites' policies judge it as this node's request.
    To publish a taskpack directory and run it, use `p2pfl publish DIR --run`.
    """
    parsed = dict(parse_param(p) for p in params)
    parsed.update(run_params(test_run, new_data_only, rerun_failed))
    check_rollout(rollout)
    task_id = client(data_dir).run(ref, parsed, rollout)
    if as_json:
        emit_json({"task_id": task_id, "ref": ref})
        return
    click.echo(f"task {task_id} offered ({ref})")
    click.echo(f"follow it with: p2pfl trace {task_id} --data-dir {data_dir}")


# ---------------------------------------------------------------------------------------------
# p2pfl policy show | reload | check


@click.group("policy")
def policy_group() -> None:
    """The site policy (DATA_DIR/policy.yaml): who may use which dataset for what."""


@policy_group.command("show")
@data_dir_option
@json_option
def policy_show_cmd(data_dir: Path, as_json: bool) -> None:
    """Print the effective policy (defaults filled in) and the privacy budget spent."""
    out = client(data_dir).policy_show()
    if as_json:
        emit_json(out)
        return
    for line in policy_lines(out.get("policy") or {}, out.get("ledger") or {}):
        click.echo(line)


@policy_group.command("reload")
@data_dir_option
@json_option
def policy_reload_cmd(data_dir: Path, as_json: bool) -> None:
    """Re-read DATA_DIR/policy.yaml (as SIGHUP does). An invalid file is refused with every
    problem listed, and the node keeps its current policy."""
    from p2pfl.errors import ValidationError

    try:
        out = client(data_dir).policy_reload()
    except ValidationError as exc:
        if as_json:
            emit_json({"ok": False, "problems": exc.problems})
        click.echo("error: policy not reloaded (the node keeps its current policy):", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        raise SystemExit(1) from None
    if as_json:
        emit_json({"ok": True, **out})
        return
    state = "changed" if out.get("changed") else "unchanged"
    click.echo(f"policy reloaded ({state}), digest {str(out.get('digest'))[:16]}")


@policy_group.command("check")
@click.argument("task_id", metavar="TASK")
@data_dir_option
@json_option
def policy_check_cmd(task_id: str, data_dir: Path, as_json: bool) -> None:
    """Explain the node's policy decision on TASK (a task it has seen; a unique prefix)."""
    d = client(data_dir).policy_check(task_id)
    if as_json:
        emit_json(d)
        return
    verdict = "allowed" if d.get("allowed") else "declined"
    click.echo(f"task {d.get('task_id', task_id)}: {verdict} (rule {d.get('rule', '?')})")
    click.echo(f"  {d.get('reason', '')}")
    if d.get("allowed"):
        for label, value in _terms(d):
            click.echo(f"  {label:<12}{value}")


def _terms(d: dict[str, Any]) -> list[tuple[str, str]]:
    eps = d.get("dp_epsilon")
    rows = [
        ("datasets", ", ".join(d.get("datasets") or []) or "-"),
        ("k", str(d.get("k", "-"))),
        ("dp", "off" if eps is None else f"epsilon {eps:g}, delta {d.get('dp_delta')}"),
        ("limits", _limits(d)),
        ("extremes", "allow" if d.get("extremes") else "deny"),
        ("metrics", str(d.get("metrics", "-"))),
    ]
    return rows


def _limits(d: dict[str, Any]) -> str:
    parts = []
    if d.get("max_rounds") is not None:
        parts.append(f"rounds <= {d['max_rounds']}")
    if d.get("max_wall_s") is not None:
        parts.append(f"wall <= {d['max_wall_s']:g} s")
    if d.get("memory_bytes") is not None:
        parts.append(f"memory <= {d['memory_bytes'] / 2**20:.0f} MiB")
    if d.get("concurrent_tasks") is not None:
        parts.append(f"{d['concurrent_tasks']} concurrent")
    return ", ".join(parts) or "none"


def policy_lines(policy: dict[str, Any], ledger: dict[str, Any]) -> list[str]:
    """The policy as short lines (peer ids shortened), one block per dataset."""
    lines = [
        f"policy {policy.get('source') or '(no policy.yaml: safe defaults)'}",
        f"  digest {str(policy.get('digest', ''))[:16]}",
    ]
    if policy.get("allow_any_requester"):
        lines.append("  WARNING: --allow-any-requester: unlisted datasets are open to ANY peer")
    groups = policy.get("requesters") or {}
    if groups:
        lines.append("requesters")
        for name, peers in groups.items():
            lines.append(f"  {name:<12}{', '.join(short_id(p) for p in peers) or '-'}")
    for name, rules in (policy.get("datasets") or {}).items():
        lines.append(f"dataset {name}")
        lines += _rule_lines(rules, ledger.get(name))
    lines.append("defaults (datasets the policy does not name)")
    lines += _rule_lines(policy.get("defaults") or {}, None)
    return lines


def _rule_lines(r: dict[str, Any], spent: dict[str, Any] | None) -> list[str]:
    def short(who: str) -> str:
        return short_id(who) if who.startswith("12D3KooW") else who

    def any_(v: Any) -> str:
        return "any" if v is None else ", ".join(short(str(x)) for x in v) or "none"

    packs = r.get("taskpacks")
    packs_text = (
        "any (trusted publishers)"
        if packs is None
        else ", ".join(short(p.split("/", 1)[0]) + "/" + p.split("/", 1)[-1] for p in packs)
    )
    dp = r.get("dp") or {}
    dp_parts = ["required" if dp.get("required") else "optional"]
    if dp.get("max_epsilon_per_task") is not None:
        dp_parts.append(f"epsilon <= {dp['max_epsilon_per_task']:g} per task")
    if dp.get("budget") is not None:
        used = float((spent or {}).get("spent", 0.0))
        left = max(dp["budget"] - used, 0.0)
        dp_parts.append(f"budget {dp['budget']:g} (spent {used:g}, left {left:g})")
    elif spent:
        dp_parts.append(f"spent {float(spent.get('spent', 0.0)):g}")
    if dp.get("delta") is not None:
        dp_parts.append(f"delta <= {dp['delta']:g}")
    lim = r.get("limits") or {}
    lim_parts = [
        f"{label} {lim[key]}"
        for key, label in (
            ("max_rounds", "rounds <="),
            ("max_wall_s", "wall s <="),
            ("memory", "memory"),
            ("concurrent_tasks", "concurrent"),
        )
        if lim.get(key) is not None
    ]
    return [
        f"  {'allow':<12}{any_(r.get('allow'))}",
        f"  {'taskpacks':<12}{packs_text}",
        f"  {'types':<12}{any_(r.get('types'))}",
        f"  {'k':<12}{r.get('k')}",
        f"  {'dp':<12}{', '.join(dp_parts)}",
        f"  {'limits':<12}{', '.join(lim_parts) or 'none'}",
        f"  {'advertise':<12}row count {(r.get('advertise') or {}).get('count', '?')}",
        f"  {'extremes':<12}{r.get('extremes', 'deny')}",
        f"  {'metrics':<12}{r.get('metrics', '?')}",
    ] + [
        f"  {'usage':<12}{short(u['requester'])} with {u['taskpack']}: "
        + ", ".join(
            f"<= {u[key]:,} {what}"
            for key, what in (("max_runs", "runs"), ("max_records", "records"))
            if u.get(key) is not None
        )
        + f" per {u['period']}"
        for u in r.get("usage") or []
    ]


# ---------------------------------------------------------------------------------------------
# p2pfl audit


@click.command("audit")
@data_dir_option
@click.option("--task", default=None, metavar="TASK", help="Only this task's entries.")
@json_option
def audit_cmd(data_dir: Path, task: str | None, as_json: bool) -> None:
    """Read the node's audit log: offers and decisions, releases, policy changes."""
    entries = client(data_dir).audit(task)
    if as_json:
        emit_json(entries)
        return
    if not entries:
        click.echo("no audit entries" + (f" for task {task}" if task else ""))
        return
    for e in entries:
        click.echo(audit_line(e))


def audit_line(e: dict[str, Any]) -> str:
    t = e.get("t")
    stamp = (
        time.strftime("%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "-"
    )
    kind = str(e.get("kind", "?"))
    task = str(e.get("task") or "")[:8]
    if kind == "offer":
        detail = f"{e.get('decision')} {e.get('rule')}: {e.get('reason')}"
    elif kind == "release":
        detail = (
            f"round {e.get('round')} {e.get('what')} {e.get('bytes')} B, dp {e.get('dp_spend')}"
        )
    elif kind == "policy":
        detail = f"{e.get('action')} digest {str(e.get('digest', ''))[:12]}"
        if e.get("problems"):
            detail += f" ({len(e['problems'])} problem(s))"
    else:
        detail = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "kind"))
    head = f"{stamp} {kind:<7} {task:<8} "
    # Long reasons wrap under the detail column: every line fits 80 columns.
    return textwrap.fill(detail, width=80, initial_indent=head, subsequent_indent=" " * len(head))
