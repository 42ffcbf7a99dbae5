"""Batched taskpacks: inference over records, one batch at a time.

A batched task does not load all its data in `preprocess`; the runtime asks it for its
*records* (the files of a folder input, or the rows of a CSV), picks which to run (a test
run takes the first N, a new-data-only run skips those already processed), and streams
them to the task in batches. Each record has a key (a file's name, a row's key) and a
digest (a content hash) that says whether it changed.

    class MyInference(InferenceTask):
        def load_model(self, ctx, weights): ...           # weights: model_cid or None
        def predict(self, ctx, model, items): ...         # [(prediction, score), ...]

What a batch returns stays on the node: the runtime writes the inference report (CSV:
key, prediction, score) into the node's data dir. Only aggregates leave: record and class
counts and the mean score, under the node's k rule (p2pfl.policy.release).

A record that fails to load or process is reported with its reason; the runtime retries it
once on its own and then records it as failed, while the run goes on.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfl.taskpack.sdk import Context, Partial, Task, Update, Weights, is_released

MAX_KEY_CHARS = 512  # a record key is shown in reports and remembered per dataset
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Record:
    """One unit of work: `key` names it (stable across runs), `digest` hashes its content."""

    key: str
    digest: str


@dataclass
class BatchOutput:
    """What one batch produced: one row per record that worked, a reason per one that failed."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _visible_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.is_symlink():
            continue
        out.append(p)
    return out


def count_files(path: Path) -> int:
    """The records of a folder dataset: its regular files, hidden ones skipped."""
    return len(_visible_files(Path(path)))


def csv_shape(path: Path) -> tuple[int, list[str]]:
    """Rows and header of a CSV file, whatever its columns hold (keys, text, numbers)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        return sum(1 for _ in reader), [str(c) for c in header]


def folder_records(path: Path) -> list[Record]:
    """The regular files under `path` (recursively, hidden ones skipped), by relative path."""
    root = Path(path)
    return [
        Record(p.relative_to(root).as_posix()[:MAX_KEY_CHARS], file_digest(p))
        for p in _visible_files(root)
    ]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a table: a CSV file with a header row (values as text), or an npz table
    as `p2pfl datasets split` and the simulator write (X, y, feature_names: numbers)."""
    if Path(path).suffix.lower() == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            x, y = np.asarray(z["X"]), np.asarray(z["y"])
            names = [str(n) for n in z["feature_names"]] if "feature_names" in z else []
        names = names or [f"f{i}" for i in range(x.shape[1])]
        return [
            {**dict(zip(names, map(float, row), strict=True)), "label": int(label)}
            for row, label in zip(x, y, strict=True)
        ]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_records(rows: list[dict[str, Any]], key_column: str | None) -> list[Record]:
    """One record per row: keyed by `key_column` (a declared row key) or by row number, its
    digest the hash of the row's values (so an edited row counts as new)."""
    out = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if key_column is not None:
            if key_column not in row:
                raise ValueError(f"no key column {key_column!r}")
            key = str(row[key_column])[:MAX_KEY_CHARS]
            if key in seen:
                raise ValueError(f"row {i + 2}: key {key!r} appears twice in {key_column!r}")
        else:
            key = f"row-{i + 1}"
        seen.add(key)
        text = "\x1f".join(f"{k}={v}" for k, v in sorted(row.items(), key=lambda kv: str(kv[0])))
        out.append(Record(key, hashlib.sha256(text.encode()).hexdigest()))
    return out


