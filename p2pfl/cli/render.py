"""How the CLI shows things to a person: rich tables and the live task tree.

rich is imported inside the functions, so `p2pfl --help` never pays for it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from p2pfl.client import format_event, short_id

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

_STATUS_STYLE = {
    "succeeded": "bold green",
    "failed": "bold red",
    "running": "yellow",
    "pending": "cyan",
    "verified": "green",
    "rejected": "red",
    "fetching": "cyan",
}


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fmt_num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def styled(status: Any) -> str:
    s = str(status or "-")
    style = _STATUS_STYLE.get(s)
    return f"[{style}]{s}[/]" if style else s


def peers_table(info: dict[str, Any], peers: list[dict[str, Any]]) -> RenderableType:
    from rich.table import Table

    table = Table(title=f"node {info.get('peer_id', '?')}", title_justify="left")
    table.add_column("peer id", no_wrap=True)
    table.add_column("addresses", overflow="fold")
    table.add_column("capabilities")
    table.add_row(
        f"[bold]{info.get('peer_id', '?')}[/] (self)",
        "\n".join(info.get("addrs") or []),
        _datasets_of(info.get("datasets")),
    )
    for p in peers:
        table.add_row(
            str(p.get("peer_id", "?")),
            "\n".join(p.get("addrs") or []),
            _capabilities(p.get("capabilities")),
        )
    return table


def _datasets_of(datasets: Any) -> str:
    if not datasets:
        return "-"
    names = []
    for d in datasets:
        if isinstance(d, dict):
            rows = d.get("rows", d.get("samples"))
            names.append(f"{d.get('name', '?')}" + (f" ({rows} rows)" if rows is not None else ""))
        else:
            names.append(str(d))
    return "datasets: " + ", ".join(names)


def _capabilities(caps: Any) -> str:
    """A short summary of a capability record (its exact shape is the node's business)."""
    if not isinstance(caps, dict):
        return "[dim]unknown yet[/]"
    parts = []
    if caps.get("datasets"):
        parts.append(_datasets_of(caps["datasets"]))
    for key in ("cpus", "cpu", "memory", "gpu"):
        if caps.get(key) not in (None, "", False):
            parts.append(f"{key}: {caps[key]}")
    return "\n".join(parts) or "-"


def taskpacks_table(packs: list[dict[str, Any]]) -> RenderableType:
    from rich.table import Table

    table = Table()
    for col in ("name", "version", "cid", "publisher", "status", "reason"):
        table.add_column(col, no_wrap=col in ("cid", "publisher"))
    for p in packs:
        table.add_row(
            str(p.get("name", "?")),
            str(p.get("version", "?")),
            str(p.get("cid", "?")),
            short_id(str(p.get("publisher", "?"))),
            styled(p.get("status")),
            str(p.get("reason") or ""),
        )
    return table


def versions_table(names: list[dict[str, Any]]) -> RenderableType:
    """`p2pfl taskpacks --versions`: each name's versions side by side, newest first (the
    publishers are in `p2pfl taskpacks` and in --json)."""
    from rich.table import Table

    table = Table()
    for col in ("name", "version", "model schema", "cid", "status"):
        table.add_column(col, no_wrap=col == "cid", overflow="fold")
    for entry in names:
        for i, v in enumerate(entry["versions"]):
            table.add_row(
                str(entry["name"]) if i == 0 else "",
                str(v.get("version", "?")),
                str(v.get("model_schema") or "-"),
                "…" + str(v.get("cid", "?"))[-10:],
                styled(v.get("status")),
            )
    return table


def tasks_table(tasks: list[dict[str, Any]]) -> RenderableType:
    from rich.table import Table

    table = Table()
    for col in ("task id", "taskpack", "type", "status", "round", "nodes", "created"):
        table.add_column(col, no_wrap=col == "task id")
    for t in sorted(tasks, key=lambda t: t.get("created") or 0):
        created = t.get("created")
        table.add_row(
            str(t.get("task_id", "?")),
            f"{t.get('name', '?')}@{t.get('version', '?')}",
            str(t.get("type") or "-"),
            styled(t.get("status")),
            f"{t.get('round', 0)}/{t.get('rounds', '?')}",
            str(len(t.get("participants") or [])),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
            if isinstance(created, int | float)
            else "-",
        )
    return table


def task_tree(task: dict[str, Any], logs: list[str] | None = None) -> RenderableType:
    """The task, then each participant (state, round r/R, metrics), then recent log lines."""
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree

    rounds = task.get("rounds", "?")
    head = (
        f"[bold]task {task.get('task_id', '?')}[/] {task.get('name', '?')}@"
        f"{task.get('version', '?')} {styled(task.get('status'))} "
        f"round {task.get('round', 0)}/{rounds}"
    )
    if task.get("reason"):
        head += f" [red]({task['reason']})[/]"
    tree = Tree(head)
    nodes: dict[str, Any] = task.get("nodes") or {}
    participants = list(task.get("participants") or [])
    for peer in participants + [p for p in nodes if p not in participants]:
        n = nodes.get(peer) or {}
        role = ", ".join(r for r in ("coordinator", "reducer") if task.get(r) == peer)
        label = f"{short_id(str(peer))}" + (f" [dim]({role})[/]" if role else "")
        metrics = "  ".join(
            f"{k} {fmt_num(n.get(k))}"
            for k in ("loss", "accuracy", "epsilon")
            if n.get(k) is not None
        )
        tree.add(
            f"{label}  {n.get('state', '-')}  round {n.get('round', 0)}/{rounds}"
            + (f"  {metrics}" if metrics else "")
        )
    if not logs:
        return tree
    return Group(tree, Text("\n".join(logs), style="dim"))


def result_view(result: dict[str, Any]) -> RenderableType:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("task", str(result.get("task_id")))
    table.add_row("status", styled(result.get("status")))
    table.add_row("rounds", str(result.get("rounds")))
    table.add_row("participants", "\n".join(map(str, result.get("participants") or [])))
    table.add_row("reducer", str(result.get("reducer")))
    table.add_row("model", str(result.get("model_cid") or "-"))
    if "signature_ok" in result:
        ok = result["signature_ok"]
        table.add_row("signature", "[green]valid[/]" if ok else "[bold red]INVALID[/]")
    for k, v in (result.get("metrics") or {}).items():
        table.add_row(f"  {k}", fmt_num(v) if not isinstance(v, dict | list) else str(v))
    return table


def event_line(event: dict[str, Any]) -> str:
    return format_event(event)
