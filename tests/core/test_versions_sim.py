"""A partial rollout with real node code over the simulated network: two versions of
fedavg-mlp-digits (same model schema) train one model together, each node runs the
archive the rule gives it, and the signed result reports metrics per version."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from p2pfl.core.versions import assign, offer_arms
from tests.core.simhelp import DIGITS, digits_split, run, spec


def _copy_as(version: str, tmp: Path) -> Path:
    out = tmp / f"digits-{version}"
    shutil.copytree(DIGITS, out, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = out / "manifest.yaml"
    text = manifest.read_text()
    assert "  version: 1.0.0\n" in text
    manifest.write_text(text.replace("  version: 1.0.0\n", f"  version: {version}\n", 1))
    return out


@pytest.fixture(scope="module")
def data6(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, Path]:
    tmp = tmp_path_factory.mktemp("rollout")
    paths, test = digits_split(tmp, 6, per_node=120)
    return paths, test, _copy_as("1.1.0", tmp)


@pytest.mark.slow
def test_a_rollout_trains_one_model_and_reports_each_version(data6) -> None:
    paths, test, canary = data6
    cluster, _ = run(
        spec(
            paths,
            test,
            params={"rounds": 2},
            extra_taskpacks=[canary],
            rollout="1.0.0=0.5,1.1.0=0.5",
        )
    )
    assert cluster.result["status"] == "succeeded", cluster.result
    task_id = cluster.task_id
    offer = cluster.nodes[0].core.tasks[task_id].offer
    arms = offer_arms(offer.rollout)
    assert [(a.version, a.share) for a in arms] == [("1.0.0", 5000), ("1.1.0", 5000)]
    assert arms[0].schema == arms[1].schema == "fedavg-mlp-digits@1"
    # Each node's driver runs its own arm's unpacked archive.
    for node in cluster.nodes:
        arm = assign(task_id, node.identity.peer_id, arms)
        assert node.core.tasks[task_id].cid == arm.cid
        assert node.driver.task_spec(task_id).taskpack_dir.name == arm.cid
    expected = Counter(assign(task_id, n.identity.peer_id, arms).version for n in cluster.nodes)
    assert expected["1.0.0"] and expected["1.1.0"]  # both versions ran (this seed)
    by_version = cluster.result["metrics"]["by_version"]
    assert {v: row["nodes"] for v, row in by_version.items()} == dict(expected)
    for version, row in by_version.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["num_samples"] > 0, (version, row)
    # One model for everyone: both versions' updates were averaged together.
    models = {n.core.tasks[task_id].global_ref.cid for n in cluster.nodes}
    assert models == {cluster.result["model_cid"]}
