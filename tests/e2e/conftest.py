"""Fixtures for end-to-end tests: real node processes, always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster, split_digits, wait_until


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def digits_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`p2pfl datasets split digits --nodes 3`: node-<i>/digits.csv and test.csv."""
    return split_digits(tmp_path_factory.mktemp("split"), nodes=3)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Cluster under a short temp dir; every process it started is gone afterwards."""
    c = Cluster(tmp_path_factory.mktemp("c"))
    try:
        yield c
    finally:
        c.close()
        # Everything was SIGKILLed by pid or group; give the kernel a moment, then insist.
        try:
            wait_until(lambda: not c.leaked(), 10.0, what="all cluster processes gone")
        except TimeoutError:
            pytest.fail(f"processes leaked past teardown: {c.leaked()}")
