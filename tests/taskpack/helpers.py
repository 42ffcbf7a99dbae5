"""Shared builders for the taskpack tests."""

from __future__ import annotations

import copy
import io
import tarfile
from pathlib import Path
from typing import Any

import yaml

VALID: dict[str, Any] = {
    "apiVersion": "p2pfl/v1",
    "kind": "TaskPackage",
    "metadata": {
        "name": "wages-logreg",
        "version": "1.2.0",
        "author": "Ada",
        "description": "Logistic regression on wages",
    },
    "spec": {
        "type": "training",
        "framework": "numpy",
        "requirements": {"python": ">=3.11", "gpu": "none", "memory": "512Mi", "storage": "1Gi"},
        "inputs": [{"name": "wages", "type": "tabular", "format": "csv"}],
        "outputs": [{"name": "model", "type": "weights", "format": "npz"}],
        "federated": {
            "protocol": "fedprox",
            "rounds": 3,
            "local_epochs": 2,
            "mu": 0.01,
            "min_nodes": 2,
            "max_nodes": 5,
            "aggregator": "median",
            "deadline_s": 60,
            "differential_privacy": {"enabled": True, "epsilon": 3.0},
        },
    },
    "limits": {"cpu_seconds": 60, "memory": "1Gi", "timeout_s": 120},
}


def manifest_doc(**changes: Any) -> dict[str, Any]:
    """A deep copy of VALID with dotted-key changes; value None deletes the key."""
    doc = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        parts = dotted.split("__")
        node = doc
        for part in parts[:-1]:
            node = node[part]
        if value is None:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    return doc


def manifest_yaml(doc: dict[str, Any] | None = None) -> bytes:
    return yaml.safe_dump(doc if doc is not None else VALID, sort_keys=False).encode()


def write_tree(root: Path, files: dict[str, bytes], manifest: bytes | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.yaml").write_bytes(manifest if manifest is not None else manifest_yaml())
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def raw_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """An archive with exactly these members (for crafting hostile archives)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info
