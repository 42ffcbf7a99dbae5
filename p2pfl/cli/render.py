"""How the CLI shows things to a person: tables readable at 80 columns and the task tree.

rich is imported inside the functions, so `p2pfl --help` never pays for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
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


# --- tables ------------------------------------------------------------------------------
#
# Every list the CLI prints goes through `table()`, so that all of them behave alike at 80
# columns: ids and content ids are shortened (enough to tell them apart, and a task id
# prefix is accepted by every command), the columns a person looks for (name, status) are
# never squeezed away, long free text wraps, and `--wide` prints every value in full.


@dataclass(frozen=True)
class Column:
    """One column. `kind` says how a value is shown at normal width:

    - "key": what a person reads the row by (name, status): wraps, is never squeezed out;
    - "peer": a peer id, shortened to 12D3KooW…ab12cd;
    - "cid": a content id, shortened to …4yegnrjh;
    - "task": a task id, shortened to its first 12 hex digits (a prefix commands accept);
    - "text": free text (reasons, addresses): takes the room that is left and wraps;
    - "short": short values (numbers, rounds, times): one line.
    """

    header: str
    kind: str = "short"
    wide_only: bool = False  # shown with --wide only (the row reads without it)


# Wrapping columns keep at least this many cells (or their longest value): a name or a
# status wraps onto a second line rather than shrinking to nothing.
_KEY_MIN_WIDTH = 16
_TEXT_MIN_WIDTH = 28
TASK_ID_CHARS = 12


def short_cid(cid: str) -> str:
    """…4yegnrjh: every CIDv1 of a raw sha2-256 starts with bafkrei, so keep the tail."""
    return cid if len(cid) <= 12 else f"…{cid[-8:]}"


def short_task(task_id: str) -> str:
    return task_id[:TASK_ID_CHARS]


_SHORTEN: dict[str, Callable[[str], str]] = {
    "peer": short_id,
    "cid": short_cid,
    "task": short_task,
}


def table(
    columns: list[Column],
    rows: list[list[str]],
    *,
    wide: bool = False,
    title: str | None = None,
    notes: list[str] | None = None,
) -> RenderableType:
    """A table readable at 80 columns (or, with `wide`, every value in full on one line).

    Cells are rich markup; ids in "peer", "cid" and "task" columns must be plain text.
    `notes` (markup) are printed under the table, each wrapped on its own.
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),  # with the box's blank separator: two spaces between columns
    )
    shown = [i for i, col in enumerate(columns) if wide or not col.wide_only]
    columns = [columns[i] for i in shown]
    cells = [
        [
            (cell if wide or col.kind not in _SHORTEN else _SHORTEN[col.kind](cell))
            for col, cell in zip(columns, [row[i] for i in shown], strict=True)
        ]
        for row in rows
    ]
    for i, col in enumerate(columns):
        longest = max(
            [len(col.header)]
            + [len(line) for r in cells for line in Text.from_markup(r[i]).plain.splitlines()]
        )
        if wide or col.kind in ("peer", "cid", "task", "short"):
            t.add_column(col.header, no_wrap=True, min_width=longest)
        else:
            floor = _KEY_MIN_WIDTH if col.kind == "key" else _TEXT_MIN_WIDTH
            t.add_column(col.header, overflow="fold", min_width=min(longest, floor), ratio=1)
    for row in cells:
        t.add_row(*row)
    if not notes:
        return t
    return Group(t, *(Text.from_markup(n) for n in notes))


def print_table(renderable: RenderableType, *, wide: bool = False) -> None:
    """Print to stdout; with `wide`, as wide as the table needs (the terminal may wrap)."""
    con = console()
    if wide:
        from rich.console import Console

        con = Console(highlight=False, width=100_000)
    con.print(renderable)


def _addrs(addrs: Any, peer: str, wide: bool) -> str:
    """Addresses one per line; at normal width without the /p2p/PEER tail (the id column
    already says whose they are)."""
    out = []
    for a in addrs or []:
        text = str(a)
        if not wide and text.endswith(f"/p2p/{peer}"):
            text = text[: -len(f"/p2p/{peer}")]
        out.append(text)
    return "\n".join(out) or "-"


def peers_table(
    info: dict[str, Any], peers: list[dict[str, Any]], *, wide: bool = False
) -> RenderableType:
    """This node on a first line (id, addresses, datasets), then one row per peer."""
    me = str(info.get("peer_id", "?"))
    head = (
        f"node {me if wide else short_id(me)}  "
        + _addrs(info.get("addrs"), me, wide).replace("\n", " ")
        + f"  {_datasets_of(info.get('datasets'))}"
    )
    rows = [
        [
            str(p.get("peer_id", "?")),
            _addrs(p.get("addrs"), str(p.get("peer_id", "?")), wide),
            _capabilities(p.get("capabilities")),
        ]
        for p in peers
    ]
    columns = [
        Column("peer id", "peer"),
        Column("addresses", "text"),
        Column("capabilities", "text"),
    ]
    from rich.console import Group
    from rich.text import Text

    if not rows:
        return Group(
            Text.from_markup(head), Text("no peers yet (is --bootstrap set, is the other node up?)")
        )
    return Group(Text.from_markup(head), table(columns, rows, wide=wide))


