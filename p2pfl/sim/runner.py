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

from p2pfl.errors import LocalProtocolError, ValidationError
from p2pfl.fsutil import atomic_write
from p2pfl.sim.checks import sim_input
from p2pfl.sim.data import prepare_node_data
from p2pfl.sim.report import PLOT_FILES, RecordLike, Summary, summarize, write_report
from p2pfl.sim.scenario import EXECUTORS, Executor, Scenario

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
    for it by that name), else the dataset's name. A flow's: the first dataset it names."""
    if scenario.flow is not None:
        from p2pfl.flow.spec import load_flow

        datasets = load_flow(scenario.flow).datasets
        return datasets[0] if datasets else scenario.dataset.name
    return sim_input(scenario.taskpack, scenario.dataset.name).name


# What a run writes into its folder (and `--force` removes from an earlier run's).
RUN_FILES = ("rounds.csv", "summary.json", "scenario.yaml", *PLOT_FILES)


def claim_out_dir(out: Path, force: bool) -> None:
    """Refuse to write over an earlier run unless `force`; with it, remove that run's files
    (only those a run writes: anything else in the folder stays)."""
    if out.exists() and not out.is_dir():
        raise LocalProtocolError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise LocalProtocolError(
            f"{out} already holds a run (or other files); pass --force to replace it, "
            "or choose another --out"
        )
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "data", ignore_errors=True)


def cluster_spec_kwargs(
    scenario: Scenario,
    *,
    seed: int,
    network: str,
    node_data: list[Path],
    test_path: Path,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """The keyword arguments of p2pfl.sim.cluster.ClusterSpec for this scenario."""
    topology = scenario.topology.as_dict()
    params = scenario.params.as_dict()
    if scenario.topology.kind == "hierarchical":
        # A full mesh whose rounds aggregate in groups of group_size (core/hierarchy.py).
        topology = {"kind": "full"}
        params["aggregation"] = {"kind": "hierarchical", "group_size": scenario.topology.group_size}
    kwargs = {
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
        **({"flow": scenario.flow} if scenario.flow is not None else {}),
        **(
            {
                "rollout": scenario.rollout.spec(),
                "extra_taskpacks": [path for _, path in scenario.rollout.taskpacks],
            }
            if scenario.rollout is not None
            else {}
        ),
    }
    chosen = executor or scenario.executor
    if chosen.kind != "local":  # a local run's spec stays what it always was
        kwargs["executor"] = chosen.as_dict()
    return kwargs


def choose_executor(
    scenario: Scenario, network: str, executor: str | None, ray_address: str | None
) -> Executor:
    """The scenario's executor with --executor / --ray-address applied, checked: Ray runs
    jobs of --network sim only, and must be installed (ImportError naming the extra)."""
    chosen = scenario.executor
    if executor is not None:
        if executor not in EXECUTORS:
            raise ValidationError(
                [f"executor: must be one of {', '.join(EXECUTORS)}, got {executor!r}"], "run"
            )
        if executor != chosen.kind:
            chosen = Executor(kind=executor)
    if ray_address is not None:
        if chosen.kind != "ray":
            raise ValidationError(["--ray-address: only with the ray executor"], "run")
        chosen = dataclasses.replace(chosen, address=ray_address)
    if chosen.kind == "ray":
        if network != "sim":
            raise ValidationError(
                [f"executor: ray runs the jobs of --network sim only, not {network!r}"], "run"
            )
        from p2pfl.sim.ray_executor import import_ray

        import_ray()
    return chosen


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
    if kwargs.get("flow") is not None:  # a whole flow: p2pfl.sim.flowsim
        if kwargs.get("network", "sim") != "sim":
            raise ValidationError(["flow: runs on --network sim only"], "run")
        from p2pfl.sim.flowsim import FlowSimCluster

        spec = ClusterSpec(**{**kwargs, "test_path": None})
        return FlowSimCluster(spec, kwargs["flow"])  # type: ignore[return-value]
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
    force: bool = False,
    executor: str | None = None,
    ray_address: str | None = None,
) -> Summary:
    """Run one scenario to completion and write its report into `out_dir`.

    `seed` defaults to the scenario's; `out_dir` to runs/<name>-<seed>/, which must not
    hold an earlier run unless `force`. Node data go to a temporary directory (or
    `out_dir/data` with keep_data=True). A run that stops early leaves whole files only:
    the rounds gathered so far and a summary whose status is `interrupted` (Ctrl-C) or
    `errored` (the reason says why); then the exception propagates. A run that stops
    before its first round leaves no folder behind. `executor` ("local" | "ray") and
    `ray_address` override the scenario's `executor:` section.
    """
    if network not in NETWORKS:
        raise ValidationError(
            [f"network: must be one of {', '.join(NETWORKS)}, got {network!r}"], "run"
        )
    chosen = choose_executor(scenario, network, executor, ray_address)
    seed = scenario.seed if seed is None else seed
    out = Path(out_dir) if out_dir is not None else default_out_dir(scenario, seed)
    claim_out_dir(out, force)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    factory = cluster_factory or sim_cluster
    report = progress or (lambda _record, _phase: None)

    started = time.perf_counter()
    data_dir = out / "data" if keep_data else Path(tempfile.mkdtemp(prefix="p2pfl-sim-data-"))
    records: list[RecordLike] = []
    cluster: ClusterLike | None = None

    def summary(status: str | None = None, reason: str = "") -> Summary:
        done = summarize(
            scenario=scenario.name,
            seed=seed,
            nodes=scenario.nodes,
            rounds=scenario.rounds,
            network=network,
            records=records,
            wall_s=time.perf_counter() - started,
            virtual_s=_maybe(cluster, "virtual_s"),
            test=_maybe(cluster, "final_test_metrics") or {},
            result=_maybe(cluster, "result") or {},
            out_dir=out,
            warnings=list(_maybe(cluster, "warnings") or []),
        )
        return done if status is None else dataclasses.replace(done, status=status, reason=reason)

    try:
        report(None, "data")
        node_paths, test_path = prepare_node_data(
            scenario, seed, data_dir, sim_input(scenario.taskpack, scenario.dataset.name).format
        )
        report(None, "cluster")
        kwargs = cluster_spec_kwargs(
            scenario,
            seed=seed,
            network=network,
            node_data=node_paths,
            test_path=test_path,
            executor=chosen,
        )
        cluster = factory(kwargs)
        for record in cluster.run():
            records.append(record)
            report(record, "round")
        report(None, "report")
        done = summary()
        write_report(out, done, records, plots=plots)
        _copy_scenario(scenario, out)
        report(None, "done")
        return done
    except BaseException as exc:
        if records:  # what was measured is kept, whole, and marked as incomplete
            last = max(r.round for r in records)
            if isinstance(exc, KeyboardInterrupt):
                status, reason = "interrupted", f"interrupted (Ctrl-C) during round {last}"
            else:
                status, reason = "errored", f"stopped during round {last}: {_one_line(exc)}"
            write_report(out, summary(status, reason), records, plots=False)
            _copy_scenario(scenario, out)
        elif created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


def _copy_scenario(scenario: Scenario, out: Path) -> None:
    if scenario.source is not None and scenario.source.is_file():
        atomic_write(out / "scenario.yaml", scenario.source.read_bytes())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _maybe(obj: Any, attr: str) -> Any:
    """An optional cluster attribute: a missing one (or one that raises) reads as None."""
    try:
        return getattr(obj, attr)
    except Exception:  # noqa: BLE001 - a report must not die on an optional figure
        return None
