"""Turn a scenario's dataset section into one table file per node plus a global test set.

The split is a pure function of (dataset, partition, test_fraction, nodes, seed): the same
scenario and seed write byte-identical files, which is half of what makes a simulated run
reproducible (the other half is the cluster's virtual time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2pfl.errors import ValidationError
from p2pfl.sim.scenario import Scenario

# Distinct streams from one seed: changing how the test set is drawn must not change the
# partition (and vice versa) beyond what the data itself forces.
_TEST_STREAM = 0x7E57
_PARTITION_STREAM = 0x9A27


def prepare_node_data(
    scenario: Scenario, seed: int, work_dir: str | Path, fmt: str = "npz"
) -> tuple[list[Path], Path]:
    """Write `work_dir/node-0000.<fmt>` ... and `work_dir/test.<fmt>`; return their paths.

    `fmt` is `npz` or `csv` (a header row, the features, then `label`): the format the
    taskpack's input declares, so a taskpack reads in a simulation what it reads on a site.

    Raises ValidationError (path `dataset...`) when the dataset cannot be loaded or split
    the way the scenario asks (too few samples for the nodes, no sites, ...).
    """
    from p2pfl.fl import datasets as fl_datasets, partition as fl_partition

    spec = scenario.dataset
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        ds = fl_datasets.load_dataset(spec.name)
    except (ValueError, OSError) as exc:
        raise ValidationError(
            [f"dataset.name: cannot load {spec.name!r}: {exc}"], "scenario"
        ) from None

    # split_dataset holds out a stratified test set and standardises tabular data with the
    # training rows' statistics only (no test leakage).
    test_rng = np.random.default_rng([seed, _TEST_STREAM])
    # A flow scales the data itself (its standardize step, federatedly): raw tables then.
    scale = getattr(scenario, "flow", None) is None
    train, test = fl_datasets.split_dataset(ds, spec.test_fraction, test_rng, scale=scale)

    part_rng = np.random.default_rng([seed, _PARTITION_STREAM])
    kind = spec.partition.kind
    n = scenario.nodes
    try:
        if kind == "iid":
            parts = fl_partition.iid(len(train.y), n, part_rng)
        elif kind == "dirichlet":
            assert spec.partition.alpha is not None
            parts = fl_partition.dirichlet(train.y, n, spec.partition.alpha, part_rng)
        elif kind == "shards":
            parts = fl_partition.shards(train.y, n, spec.partition.per_node or 2, part_rng)
        elif kind == "natural":
            parts = fl_partition.natural(train.sites, n)
        else:  # the scenario validator lets no other kind through
            raise ValueError(f"unknown partition kind {kind!r}")
    except ValueError as exc:
        raise ValidationError([f"dataset.partition: {exc}"], "scenario") from None

    names = list(train.feature_names)
    paths: list[Path] = []
    for i, idx in enumerate(parts):
        path = work / f"node-{i:04d}.{fmt}"
        texts = None if train.texts is None else train.texts[idx]
        fl_datasets.write_table(path, train.X[idx], train.y[idx], names, texts=texts)
        paths.append(path)
    test_path = work / f"test.{fmt}"
    fl_datasets.write_table(test_path, test.X, test.y, names, texts=test.texts)
    return paths, test_path


def partition_sizes(paths: list[Path]) -> list[int]:
    """Rows per node file (for summaries and sanity checks)."""
    from p2pfl.fl.datasets import load_table

    return [int(load_table(p)[1].shape[0]) for p in paths]
