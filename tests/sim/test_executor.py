"""The executor choice without Ray: scenario and CLI options, the one-line error when Ray
is missing, the event order of jobs that run elsewhere, and the Ray actor's body."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from click.testing import CliRunner

from p2pfl.cli.sim_cmds import experiment_cmd, simulate_cmd
from p2pfl.errors import LocalProtocolError, ValidationError
from p2pfl.net.sim import SimHub
from p2pfl.runtime import InitialWeights, InProcessRunner, JobError, JobOutput, TaskSpec, Train
from p2pfl.runtime.protocol import encode_job, encode_spec
from p2pfl.sim import cluster as sim_cluster_mod, runner
from p2pfl.sim.ray_executor import INSTALL_HINT, JobHost
from p2pfl.sim.scenario import Executor, apply_override, load_raw, parse, scenario_problems

from .fakes import FakeCluster
from .test_experiment import write_scenario

REPO = Path(__file__).resolve().parents[2]
TASKPACK = REPO / "taskpacks" / "fedavg-mlp-digits"


def base() -> dict[str, Any]:
    return {
        "name": "x",
        "nodes": 4,
        "dataset": {"name": "digits"},
        "taskpack": "taskpacks/fedavg-mlp-digits",
        "params": {"rounds": 1},
    }


# --- the scenario's executor section ---------------------------------------------


def test_executor_section_parses_and_defaults_to_local() -> None:
    assert parse(base(), check_files=False).executor == Executor("local", None, 1.0)
    raw = {**base(), "executor": {"kind": "ray", "address": "auto", "cpus_per_job": 0.5}}
    ex = parse(raw, check_files=False).executor
    assert ex == Executor("ray", "auto", 0.5)
    assert ex.as_dict() == {"kind": "ray", "address": "auto", "cpus_per_job": 0.5}


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"kind": "spark"}, "executor.kind: unknown kind 'spark' (one of: local, ray)"),
        ({"address": "auto"}, "executor.kind: required"),
        ({"kind": "ray", "cpus_per_job": 0}, "executor.cpus_per_job: must be > 0, got 0"),
        ({"kind": "ray", "address": 7}, "executor.address: must be a Ray address (auto, HOST:PORT), got 7"),
        ({"kind": "local", "address": "auto"}, "executor: address and cpus_per_job are for kind: ray"),
        ({"kind": "ray", "gpus": 1}, "executor.gpus: unknown key (known: kind, address, cpus_per_job)"),
        ("ray", "executor: must be a mapping"),
    ],
)  # fmt: skip
def test_executor_section_problems(section: Any, problem: str) -> None:
    assert scenario_problems({**base(), "executor": section}) == [problem]


# --- choosing an executor for a run --------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import ray` fails, as on an install without the [ray] extra."""
    monkeypatch.setitem(sys.modules, "ray", None)


def test_choose_executor_applies_the_command_line(no_ray: None) -> None:
    scenario = parse(base(), check_files=False)
    assert runner.choose_executor(scenario, "sim", None, None).kind == "local"
    assert runner.choose_executor(scenario, "sim", "local", None).kind == "local"
    with pytest.raises(ValidationError, match="--ray-address: only with the ray executor"):
        runner.choose_executor(scenario, "sim", None, "auto")
    with pytest.raises(ValidationError, match="ray runs the jobs of --network sim only"):
        runner.choose_executor(scenario, "libp2p", "ray", None)
    with pytest.raises(ImportError) as info:
        runner.choose_executor(scenario, "sim", "ray", "auto")
    assert str(info.value) == INSTALL_HINT and "\n" not in INSTALL_HINT
    assert "pip install -e '.[ray]'" in INSTALL_HINT


def test_scenario_ray_with_command_line_local_needs_no_ray(no_ray: None) -> None:
    raw = {**base(), "executor": {"kind": "ray", "address": "auto"}}
    scenario = parse(raw, check_files=False)
    assert runner.choose_executor(scenario, "sim", "local", None) == Executor()
    with pytest.raises(ImportError, match="needs Ray"):
        runner.choose_executor(scenario, "sim", None, None)


def test_cluster_spec_names_the_executor_only_when_not_local(tmp_path: Path) -> None:
    scenario = parse(base(), check_files=False)
    common: dict[str, Any] = {"seed": 1, "network": "sim", "node_data": [], "test_path": tmp_path}
    assert "executor" not in runner.cluster_spec_kwargs(scenario, **common)
    ray = Executor("ray", "10.0.0.1:6379", 2.0)
    kwargs = runner.cluster_spec_kwargs(scenario, **common, executor=ray)
    assert kwargs["executor"] == {"kind": "ray", "address": "10.0.0.1:6379", "cpus_per_job": 2.0}


@pytest.fixture
def fake_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCluster.instances.clear()
    monkeypatch.setattr(runner, "sim_cluster", FakeCluster)


def test_cli_executor_ray_without_ray_is_one_line(
    tmp_path: Path, fake_cluster: None, no_ray: None
) -> None:
    path = write_scenario(tmp_path)
    for cmd, extra in ((simulate_cmd, []), (experiment_cmd, ["--vary", "seed=1,2"])):
        res = CliRunner().invoke(
            cmd, [str(path), *extra, "--out", str(tmp_path / "o"), "--executor", "ray"]
        )
        assert res.exit_code == 1
        assert res.stderr.strip() == f"Error: {INSTALL_HINT}"
    assert FakeCluster.instances == []  # nothing ran, no data prepared
    assert not (tmp_path / "o" / "rounds.csv").exists()


