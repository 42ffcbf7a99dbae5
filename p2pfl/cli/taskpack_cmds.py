"""``p2pfl new`` and ``p2pfl pack``: work on a taskpack directory, no node needed.

The CLI main group registers `new_cmd` and `pack_cmd`; this module only defines them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from p2pfl.errors import LocalProtocolError, ValidationError
from p2pfl.fsutil import atomic_write


def _problems(exc: ValidationError) -> click.ClickException:
    """A ValidationError as a ClickException listing every problem, one per line."""
    return click.ClickException(str(exc))


@click.command("new")
@click.argument("name")
@click.option(
    "--type",
    "task_type",
    type=click.Choice(["training", "analysis", "inference", "preprocessing"]),
    default="training",
    show_default=True,
    help="What the taskpack does.",
)
@click.option(
    "--dir",
    "parent",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to create the NAME directory.",
)
@click.option("--author", default=None, help="metadata.author (default: $USER).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def new_cmd(name: str, task_type: str, parent: Path, author: str | None, as_json: bool) -> None:
    """Create taskpack NAME from a template that packs, validates and passes its tests."""
    from p2pfl.taskpack.scaffold import new_taskpack

    author = author or os.environ.get("USER") or "unknown"
    try:
        path = new_taskpack(name, task_type, parent, author=author)
    except LocalProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    if as_json:
        out = {"path": str(path), "name": name, "type": task_type, "files": files}
        click.echo(json.dumps(out))
        return
    click.echo(f"created {task_type} taskpack {name} in {path}")
    for f in files:
        click.echo(f"  {f}")
    click.echo(f"next: cd {path} && python -m pytest tests -q && p2pfl pack .")


@click.command("pack")
@click.argument(
    "taskpack_dir", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the archive (an uncompressed tar) to this file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def pack_cmd(taskpack_dir: Path, out: Path | None, as_json: bool) -> None:
    """Validate and deterministically pack the taskpack in DIR; print its content id."""
    from p2pfl.store.cid import cid_of
    from p2pfl.taskpack.manifest import load_manifest
    from p2pfl.taskpack.pack import pack_dir, scan

    try:
        manifest = load_manifest(taskpack_dir)
        archive = pack_dir(taskpack_dir)
    except ValidationError as exc:
        raise _problems(exc) from None
    except LocalProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    cid = cid_of(archive)
    files = sum(1 for m in scan(archive) if not m.is_dir)
    if out is not None:
        atomic_write(out, archive)
    if as_json:
        info = {
            "cid": cid,
            "name": manifest.name,
            "version": manifest.version,
            "size": len(archive),
            "files": files,
        }
        if out is not None:
            info["out"] = str(out)
        click.echo(json.dumps(info))
        return
    click.echo(cid)
