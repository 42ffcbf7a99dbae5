"""Glue: scenario -> node data -> the cluster (real node code, simulated network) -> report.

    summary = run_scenario(load_scenario("scenarios/quickstart.yaml"), seed=1,
                           out_dir="runs/quickstart-1")

The cluster itself (p2pfl.sim.cluster) belongs to the lead; this module only builds its
spec, drives `cluster.run()` (which yields one RoundRecord per node per round as rounds
complete) and writes what it yields. `cluster_factory` lets tests and benchmarks put a
stand-in cluster in its place.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from p2pfl.errors import ValidationError
from p2pfl.sim.data import prepare_node_data
from p2pfl.sim.report import RecordLike, Summary, summarize, write_report, write_rounds_csv
from p2pfl.sim.scenario import Scenario

NETWORKS = ("sim", "libp2p")

# progress(record, phase): record is None for phase changes ("data", "cluster", "report",
# "done"); otherwise phase is "round" and record is the RoundRecord just yielded.
Progress = Callable[[RecordLike | None, str], None]


class ClusterLike(Protocol):
    def run(self) -> Any: ...  # an iterator of RoundRecord

    @property
    def result(self) -> Mapping[str, Any]: ...

    @property
    def virtual_s(self) -> float: ...

    @property
    def final_test_metrics(self) -> Mapping[str, float]: ...


ClusterFactory = Callable[[dict[str, Any]], ClusterLike]


def default_out_dir(scenario: Scenario, seed: int) -> Path:
    return Path("runs") / f"{scenario.name}-{seed}"


def input_name(scenario: Scenario) -> str:
    """The name the node data go by: the taskpack's one declared input (the manifest asks
    for it by that name), else the dataset's name."""
    import yaml

    try:
        manifest = yaml.safe_load((scenario.taskpack / "manifest.yaml").read_text(encoding="utf-8"))
        inputs = manifest["spec"]["inputs"]
        if isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0]["name"], str):
            return inputs[0]["name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, IndexError):
        pass  # no readable manifest: the cluster will say what is wrong with the taskpack
    return scenario.dataset.name


def cluster_spec_kwargs(
    scenario: Scenario,
    *,
    seed: int,
    network: str,
    node_data: list[Path],
    test_path: Path,
) -> dict[str, Any]:
    """The keyword arguments of p2pfl.sim.cluster.ClusterSpec for this scenario."""
    topology = scenario.topology.as_dict()
    params = scenario.params.as_dict()
    if scenario.topology.kind == "hierarchical":
        # A full mesh whose rounds aggregate in groups of group_size (core/hierarchy.py).
        topology = {"kind": "full"}
        params["aggregation"] = {"kind": "hierarchical", "group_size": scenario.topology.group_size}
    return {
        "seed": seed,
        "nodes": scenario.nodes,
        "topology": topology,
        "link": scenario.network.as_dict(),
        "taskpack_dir": scenario.taskpack,
        "node_data": list(node_data),
        "input_name": input_name(scenario),
        "params": params,
        "faults": [f.as_dict() for f in scenario.faults],
        "byzantine": None if scenario.byzantine is None else scenario.byzantine.as_dict(),
        "dp": None if scenario.dp is None else scenario.dp.as_dict(),
        "test_path": test_path,
        "network": network,
    }


def sim_cluster(kwargs: dict[str, Any]) -> ClusterLike:
    """The real cluster: p2pfl.sim.cluster.SimCluster(ClusterSpec(**kwargs))."""
    from p2pfl.sim.cluster import ClusterSpec, SimCluster

    if dataclasses.is_dataclass(ClusterSpec):
        known = {f.name for f in dataclasses.fields(ClusterSpec)}
        if "network" not in known:
            # A spec without the field only knows the simulated network.
            if kwargs.get("network", "sim") != "sim":
                raise ValidationError(
                    [f"network: {kwargs['network']!r} is not supported by this cluster"], "run"
                )
            kwargs = {k: v for k, v in kwargs.items() if k != "network"}
    if kwargs.get("network") == "libp2p":  # real hosts on 127.0.0.1: p2pfl.sim.live
        from p2pfl.sim.live import LiveCluster

        return LiveCluster(ClusterSpec(**kwargs))  # type: ignore[return-value]
    return SimCluster(ClusterSpec(**kwargs))  # type: ignore[return-value]


def run_scenario(
    scenario: Scenario,
    *,
    seed: int | None = None,
    network: str = "sim",
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    cluster_factory: ClusterFactory | None = None,
    plots: bool = True,
    keep_data: bool = False,
) -> Summary:
    """Run one scenario to completion and write its report into `out_dir`.

    `seed` defaults to the scenario's; `out_dir` to runs/<name>-<seed>/. Node data go to
    a temporary directory (or `out_dir/data` with keep_data=True). If the cluster fails
    mid-run, the rounds gathered so far are still written to rounds.csv, then the error
    propagates.
    """
    if network not in NETWORKS:
        raise ValidationError(
            [f"network: must be one of {', '.join(NETWORKS)}, got {network!r}"], "run"
        )
    seed = scenario.seed if seed is None else seed
    out = Path(out_dir) if out_dir is not None else default_out_dir(scenario, seed)
    out.mkdir(parents=True, exist_ok=True)
    factory = cluster_factory or sim_cluster
    report = progress or (lambda _record, _phase: None)

    started = time.perf_counter()
    data_dir = out / "data" if keep_data else Path(tempfile.mkdtemp(prefix="p2pfl-sim-data-"))
    records: list[RecordLike] = []
    try:
        report(None, "data")
        node_paths, test_path = prepare_node_data(scenario, seed, data_dir)
        report(None, "cluster")
        kwargs = cluster_spec_kwargs(
            scenario, seed=seed, network=network, node_data=node_paths, test_path=test_path
        )
        cluster = factory(kwargs)
        try:
            for record in cluster.run():
                records.append(record)
                report(record, "round")
        except BaseException:
            if records:
                write_rounds_csv(out / "rounds.csv", records)
            raise
        wall_s = time.perf_counter() - started
        report(None, "report")
        summary = summarize(
            scenario=scenario.name,
            seed=seed,
            nodes=scenario.nodes,
            rounds=scenario.rounds,
            network=network,
            records=records,
            wall_s=wall_s,
            virtual_s=_maybe(cluster, "virtual_s"),
            test=_maybe(cluster, "final_test_metrics") or {},
            result=_maybe(cluster, "result") or {},
            out_dir=out,
            warnings=list(_maybe(cluster, "warnings") or []),
        )
        write_report(out, summary, records, plots=plots)
        if scenario.source is not None and scenario.source.is_file():
            shutil.copyfile(scenario.source, out / "scenario.yaml")
        report(None, "done")
        return summary
    finally:
        if not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


def _maybe(obj: Any, attr: str) -> Any:
    """An optional cluster attribute: a missing one (or one that raises) reads as None."""
    try:
        return getattr(obj, attr)
    except Exception:  # noqa: BLE001 - a report must not die on an optional figure
        return None
