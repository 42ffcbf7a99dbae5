from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from p2pfl.sim.report import ROUND_COLUMNS, round_stats, rounds_csv_text
from p2pfl.sim.runner import input_name, run_scenario
from p2pfl.sim.scenario import parse

from .fakes import ExplodingCluster, FakeCluster, FakeRecord


def scenario(**over: object):
    raw = {
        "name": "fake",
        "seed": 4,
        "nodes": 4,
        "dataset": {"name": "digits", "partition": {"kind": "iid"}},
        "taskpack": "taskpacks/fake",
        "params": {"rounds": 3},
        "faults": [{"round": 2, "crash": [1]}],
        "dp": {"epsilon": 8.0},
    }
    raw.update(over)
    return parse(raw, check_files=False)


def test_rounds_csv_format_and_order() -> None:
    recs = [
        FakeRecord(1, 1, 0.5, 1.25, 10, 20, None, True),
        FakeRecord(0, 2, None, None, 0, 0, None, False),
        FakeRecord(0, 1, 1 / 3, 2.0, 11, 21, 0.123456789, True),
    ]
    assert rounds_csv_text(recs) == (
        "node,round,accuracy,loss,bytes_sent,bytes_received,epsilon,alive\n"
        "0,1,0.333333,2.000000,11,21,0.123457,1\n"
        "1,1,0.500000,1.250000,10,20,,1\n"
        "0,2,,,0,0,,0\n"
    )
    stats = round_stats(recs)
    assert [(s.round, s.alive, s.bytes_sent) for s in stats] == [(1, 2, 21), (2, 0, 0)]
    assert stats[0].accuracy_min == pytest.approx(1 / 3) and stats[1].accuracy_mean is None


def test_run_writes_report_and_is_deterministic(tmp_path: Path) -> None:
    seen: list[str] = []
    s = scenario()
    a = run_scenario(s, out_dir=tmp_path / "a", cluster_factory=FakeCluster,
                     progress=lambda rec, phase: seen.append(phase))  # fmt: skip
    b = run_scenario(s, out_dir=tmp_path / "b", cluster_factory=FakeCluster)
    csv_a = (tmp_path / "a/rounds.csv").read_bytes()
    assert csv_a == (tmp_path / "b/rounds.csv").read_bytes()
    c = run_scenario(s, seed=5, out_dir=tmp_path / "c", cluster_factory=FakeCluster)
    assert (tmp_path / "c/rounds.csv").read_bytes() != csv_a
    assert c.seed == 5 and a.seed == 4

    rows = list(csv.DictReader((tmp_path / "a/rounds.csv").open()))
    assert tuple(rows[0]) == ROUND_COLUMNS
    assert len(rows) == 4 * 3
    assert [r["alive"] for r in rows if r["node"] == "1"] == ["1", "0", "0"]

    summary = json.loads((tmp_path / "a/summary.json").read_text())
    for key in ("scenario", "seed", "nodes", "rounds", "network", "final", "bytes_sent_total",
                "wall_s", "virtual_s", "result", "test"):  # fmt: skip
        assert key in summary
    assert summary["final"].keys() >= {"accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean"}
    assert (summary["scenario"], summary["seed"], summary["nodes"], summary["rounds"]) == (
        "fake",
        4,
        4,
        3,
    )
    assert summary["network"] == "sim" and summary["virtual_s"] == 4.5
    assert summary["bytes_sent_total"] == sum(int(r["bytes_sent"]) for r in rows)
    assert summary["bytes_sent_per_round"] == pytest.approx(
        summary["bytes_sent_total"] / 3, abs=0.1
    )
    assert summary["result"]["model_cid"] == "0102"  # bytes made JSON-able
    assert summary["epsilon_max"] == pytest.approx(8.0)
    # Final stats come from the last round's live nodes only (node 1 is down).
    last = [float(r["accuracy"]) for r in rows if r["round"] == "3" and r["alive"] == "1"]
    assert summary["final"]["accuracy_min"] == pytest.approx(min(last), abs=1e-6)
    assert a.final == b.final

    for png in ("accuracy.png", "loss.png", "bytes.png"):
        assert (tmp_path / "a" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen[:2] == ["data", "cluster"] and seen.count("round") == 12 and seen[-1] == "done"
    assert not list((tmp_path / "a").glob(".*.tmp"))  # atomic writes leave no temp files


def test_spec_passed_to_cluster(tmp_path: Path) -> None:
    FakeCluster.instances.clear()
    run_scenario(
        scenario(), network="libp2p", out_dir=tmp_path, cluster_factory=FakeCluster, plots=False
    )
    spec = FakeCluster.instances[-1].spec
    assert spec["network"] == "libp2p" and spec["nodes"] == 4 and spec["seed"] == 4
    assert spec["input_name"] == "digits" and len(spec["node_data"]) == 4
    assert spec["faults"] == [{"round": 2, "crash": [1]}]
    assert spec["dp"] == {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}
    assert spec["topology"]["kind"] == "full" and spec["link"]["latency_ms"] == 20.0
    assert not Path(spec["test_path"]).exists()  # temporary node data are cleaned up


def test_input_name_comes_from_the_manifest(tmp_path: Path) -> None:
    from p2pfl.taskpack.scaffold import new_taskpack

    pack = new_taskpack("tp", "training", tmp_path)  # one input: `tabular`, format csv
    s = scenario(taskpack=str(pack))
    assert input_name(s) == "tabular"
    assert input_name(scenario()) == "digits"  # no manifest: the dataset's name


def test_failed_task_is_marked(tmp_path: Path) -> None:
    class Failing(FakeCluster):
        def run(self):  # type: ignore[no-untyped-def]
            yield from super().run()
            self.result = {"status": "failed", "reason": "no volunteers"}

    summary = run_scenario(scenario(), out_dir=tmp_path, cluster_factory=Failing, plots=False)
    assert summary.failed and summary.reason == "no volunteers"


def test_a_run_that_errors_leaves_whole_files_marked_errored(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        run_scenario(scenario(), out_dir=tmp_path, cluster_factory=ExplodingCluster)
    assert len((tmp_path / "rounds.csv").read_text().splitlines()) == 1 + 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "errored" and "boom" in summary["reason"]
    assert summary["rounds_completed"] == 2