class BatchTask(Task):
    """A task the runtime runs in batches over the records of its first input.

    Override `load` and `process`; `records` reads a folder (one record per file) or a CSV
    (one record per row, keyed by params["key_column"] when given)."""

    batch_size = 32  # params["batch_size"] overrides

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] | None = None

    def input_path(self, inputs: dict[str, Path]) -> Path:
        if not inputs:
            raise ValueError("a batched task needs an input")
        return Path(next(iter(inputs.values())))

    def records(self, ctx: Context, inputs: dict[str, Path]) -> list[Record]:
        path = self.input_path(inputs)
        if path.is_dir():
            return folder_records(path)
        rows = read_rows(path)
        recs = row_records(rows, ctx.params.get("key_column"))
        self._rows = {r.key: row for r, row in zip(recs, rows, strict=True)}
        return recs

    def load(self, ctx: Context, inputs: dict[str, Path], key: str) -> Any:
        """One record's data: a file's bytes (folder input) or a row's dict (CSV input)."""
        path = self.input_path(inputs)
        if path.is_dir():
            # Keys come from our own listing (records), but never leave the folder anyway.
            target = (path / key).resolve()
            if not target.is_relative_to(path.resolve()):
                raise ValueError(f"{key!r} is outside the input folder")
            return target.read_bytes()
        if self._rows is None:
            self.records(ctx, inputs)
        assert self._rows is not None
        if key not in self._rows:
            raise ValueError(f"no record {key!r}")
        return self._rows[key]

    def process(
        self, ctx: Context, items: list[tuple[str, Any]], weights: Weights | None
    ) -> list[dict[str, Any]]:
        """One output row per (key, data) item, in order."""
        raise NotImplementedError(f"{type(self).__name__}.process")

    def run_batch(
        self, ctx: Context, inputs: dict[str, Path], keys: list[str], weights: Weights | None
    ) -> BatchOutput:
        """Load each record (a failure is that record's, not the batch's), then process the
        ones that loaded together; if the batch as a whole raises, each record is tried on
        its own so one bad record cannot sink the others."""
        out = BatchOutput()
        items: list[tuple[str, Any]] = []
        for key in keys:
            try:
                items.append((key, self.load(ctx, inputs, key)))
            except Exception as e:  # noqa: BLE001 - a record's failure, reported with its reason
                out.failed.append((key, _describe(e)))
        if not items:
            return out
        try:
            rows = self.process(ctx, items, weights)
            if len(rows) != len(items):
                raise ValueError(f"process returned {len(rows)} rows for {len(items)} records")
            batches = [(items, rows)]
        except Exception as e:  # noqa: BLE001 - retried record by record below
            if len(items) == 1:
                out.failed.append((items[0][0], _describe(e)))
                return out
            batches = []
            for item in items:
                try:
                    batches.append(([item], self.process(ctx, [item], weights)))
                except Exception as e:  # noqa: BLE001
                    out.failed.append((item[0], _describe(e)))
        for its, rows in batches:
            for (key, _), row in zip(its, rows, strict=True):
                out.rows.append({"key": key, **dict(row)})
        return out

    def execute(self, ctx: Context, data: Any, weights: Weights | None) -> Update:
        raise NotImplementedError(
            f"{type(self).__name__} is batched: the runtime runs it with run_batch, not execute"
        )


class InferenceTask(BatchTask):
    """Apply a model to local records. `weights` is the model named by params["model_cid"]
    (an earlier task's result, fetched by the node), or None: then `load_model` loads the
    model bundled in the taskpack (e.g. a file beside task.py)."""

    def __init__(self) -> None:
        super().__init__()
        self._model: Any = None
        self._have_model = False

    def load_model(self, ctx: Context, weights: Weights | None) -> Any:
        return weights

    def reduce(self, ctx: Context, partials: list[Partial]) -> dict[str, Any]:
        """Adds up what the nodes released: record counts, records per predicted class (a
        class some node showed as "<k" stays "<k"), the mean score weighted by records."""
        parts = sorted(partials, key=lambda p: p.node)  # a fixed order: reproducible sums
        aggs = [p.aggregates for p in parts]

        def added(key: str) -> int | None:
            got = [a[key] for a in aggs if is_released(a.get(key), "count")]
            return sum(int(c["n"]) for c in got) if got else None

        classes: dict[str, Any] = {}
        for a in aggs:
            if not is_released(a.get("predictions"), "groups"):
                continue
            for name, c in a["predictions"]["counts"].items():
                before = classes.get(name, 0)
                classes[name] = "<k" if "<k" in (before, c) else int(before) + int(c)
        means = [a["mean_score"] for a in aggs if is_released(a.get("mean_score"), "mean")]
        n = sum(int(m["n"]) for m in means)
        return {
            "nodes": len(parts),
            "records": added("records"),
            "failed": added("failed"),
            "predictions": dict(sorted(classes.items())),
            "mean_score": sum(float(m["value"]) * int(m["n"]) for m in means) / n if n else None,
        }

    def predict(
        self, ctx: Context, model: Any, items: list[tuple[str, Any]]
    ) -> list[tuple[Any, float]]:
        """(prediction, score) per item: score is the model's confidence in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__}.predict")

    def process(
        self, ctx: Context, items: list[tuple[str, Any]], weights: Weights | None
    ) -> list[dict[str, Any]]:
        if not self._have_model:
            self._model = self.load_model(ctx, weights)
            self._have_model = True
        out = []
        for prediction, score in self.predict(ctx, self._model, items):
            s = float(score)
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"score {s} is not in [0, 1]")
            out.append({"prediction": str(prediction), "score": s})
        return out


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"{type(e).__name__}: {text}" if text else type(e).__name__)[:500]
