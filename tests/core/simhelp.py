"""Helpers for protocol tests that run real node code over the simulated network."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2pfl.fl.datasets import load_dataset, write_table
from p2pfl.fl.partition import iid
from p2pfl.sim.cluster import ClusterSpec, SimCluster

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "taskpacks" / "fedavg-mlp-digits"
STATS = ROOT / "taskpacks" / "federated-stats"


def digits_split(
    tmp: Path, nodes: int, seed: int = 1, per_node: int | None = None
) -> tuple[list[Path], Path]:
    ds = load_dataset("digits")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds.y))
    test, train = order[:300], order[300:]
    if per_node:
        train = train[: per_node * nodes]
    paths = []
    for i, part in enumerate(iid(len(train), nodes, rng)):
        path = tmp / f"node-{i}.npz"
        write_table(path, ds.X[train[part]], ds.y[train[part]], ds.feature_names)
        paths.append(path)
    test_path = tmp / "test.npz"
    write_table(test_path, ds.X[test], ds.y[test], ds.feature_names)
    return paths, test_path


def run(spec: ClusterSpec) -> tuple[SimCluster, list]:
    cluster = SimCluster(spec)
    records = list(cluster.run())
    return cluster, records


def spec(paths: list[Path], test: Path | None, **kw) -> ClusterSpec:
    base = dict(
        seed=1,
        nodes=len(paths),
        taskpack_dir=DIGITS,
        node_data=paths,
        input_name="digits",
        params={"rounds": 3},
        link={"latency_ms": 20, "bandwidth_mbps": 100},
        test_path=test,
    )
    base.update(kw)
    return ClusterSpec(**base)
