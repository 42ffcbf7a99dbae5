"""Simulated nodes' jobs on a real (local) Ray: the same run as in process, bit for bit.

Needs the [ray] extra (`pip install -e '.[ray]'`; .ci/run installs it and runs this file).
Ray starts once for the module (`ray.init(num_cpus=2)`) and is shut down at its end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from p2pfl.cli.sim_cmds import simulate_cmd
from p2pfl.sim.cluster import ClusterSpec, SimCluster
from p2pfl.sim.ray_executor import RayExecutor
from p2pfl.sim.runner import ClusterLike, run_scenario
from p2pfl.sim.scenario import apply_override, load_raw, parse

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def quickstart(tmp: Path, **over: Any) -> Path:
    raw = load_raw(REPO / "scenarios/quickstart.yaml")
    for key, value in over.items():
        raw = apply_override(raw, key.replace("__", "."), value)
    path = tmp / "scenario.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "rounds.csv").read_bytes()).hexdigest()


@pytest.mark.slow  # a 16-node run twice (in process, then on Ray): about 30 s
def test_16_nodes_on_ray_match_the_local_executor_bit_for_bit(tmp_path: Path) -> None:
    path = quickstart(
        tmp_path,
        nodes=16,
        params__rounds=3,
        topology={"kind": "random-regular", "degree": 4},
        faults=[{"round": 2, "crash": [5]}, {"round": 3, "restart": [5]}],
    )
    scenario = parse(load_raw(path), base_dir=REPO / "scenarios", source=path)
    local = run_scenario(scenario, out_dir=tmp_path / "local", plots=False)
    clusters: list[SimCluster] = []

    def capture(kwargs: dict[str, Any]) -> ClusterLike:
        clusters.append(SimCluster(ClusterSpec(**kwargs)))
        return clusters[-1]  # type: ignore[return-value]

    on_ray = run_scenario(
        scenario, out_dir=tmp_path / "ray", plots=False, executor="ray", cluster_factory=capture
    )
    pool = clusters[0].runner
    assert isinstance(pool, RayExecutor)
    assert pool.jobs >= 16 * 3  # every node trained on Ray, every round
    assert pool.hosts == 0  # the actors ended with the run
    assert not local.failed and not on_ray.failed, (local.reason, on_ray.reason)
    assert digest(tmp_path / "local") == digest(tmp_path / "ray")
    assert on_ray.result["model_cid"] == local.result["model_cid"]
    assert on_ray.test == local.test and on_ray.test["accuracy"] > 0.5
    assert on_ray.virtual_s == local.virtual_s
    assert on_ray.final == local.final and on_ray.bytes_sent_total == local.bytes_sent_total


@pytest.mark.slow  # two 4-node runs through the CLI
def test_cli_simulate_executor_ray_gives_the_local_summary(tmp_path: Path) -> None:
    path = quickstart(tmp_path, nodes=4, params__rounds=2)
    summaries = {}
    for executor in ("local", "ray"):
        res = CliRunner().invoke(
            simulate_cmd,
            [str(path), "--out", str(tmp_path / executor), "--json", "--no-plots"]
            + ["--executor", executor],
        )
        assert res.exit_code == 0, res.output
        summaries[executor] = json.loads(res.stdout)
    for key in ("final", "test", "result", "bytes_sent_total", "virtual_s"):
        assert summaries["ray"][key] == summaries["local"][key], key
    assert digest(tmp_path / "local") == digest(tmp_path / "ray")


def test_executor_uses_the_running_ray_and_spreads_nodes() -> None:
    with RayExecutor(cpus_per_job=1) as pool:
        assert pool.hosts == 2  # num_cpus=2 / cpus_per_job=1
        assert [pool._host(f"n{i}") for i in range(5)] == [0, 1, 0, 1, 0]
        assert pool._host("n0") == 0  # a node keeps its host
    with RayExecutor(cpus_per_job=0.5, hosts=3) as pool:
        assert pool.hosts == 3
    with pytest.raises(ValueError, match="cpus_per_job must be > 0"):
        RayExecutor(cpus_per_job=0)
