"""``p2pfl new``: a taskpack directory from the templates in ``p2pfl/taskpack/templates``.

A generated taskpack validates, packs, and passes its own tests as written, so an author
starts from something that works and changes one thing at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from p2pfl.errors import LocalProtocolError
from p2pfl.taskpack._schema import _is_dns_name

__all__ = ["TASK_TYPES", "class_name_for", "new_taskpack"]

TASK_TYPES = ("training", "analysis", "inference", "preprocessing")
_SUFFIX = ".tmpl"


def class_name_for(name: str) -> str:
    """``wages-logreg`` -> ``WagesLogregTask``: the Task subclass in src/task.py."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w]
    base = "".join(w[:1].upper() + w[1:] for w in words) or "My"
    if base[0].isdigit():
        base = "T" + base
    return base + "Task"


def _render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _copy(src: Traversable, dest: Path, values: dict[str, str]) -> None:
    for item in sorted(src.iterdir(), key=lambda t: t.name):
        if item.name == "__pycache__":
            continue
        if item.is_dir():
            (dest / item.name).mkdir()
            _copy(item, dest / item.name, values)
        elif item.name.endswith(_SUFFIX):
            target = dest / item.name[: -len(_SUFFIX)]
            target.write_text(_render(item.read_text("utf-8"), values), "utf-8")


def new_taskpack(
    name: str, task_type: str, parent: str | Path = ".", author: str = "unknown"
) -> Path:
    """Write taskpack `name` of `task_type` into ``parent/name`` and return its path.

    LocalProtocolError for a bad name or type, or if the target already exists. Written
    into a temporary sibling first and renamed, so a failure leaves no half taskpack.
    """
    if not _is_dns_name(name):
        raise LocalProtocolError(
            f"{name!r} is not a valid taskpack name: use lowercase a-z, 0-9, '-' and '.' "
            "(e.g. wages-logreg)"
        )
    if task_type not in TASK_TYPES:
        raise LocalProtocolError(f"task type {task_type!r}: choose one of {', '.join(TASK_TYPES)}")
    parent = Path(parent)
    target = parent / name
    if target.exists() or target.is_symlink():
        raise LocalProtocolError(f"{target} already exists; choose another name or --dir")
    parent.mkdir(parents=True, exist_ok=True)
    values = {
        "name": name,
        "class_name": class_name_for(name),
        "author": author.replace("\\", "\\\\").replace('"', '\\"'),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    try:
        _copy(resources.files("p2pfl.taskpack").joinpath("templates", task_type), tmp, values)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        os.rename(tmp, target)  # fails (rather than merging) if target appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
