"""Derived datasets: tables a preprocessing task wrote on this node, kept for later steps.

A flow's preprocessing step (say `standardize`, output `heart_std`) turns each site's own
records into a new table on that site. The table never leaves the node: only its record
count is released. Later steps on the same node read it by name, exactly like a dataset the
site registered with `--dataset NAME=PATH`.

Layout (under the node's data dir, `DATA_DIR/derived/`)::

    <scope>/<name>.npz     the table (p2pfl.fl.datasets npz: X, y, feature_names)
    <scope>/<name>.json    what it is: records, columns, the site datasets it came from,
                           the task that produced it, its size and sha256

`scope` is the flow id (or, outside a flow, the producing task's id): 32 lowercase hex
digits, so two flows that both name an output `heart_std` never see each other's table.
`name` is checked against a fixed charset and length before it is used in any path (it comes
from a flow file, which came from a peer's offer). The table is written first and the json
last, each atomically (p2pfl/fsutil.py): a derived dataset exists only once both are whole,
and a crash in between leaves nothing that `get` would return.

Bounds: at most `max_per_scope` tables per scope and `max_total_bytes` on disk in all; a put
over either is refused with the reason (a hostile taskpack must not fill the disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from p2pfl.fsutil import atomic_write

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")  # a derived dataset's name (e.g. heart_std)
SCOPE_RE = re.compile(r"[0-9a-f]{32}")  # a flow id or task id
MAX_PER_SCOPE = 64
MAX_TOTAL_BYTES = 16 * 2**30
MAX_COLUMNS = 10_000


class DerivedError(ValueError):
    """A derived dataset that cannot be stored or read (the message says why)."""


def check_derived_name(name: object) -> str:
    """`name` if it is a valid derived dataset name, else DerivedError naming the rule."""
    if type(name) is not str or not NAME_RE.fullmatch(name):
        raise DerivedError(
            f"derived dataset name {name!r} must be 1-48 characters a-z 0-9 _ "
            "starting with a letter"
        )
    return name


def check_scope(scope: object) -> str:
    if type(scope) is not str or not SCOPE_RE.fullmatch(scope):
        raise DerivedError(f"derived dataset scope {scope!r} must be 32 lowercase hex digits")
    return scope


@dataclass(frozen=True)
class DerivedInfo:
    """One derived dataset on this node (what `get` and `list` return)."""

    scope: str
    name: str
    path: Path  # the table (npz), readable with p2pfl.fl.datasets.load_table
    records: int
    columns: tuple[str, ...]
    sources: tuple[str, ...]  # the site datasets it was derived from (their policy applies)
    producer: str  # the task id that wrote it
    created: float
    size: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["columns"] = list(self.columns)
        out["sources"] = list(self.sources)
        return out


class DerivedRegistry:
    """The derived datasets under one root (a node's `DATA_DIR/derived`)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_per_scope: int = MAX_PER_SCOPE,
        max_total_bytes: int = MAX_TOTAL_BYTES,
    ) -> None:
        self.root = Path(root)
        self.max_per_scope = max_per_scope
        self.max_total_bytes = max_total_bytes

    # --- paths: built only from checked tokens -----------------------------------------

    def _dir(self, scope: str) -> Path:
        return self.root / check_scope(scope)

    def _table(self, scope: str, name: str) -> Path:
        return self._dir(scope) / f"{check_derived_name(name)}.npz"

    def _meta(self, scope: str, name: str) -> Path:
        return self._dir(scope) / f"{check_derived_name(name)}.json"

    # --- writing ---------------------------------------------------------------------------

    def put_table(
        self,
        scope: str,
        name: str,
        X: np.ndarray,
        y: np.ndarray,
        feature_names: list[str] | tuple[str, ...],
        *,
        sources: tuple[str, ...] = (),
        producer: str = "",
        created: float = 0.0,
    ) -> DerivedInfo:
        """Store a table (features X, integer labels y) as `name` in `scope`, replacing an
        older one of that name. Returns what was stored."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        names = [str(n) for n in feature_names]
        if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[1] != len(names):
            raise DerivedError(
                f"derived table {name!r}: X {X.shape}, y {y.shape} and {len(names)} column "
                "names disagree"
            )
        if len(names) > MAX_COLUMNS:
            raise DerivedError(f"derived table {name!r}: {len(names)} columns (max {MAX_COLUMNS})")
        if not np.all(np.isfinite(X)):
            raise DerivedError(f"derived table {name!r}: X holds NaN or Inf")
        import io

        buf = io.BytesIO()
        np.savez(buf, X=X, y=y, feature_names=np.array(names, dtype=str))
        return self.put_bytes(
            scope,
            name,
            buf.getvalue(),
            records=int(X.shape[0]),
            columns=tuple(names),
            sources=sources,
            producer=producer,
            created=created,
        )

    def put_bytes(
        self,
        scope: str,
        name: str,
        table: bytes,
        *,
        records: int,
        columns: tuple[str, ...],
        sources: tuple[str, ...] = (),
        producer: str = "",
        created: float = 0.0,
    ) -> DerivedInfo:
        """Store an already-encoded npz table (as `put_table` makes). The bounds are checked
        before anything is written."""
        check_derived_name(name)
        check_scope(scope)
        if records < 0:
            raise DerivedError(f"derived table {name!r}: records must be >= 0")
        existing = {i.name for i in self.list(scope)}
        if name not in existing and len(existing) >= self.max_per_scope:
            raise DerivedError(
                f"derived table {name!r}: scope {scope[:12]} already holds "
                f"{self.max_per_scope} tables"
            )
        old = self.get(scope, name)
        used = self.total_bytes() - (old.size if old else 0)
        if used + len(table) > self.max_total_bytes:
            raise DerivedError(
                f"derived table {name!r}: {len(table)} bytes would exceed the node's "
                f"{self.max_total_bytes} bytes for derived data ({used} in use)"
            )
        info = DerivedInfo(
            scope=scope,
            name=name,
            path=self._table(scope, name),
            records=int(records),
            columns=tuple(str(c) for c in columns),
            sources=tuple(str(s) for s in sources),
            producer=str(producer),
            created=float(created),
            size=len(table),
            sha256=hashlib.sha256(table).hexdigest(),
        )
        # The json goes last: until it is written the (new) table is not returned by `get`.
        self._meta(scope, name).unlink(missing_ok=True)
        atomic_write(info.path, table, mode=0o600)
        atomic_write(
            self._meta(scope, name), json.dumps(info.to_json(), sort_keys=True), mode=0o600
        )
        return info

    # --- reading ---------------------------------------------------------------------------

    def get(self, scope: str, name: str) -> DerivedInfo | None:
        """The derived dataset `name` of `scope`, or None. Raises DerivedError only for a
        malformed name or scope; a damaged entry reads as absent."""
        meta = self._meta(scope, name)
        table = self._table(scope, name)
        try:
            raw = json.loads(meta.read_text("utf-8"))
            size = table.stat().st_size
        except (OSError, ValueError):
            return None
        try:
            info = DerivedInfo(
                scope=scope,
                name=name,
                path=table,
                records=int(raw["records"]),
                columns=tuple(str(c) for c in raw["columns"]),
                sources=tuple(str(s) for s in raw["sources"]),
                producer=str(raw["producer"]),
                created=float(raw["created"]),
                size=int(raw["size"]),
                sha256=str(raw["sha256"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return info if info.size == size else None

    def path(self, scope: str, name: str) -> Path:
        """The table's path (KeyError if there is no such derived dataset)."""
        info = self.get(scope, name)
        if info is None:
            raise KeyError(f"no derived dataset {name!r} in scope {scope[:12]}")
        return info.path

    def verify(self, scope: str, name: str) -> bool:
        """Whether the table's bytes still hash to what was recorded."""
        info = self.get(scope, name)
        if info is None:
            return False
        digest = hashlib.sha256()
        with open(info.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest() == info.sha256

    def scopes(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if SCOPE_RE.fullmatch(p.name))

    def list(self, scope: str | None = None) -> list[DerivedInfo]:
        """Every derived dataset (of one scope, or of all), sorted by scope then name."""
        out: list[DerivedInfo] = []
        for sc in [check_scope(scope)] if scope is not None else self.scopes():
            folder = self.root / sc
            if not folder.is_dir():
                continue
            for meta in sorted(folder.glob("*.json")):
                if NAME_RE.fullmatch(meta.stem):
                    info = self.get(sc, meta.stem)
                    if info is not None:
                        out.append(info)
        return out

    def total_bytes(self) -> int:
        return sum(i.size for i in self.list())

    # --- removing --------------------------------------------------------------------------

    def remove(self, scope: str, name: str) -> bool:
        meta, table = self._meta(scope, name), self._table(scope, name)
        found = meta.exists() or table.exists()
        meta.unlink(missing_ok=True)  # first: the entry disappears before its table
        table.unlink(missing_ok=True)
        return found

    def remove_scope(self, scope: str) -> int:
        """Forget every derived dataset of `scope` (say, a flow's); returns how many."""
        n = len(self.list(scope))
        folder = self._dir(scope)
        if folder.is_dir():
            shutil.rmtree(folder)
        return n
