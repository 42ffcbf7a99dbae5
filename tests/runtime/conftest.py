"""Fixtures of the runtime tests; the taskpacks and the harness live in runtime_helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import (
    ANALYSIS_TASK,
    IMPORT_ERROR,
    MISC_TASK,
    NO_TASK,
    TRAIN_HELPER,
    TRAIN_TASK,
    TWO_TASKS,
    Harness,
    make_pack,
)

from p2pfl.runtime import ChildProcessRunner


@pytest.fixture
def packs(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "packs"
    return {
        "train": make_pack(root, "train", TRAIN_TASK, helper=TRAIN_HELPER),
        "analysis": make_pack(root, "analysis", ANALYSIS_TASK),
        "misc": make_pack(root, "misc", MISC_TASK),
        "none": make_pack(root, "none", NO_TASK),
        "two": make_pack(root, "two", TWO_TASKS),
        "importerror": make_pack(root, "importerror", IMPORT_ERROR),
    }


@pytest.fixture
def data_csv(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    y = x @ np.array([1.5, -2.0]) + 0.5
    path = tmp_path / "data" / "points.csv"
    path.parent.mkdir()
    np.savetxt(path, np.column_stack([x, y]), delimiter=",")
    return path


@pytest.fixture(params=["inprocess", "child"])
async def runner(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    tmp_root = tmp_path / "runtime-tmp"
    tmp_root.mkdir()
    h = Harness(request.param, tmp_root)
    try:
        yield h
    finally:
        await h.aclose()


@pytest.fixture
async def child(tmp_path: Path) -> AsyncIterator[ChildProcessRunner]:
    tmp_root = tmp_path / "child-tmp"
    tmp_root.mkdir()
    r = ChildProcessRunner(tmp_root=tmp_root)
    try:
        yield r
    finally:
        await r.aclose()