def test_cli_executor_local_reaches_the_cluster(tmp_path: Path, fake_cluster: None) -> None:
    path = write_scenario(tmp_path, executor={"kind": "ray"})
    res = CliRunner().invoke(
        simulate_cmd, [str(path), "--out", str(tmp_path / "o"), "--executor", "local", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["nodes"] == 4
    assert "executor" not in FakeCluster.instances[0].spec  # local: the spec as it always was


def test_cli_help_lists_the_executor_options() -> None:
    for cmd in (simulate_cmd, experiment_cmd):
        text = CliRunner().invoke(cmd, ["--help"]).output
        assert "--executor [local|ray]" in text and "--ray-address ADDR" in text


# --- the event order of jobs that run elsewhere ----------------------------------------


def test_reserved_seq_orders_a_late_entry_where_it_was_reserved() -> None:
    hub = SimHub()
    order: list[str] = []
    hub.call_at(1.0, lambda: order.append("a"))
    seq = hub.reserve_seq()
    hub.call_at(1.0, lambda: order.append("c"))
    hub.call_at(1.0, lambda: order.append("b"), seq=seq)  # pushed last, reserved second
    hub.run()
    assert order == ["a", "b", "c"]
    with pytest.raises(LocalProtocolError, match="never reserved"):
        hub.call_at(2.0, lambda: None, seq=hub.reserve_seq() + 1)


class DeferredPool:
    """A real pool whose jobs run only when waited for: the furthest a job elsewhere can
    lag. A run with it must match the in-process one byte for byte."""

    def __init__(self) -> None:
        self.inner = InProcessRunner()
        self.submitted = 0

    def submit(self, spec: TaskSpec, job: Any) -> Callable[[], tuple[Any, str | None]]:
        self.submitted += 1

        def wait() -> tuple[JobOutput | None, str | None]:
            try:
                return self.inner.run(spec, job), None
            except JobError as e:
                return None, e.reason

        return wait

    def run(self, spec: TaskSpec, job: Any) -> JobOutput:
        return self.inner.run(spec, job)

    def close_task(self, task_id: str, node: str) -> None:
        self.inner.close_task(task_id, node)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow  # two real 5-node runs with a crash and a restart, about 6 s
def test_deferred_jobs_give_the_same_run_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = load_raw(REPO / "scenarios/quickstart.yaml")
    for key, value in (
        ("nodes", 5),
        ("params.rounds", 3),
        ("faults", [{"round": 2, "crash": [3]}, {"round": 3, "restart": [3]}]),
    ):
        raw = apply_override(raw, key, value)
    scenario = parse(raw, base_dir=REPO / "scenarios")
    local = runner.run_scenario(scenario, out_dir=tmp_path / "local", plots=False)
    pools: list[DeferredPool] = []

    def deferred(_executor: dict[str, Any]) -> DeferredPool:
        pools.append(DeferredPool())
        return pools[-1]

    monkeypatch.setattr(sim_cluster_mod, "make_pool", deferred)
    later = runner.run_scenario(scenario, out_dir=tmp_path / "deferred", plots=False)
    assert pools and pools[0].submitted > 5 * 3  # every node's jobs went through submit
    csv = (tmp_path / "local/rounds.csv").read_bytes()
    assert csv == (tmp_path / "deferred/rounds.csv").read_bytes()
    assert local.result["model_cid"] == later.result["model_cid"]
    assert local.virtual_s == later.virtual_s and local.test == later.test
    assert b",0\n" in csv  # the crash shows: node 3 missed a round


# --- the Ray actor's body, run here ------------------------------------------------


def _request(spec: TaskSpec, job: Any) -> bytes:
    return bytes(msgpack.packb({"spec": encode_spec(spec), "job": encode_job(job)}))


def _spec(data: Path) -> TaskSpec:
    return TaskSpec(
        task_id="ab" * 32,
        node="n1",
        taskpack_dir=TASKPACK,  # the simulation's path: the host maps it to its copy
        params={"rounds": 1, "hidden": [8]},
        inputs={"digits": data},
        seed=7,
    )


@pytest.fixture
def digits_file(tmp_path: Path) -> Path:
    from p2pfl.fl.datasets import load_dataset, write_table

    ds = load_dataset("digits")
    path = tmp_path / "node-0000.npz"
    write_table(path, ds.X[:80], ds.y[:80], list(ds.feature_names))
    return path


def test_job_host_runs_jobs_like_the_in_process_runner(digits_file: Path) -> None:
    from p2pfl.sim.ray_executor import _read_tree

    host = JobHost()
    try:
        host.put_tree(str(TASKPACK), _read_tree(TASKPACK))
        host.put_file(str(digits_file), digits_file.read_bytes())
        spec = _spec(digits_file)
        reply = msgpack.unpackb(host.run(_request(spec, InitialWeights())))
        assert reply["ok"], reply
        weights = reply["result"]
        train = msgpack.unpackb(host.run(_request(spec, Train(1, weights))))
        assert train["ok"], train
        with InProcessRunner() as local:
            assert local.run(spec, InitialWeights()).result == weights
            expected = local.run(spec, Train(1, weights)).result
        assert train["result"]["update"] == expected.update
        assert train["result"]["num_samples"] == expected.num_samples
        assert train["result"]["metrics"] == expected.metrics
    finally:
        host.close()


def test_job_host_refuses_paths_it_was_not_given(digits_file: Path, tmp_path: Path) -> None:
    host = JobHost()
    try:
        reply = msgpack.unpackb(host.run(_request(_spec(digits_file), InitialWeights())))
        assert not reply["ok"] and "holds no copy of" in reply["reason"]
        for bad in ("../evil.py", "/etc/passwd", "src/../../x"):
            with pytest.raises(ValueError, match="refusing the path"):
                host.put_tree("t", [(bad, b"x")])
        garbage = msgpack.unpackb(host.run(b"\x93\x01\x02\x03"))
        assert not garbage["ok"] and garbage["reason"]
    finally:
        host.close()
