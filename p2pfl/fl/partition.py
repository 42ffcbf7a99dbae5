"""Partitioners: how a dataset is split across simulated nodes.

All take a seeded `numpy.random.Generator` (except `natural`, which needs none) and return
one sorted int64 index array per node. Same inputs and seed -> same partition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_nodes(nodes: int) -> None:
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")


def iid(n_samples: int, nodes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into `nodes` parts whose sizes differ by at most one."""
    _check_nodes(nodes)
    if n_samples < nodes:
        raise ValueError(f"iid: {n_samples} samples cannot fill {nodes} nodes")
    perm = rng.permutation(n_samples)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, nodes)]


def dirichlet(
    labels: np.ndarray,
    nodes: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: for each class, node shares ~ Dirichlet(alpha) (Hsu et al. 2019).

    Small alpha -> each node sees few classes; large alpha -> close to iid. Redraws until
    every node holds at least `min_size` samples (at most `max_tries` times).
    """
    _check_nodes(nodes)
    if alpha <= 0:
        raise ValueError(f"dirichlet: alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    n = labels.shape[0]
    min_size = min(min_size, n // nodes)
    if min_size < 1:
        raise ValueError(f"dirichlet: {n} samples cannot fill {nodes} nodes")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(nodes)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(nodes, alpha))
            cuts = (np.cumsum(props)[:-1] * idx.size).astype(np.int64)
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(p.size for p in out) >= min_size:
            return out
    raise ValueError(
        f"dirichlet: no split with >= {min_size} samples per node after {max_tries} tries "
        f"(alpha={alpha}, nodes={nodes}); raise alpha or lower min_size"
    )


def shards(
    labels: np.ndarray, nodes: int, shards_per_node: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017): sort by label, cut into
    nodes * shards_per_node shards, give each node `shards_per_node` random shards."""
    _check_nodes(nodes)
    if shards_per_node < 1:
        raise ValueError(f"shards: shards_per_node must be >= 1, got {shards_per_node}")
    labels = np.asarray(labels)
    total = nodes * shards_per_node
    if labels.shape[0] < total:
        raise ValueError(f"shards: {labels.shape[0]} samples cannot make {total} shards")
    # Shuffle first so that ties within a class are broken randomly, then stable-sort.
    perm = rng.permutation(labels.shape[0])
    order = perm[np.argsort(labels[perm], kind="stable")]
    pieces = np.array_split(order, total)
    assignment = rng.permutation(total)
    return [
        np.sort(np.concatenate([pieces[s] for s in assignment[i::nodes]])).astype(np.int64)
        for i in range(nodes)
    ]


def natural(sites: np.ndarray | Sequence[str] | None, nodes: int) -> list[np.ndarray]:
    """One site per node, sites in sorted order (node i gets the i-th site by name)."""
    _check_nodes(nodes)
    if sites is None:
        raise ValueError("natural: this dataset has no sites; use iid, dirichlet or shards")
    sites = np.asarray(sites)
    names = sorted({str(s) for s in sites})
    if nodes != len(names):
        raise ValueError(
            f"natural: needs nodes == number of sites ({len(names)}: {', '.join(names)}), "
            f"got nodes={nodes}"
        )
    return [np.flatnonzero(sites == name).astype(np.int64) for name in names]


def site_names(sites: np.ndarray | Sequence[str]) -> list[str]:
    """The site order `natural` uses."""
    return sorted({str(s) for s in np.asarray(sites)})


def split_train_test(
    labels: np.ndarray | int,
    test_fraction: float,
    rng: np.random.Generator,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx). With labels and stratify, each class keeps its share in both."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if isinstance(labels, int | np.integer):
        labels_arr = np.zeros(int(labels), dtype=np.int64)
        stratify = False
    else:
        labels_arr = np.asarray(labels)
    n = labels_arr.shape[0]
    if not stratify:
        perm = rng.permutation(n)
        n_test = int(round(n * test_fraction))
        return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)
    test: list[np.ndarray] = []
    for c in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == c))
        test.append(idx[: int(round(idx.size * test_fraction))])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


def parse_partition(spec: str) -> tuple[str, float | int | None]:
    """'iid' | 'dirichlet:ALPHA' | 'shards:K' | 'natural' -> (kind, argument)."""
    kind, _, arg = spec.partition(":")
    try:
        if kind in ("iid", "natural") and not arg:
            return kind, None
        if kind == "dirichlet" and arg:
            alpha = float(arg)
            if alpha > 0:
                return kind, alpha
        if kind == "shards" and arg:
            k = int(arg)
            if k >= 1:
                return kind, k
    except ValueError:
        pass
    raise ValueError(
        f"bad partition spec {spec!r}; use iid, dirichlet:ALPHA (ALPHA > 0), shards:K or natural"
    )


def partition(
    spec: str,
    labels: np.ndarray,
    nodes: int,
    rng: np.random.Generator,
    sites: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Apply a partition spec string (see `parse_partition`)."""
    kind, arg = parse_partition(spec)
    if kind == "iid":
        return iid(len(labels), nodes, rng)
    if kind == "dirichlet":
        return dirichlet(labels, nodes, float(arg), rng)  # type: ignore[arg-type]
    if kind == "shards":
        return shards(labels, nodes, int(arg), rng)  # type: ignore[arg-type]
    return natural(sites, nodes)
