"""Batched inference and preprocessing through the real driver and protocol, in the
in-process simulation: batches stream, a corrupt file is retried once and recorded, a
test run stops at N records, a new-data-only run sees only new rows, reports stay local."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.data import DerivedRegistry
from p2pfl.errors import LocalProtocolError
from p2pfl.fl.datasets import load_table
from p2pfl.sim.cluster import ClusterSpec, SimCluster
from p2pfl.store.local_runs import RecordsLedger, list_reports
from p2pfl.taskpack.scaffold import new_taskpack

FILES_TASK = '''
from typing import Any
from p2pfl.taskpack.batch import InferenceTask


class SumOfNumbers(InferenceTask):
    """A file of whitespace-separated numbers: a positive sum is class 1."""

    def predict(self, ctx, model, items) -> list[tuple[Any, float]]:
        out = []
        for _, data in items:
            values = [float(x) for x in data.decode("utf-8").split()]
            out.append((int(sum(values) > 0), 0.8))
        return out
'''

MANIFEST = """
apiVersion: p2pfl/v1
kind: TaskPackage
metadata: {name: sum-files, version: 1.0.0, author: test, description: ""}
spec:
  type: inference
  framework: none
  inputs: [{name: files, type: files, format: txt}]
  federated: {min_nodes: 1, max_nodes: 10, deadline_s: 60}