def _datasets_of(datasets: Any) -> str:
    if not datasets:
        return "-"
    names = []
    for d in datasets:
        if isinstance(d, dict):
            rows = d.get("rows", d.get("samples"))
            names.append(
                _esc(d.get("name", "?")) + (f" ({_esc(rows)} rows)" if rows is not None else "")
            )
        else:
            names.append(_esc(d))
    return "data: " + ", ".join(names)


def _capabilities(caps: Any) -> str:
    """A short summary of a capability record (its exact shape is the node's business)."""
    if not isinstance(caps, dict):
        return "[dim]unknown yet[/]"
    parts = []
    if caps.get("datasets"):
        parts.append(_datasets_of(caps["datasets"]))
    for key in ("cpus", "cpu", "memory", "gpu"):
        if caps.get(key) not in (None, "", False):
            parts.append(f"{key}: {_esc(caps[key])}")
    return "\n".join(parts) or "-"


def taskpacks_table(packs: list[dict[str, Any]], *, wide: bool = False) -> RenderableType:
    """Name, version, status, cid, publisher; reasons in a column with --wide, else in
    notes under the table (a reason is a sentence: a column would fold it to a sliver)."""
    columns = [
        Column("name", "key"),
        Column("version"),
        Column("status", "key"),
        Column("cid", "cid"),
        Column("publisher", "peer"),
    ]
    if wide:
        columns.append(Column("reason", "text"))
    rows, notes = [], []
    for p in packs:
        status = styled(p.get("status"))
        progress = p.get("progress")
        if isinstance(progress, list | tuple) and len(progress) == 2:
            status += f" {_esc(progress[0])}/{_esc(progress[1])}"
        name, version = _esc(p.get("name", "?")), _esc(p.get("version", "?"))
        row = [name, version, status, str(p.get("cid", "?")), str(p.get("publisher", "?"))]
        reason = _esc(p.get("reason") or "")
        if wide:
            row.append(reason)
        elif reason:
            notes.append(f"[bold]{name}@{version}[/]: {reason}")
        rows.append(row)
    return table(columns, rows, wide=wide, notes=notes)


def versions_table(names: list[dict[str, Any]], *, wide: bool = False) -> RenderableType:
    """`p2pfl taskpacks --versions`: each name's versions side by side, newest first (the
    publishers are in `p2pfl taskpacks` and in --json)."""
    columns = [
        Column("name", "key"),
        Column("version", "key"),
        Column("model schema"),
        Column("cid", "cid"),
        Column("status", "key"),
    ]
    rows = []
    for entry in names:
        for i, v in enumerate(entry["versions"]):
            rows.append(
                [
                    _esc(entry["name"]) if i == 0 else "",
                    _esc(v.get("version", "?")),
                    _esc(v.get("model_schema") or "-"),
                    str(v.get("cid", "?")),
                    styled(v.get("status")),
                ]
            )
    return table(columns, rows, wide=wide)


def tasks_table(tasks: list[dict[str, Any]], *, wide: bool = False) -> RenderableType:
    columns = [
        Column("task id", "task"),
        Column("taskpack", "key"),
        Column("type", wide_only=True),
        Column("status", "key"),
        Column("round"),
        Column("nodes"),
        Column("created", wide_only=True),  # the rows are in creation order anyway
    ]
    stamp = "%Y-%m-%d %H:%M:%S"
    rows = []
    for t in sorted(tasks, key=lambda t: t.get("created") or 0):
        created = t.get("created")
        rows.append(
            [
                str(t.get("task_id", "?")),
                _esc(f"{t.get('name', '?')}@{t.get('version', '?')}"),
                _esc(t.get("type") or "-"),
                styled(t.get("status")),
                f"{t.get('round', 0)}/{t.get('rounds', '?')}",
                str(len(t.get("participants") or [])),
                time.strftime(stamp, time.localtime(created))
                if isinstance(created, int | float)
                else "-",
            ]
        )
    return table(columns, rows, wide=wide)


def _esc(value: Any) -> str:
    """A value from a node or a peer, shown as text (never read as rich markup)."""
    from rich.markup import escape

    return escape(str(value))


def task_tree(task: dict[str, Any], logs: list[str] | None = None) -> RenderableType:
    """The task, then each participant (state, round r/R, metrics), then recent log lines."""
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree

    rounds = task.get("rounds", "?")
    head = (
        f"[bold]task {short_task(str(task.get('task_id', '?')))}[/] "
        f"{_esc(task.get('name', '?'))}@{_esc(task.get('version', '?'))} "
        f"{styled(task.get('status'))} "
        f"round {task.get('round', 0)}/{rounds}"
    )
    if task.get("reason"):
        head += f" [red]({_esc(task['reason'])})[/]"
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