"""

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "batch_size": {"type": "integer", "default": 2},
        "min_nodes": {},
        "max_nodes": {},
    },
}


def files_pack(root: Path) -> Path:
    pack = root / "sum-files"
    (pack / "src").mkdir(parents=True)
    (pack / "configs").mkdir()
    (pack / "manifest.yaml").write_text(MANIFEST)
    (pack / "src" / "task.py").write_text(FILES_TASK)
    (pack / "configs" / "default.yaml").write_text("batch_size: 2\n")
    (pack / "configs" / "schema.json").write_text(json.dumps(SCHEMA))
    return pack


def run_cluster(
    tmp: Path, pack: Path, data: list[Path], name: str, params: dict[str, Any], tag: str
) -> tuple[SimCluster, list[dict[str, Any]]]:
    spec = ClusterSpec(
        seed=1, nodes=len(data), taskpack_dir=pack, node_data=data, input_name=name,
        params=params, link={"latency_ms": 5, "bandwidth_mbps": 100}, min_records=1,
    )  # fmt: skip
    cluster = SimCluster(spec)
    events: list[dict[str, Any]] = []
    for i, node in enumerate(cluster.nodes):
        node.driver.local_dir = tmp / f"node-{i}"  # kept after the run, unlike its temp dir
        node.driver.listeners.append(events.append)
    list(cluster.run())
    return cluster, events


def test_a_corrupt_file_is_retried_once_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    pack = files_pack(tmp_path)
    folders = []
    for i in range(3):
        folder = tmp_path / "data" / f"n{i}"
        folder.mkdir(parents=True)
        for j in range(5):
            (folder / f"f{j}.txt").write_text(f"{j - 2} 0.5")
        folders.append(folder)
    (folders[1] / "f3.txt").write_bytes(b"\xff\xfe\x00 not numbers")
    cluster, events = run_cluster(tmp_path, pack, folders, "files", {}, "files")
    assert cluster.result is not None and cluster.result["status"] == "succeeded", cluster.result
    me1 = cluster.nodes[1].identity.peer_id
    lines = [
        e["message"]
        for e in events
        if e.get("peer") == me1 and e["kind"] == "node" and e["message"].startswith("batch")
    ]
    # 3 batches of 2, 2, 1 and f3 once more on its own: batch 4/4.
    assert lines[0] == "batched run: 5 of 5 records"
    assert lines[-1] == "batch 4/4: 4/5 records done, 1 failed", lines
    failed_log = [e["message"] for e in events if e["kind"] == "log" and e.get("peer") == me1]
    assert any(m.startswith("record f3.txt failed twice: UnicodeDecodeError") for m in failed_log)
    ledger = RecordsLedger(tmp_path / "node-1")
    assert sorted(ledger.processed("sum-files", "files")) == [
        "f0.txt",
        "f1.txt",
        "f2.txt",
        "f4.txt",
    ]
    assert list(ledger.failed("sum-files", "files")) == ["f3.txt"]
    # The report stays on the node: key, prediction, score per record that worked.
    (report,) = list_reports(tmp_path / "node-1")
    with open(report["path"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["key"], r["prediction"]) for r in rows] == [
        ("f0.txt", "0"), ("f1.txt", "0"), ("f2.txt", "1"), ("f4.txt", "1")
    ]  # fmt: skip
    # What left: aggregates only (class counts over all nodes, mean score), no keys.
    metrics = cluster.result["metrics"]
    assert "f0.txt" not in json.dumps(cluster.result)
    assert metrics == {
        "nodes": 3, "records": 14, "failed": 1, "predictions": {"0": 6, "1": 8},
        "mean_score": pytest.approx(0.8),
    }  # fmt: skip
    # Fixed, then run again with --force-rerun-failed: only f3 on node 1, nothing elsewhere.
    (folders[1] / "f3.txt").write_text("7")
    cluster, _ = run_cluster(
        tmp_path, pack, folders, "files", {"run.rerun_failed": "true", "min_nodes": 1}, "rerun"
    )
    assert cluster.result is not None and cluster.result["status"] == "succeeded", cluster.result
    with open(report_of(tmp_path / "node-1", cluster.task_id)["path"], newline="") as f:
        assert [(r["key"], r["prediction"]) for r in csv.DictReader(f)] == [("f3.txt", "1")]
    assert report_of(tmp_path / "node-0", cluster.task_id)["rows"] == 0
    ledger = RecordsLedger(tmp_path / "node-1")
    assert len(ledger.processed("sum-files", "files")) == 5 and not ledger.failed(
        "sum-files", "files"
    )


def report_of(data_dir: Path, task_id: str | None) -> dict[str, Any]:
    (report,) = [r for r in list_reports(data_dir) if r["task_id"] == task_id]
    return report


def table(path: Path, rows: list[tuple[str, float, float, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "x1", "x2", "label"])
        w.writerows(rows)
    return path


def test_scaffolds_run_test_run_and_new_data_only(tmp_path: Path) -> None:
    pack = new_taskpack("demo-inference", "inference", tmp_path)
    rows = [(f"k{i}", (i % 5) - 2.0, 1.0, i % 2) for i in range(20)]
    data = [table(tmp_path / "data" / f"n{i}.csv", rows) for i in range(2)]
    params = {"key_column": "id", "weights": [1.0, 0.0]}
    # A test run: 5 records per node, marked in the signed result.
    cluster, _ = run_cluster(tmp_path, pack, data, "tabular", {**params, "run.test_run": 5}, "t")
    assert cluster.result["status"] == "succeeded", cluster.result
    assert cluster.result["metrics"]["test_run"] == 5
    (report,) = list_reports(tmp_path / "node-0")
    assert report["rows"] == 5 and report["test_run"] is True
    assert RecordsLedger(tmp_path / "node-0").processed("demo-inference", "tabular") == {}
    # The real run, then 3 new rows and a new-data-only run: only those 3.
    cluster, _ = run_cluster(tmp_path, pack, data, "tabular", params, "full")
    assert cluster.result["metrics"]["records"] == 40
    assert "test_run" not in cluster.result["metrics"]
    table(data[0], rows + [(f"new{i}", 1.0, 0.0, 1) for i in range(3)])
    cluster, events = run_cluster(
        tmp_path, pack, data, "tabular",
        # Node 1 has nothing new: it contributes no partial, so one node is enough.
        {**params, "run.new_data_only": "true", "min_nodes": 1}, "new",
    )  # fmt: skip
    assert cluster.result["status"] == "succeeded", cluster.result
    latest = report_of(tmp_path / "node-0", cluster.task_id)
    with open(latest["path"], newline="") as f:
        assert [r["key"] for r in csv.DictReader(f)] == ["new0", "new1", "new2"]
    assert report_of(tmp_path / "node-1", cluster.task_id)["rows"] == 0
    assert len(RecordsLedger(tmp_path / "node-0").processed("demo-inference", "tabular")) == 23


def test_preprocessing_scaffold_keeps_a_derived_dataset_on_each_node(tmp_path: Path) -> None:
    pack = new_taskpack("demo-prep", "preprocessing", tmp_path)
    tables = [[("1", 9.0, -1.0, 0), ("2", 1.0, 2.0, 1)], [("3", 5.0, 4.0, 1), ("4", 1.0, 3.0, 0)]]
    data = [table(tmp_path / "data" / f"n{i}.csv", rows) for i, rows in enumerate(tables)]
    spec = ClusterSpec(
        seed=1, nodes=2, taskpack_dir=pack, node_data=data, input_name="tabular",
        params={"output": "clean"}, link={"latency_ms": 5, "bandwidth_mbps": 100},
        min_records=1,
    )  # fmt: skip
    cluster = SimCluster(spec)
    for i, node in enumerate(cluster.nodes):
        node.driver.attach_derived(DerivedRegistry(tmp_path / f"node-{i}" / "derived"))
    list(cluster.run())
    assert cluster.result is not None and cluster.result["status"] == "succeeded", cluster.result
    pooled = []
    for i in range(2):
        (info,) = DerivedRegistry(tmp_path / f"node-{i}" / "derived").list()
        assert (info.name, info.records, info.producer) == ("clean", 2, cluster.task_id)
        x, y, names = load_table(info.path)
        assert names == ["id", "x1", "x2"] and y.tolist() == [r[3] for r in tables[i]]
        pooled.append(x)
    # Every node used the same (pooled) statistics: the union is standardised.
    everything = np.concatenate(pooled)
    assert np.allclose(everything.mean(axis=0), 0.0, atol=1e-5)
    assert np.allclose(everything.std(axis=0), 1.0, atol=1e-5)


def test_run_options_are_refused_for_a_task_that_is_not_batched(tmp_path: Path) -> None:
    pack = new_taskpack("demo-stats", "analysis", tmp_path)
    data = [table(tmp_path / "data" / f"n{i}.csv", [("a", 1.0, 2.0, 0)]) for i in range(2)]
    with pytest.raises(LocalProtocolError, match="apply to batched"):
        run_cluster(tmp_path, pack, data, "tabular", {"run.test_run": 5}, "no")


def test_a_model_cid_this_node_does_not_hold_fails_with_the_reason(tmp_path: Path) -> None:
    pack = new_taskpack("demo-inference", "inference", tmp_path)
    data = [table(tmp_path / "data" / f"n{i}.csv", [(f"k{i}", 1.0, 2.0, 0)]) for i in range(2)]
    absent = "bafkrei" + "a" * 52
    cluster, _ = run_cluster(tmp_path, pack, data, "tabular", {"model_cid": absent}, "m")
    assert cluster.result is not None and cluster.result["status"] == "failed"
    assert "is not on this node" in cluster.result["reason"], cluster.result
