"""lora-text: federated LoRA fine-tuning of a pretrained language model on a text task.

Input: one text table (npz or csv with `text` and an integer `label` in 0..classes-1, as
`p2pfl datasets split shakespeare` writes). The base model is the manifest's
`spec.llm_config.base_model`, loaded offline from the package that ships it; its weights'
sha256 must match `base_model_sha256`, so every node fine-tunes the same base.

The model the network sees is the adapter (LoRA A/B on `target_modules` plus the
classification head, named as peft saves it) and the baseline's linear probe
(`baseline_probe.weight`/`.bias`, see src/model.py): `initial_weights`, `execute` and
`evaluate` take and return exactly those tensors, so FedAvg averages them and nothing of
the base model travels. The result carries an `adapter` entry (rank, alpha, modules, labels) with which
`python -m p2pfl.fl.lora` writes a peft adapter directory for `PeftModel.from_pretrained`.

`evaluate` reports, on the local held-out rows: `accuracy`/`loss` (cross-entropy) of the
LoRA model, `base_accuracy`/`base_loss` of the base model without adapters (a linear probe
on the frozen base's mean-pooled embeddings, trained the same way), and the sizes
`adapter_bytes` (the adapter in one update) and `full_model_bytes`.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.fl.partition import split_train_test
from p2pfl.fl.text import load_texts
from p2pfl.taskpack.manifest import LLMConfig, load_manifest
from p2pfl.taskpack.sdk import Context, Metrics, Partial, Task, Update, Weights

from . import model as lm

PACK_DIR = Path(__file__).resolve().parents[1]


@functools.cache
def llm_config() -> LLMConfig:
    """This taskpack's own manifest's llm_config (validated when it was loaded)."""
    cfg = load_manifest(PACK_DIR).spec.llm_config
    if cfg is None or cfg.lora is None:
        raise ValueError("manifest.yaml: spec.llm_config with a lora_config is required")
    return cfg


def settings(ctx: Context) -> lm.LoRASettings:
    """The manifest's LoRA settings, overridden by the parameters r, lora_alpha, ..."""
    cfg = llm_config()
    assert cfg.lora is not None
    p = ctx.params

    def pick(key: str, default: Any) -> Any:
        return default if p.get(key) is None else p[key]

    return lm.LoRASettings(
        base_model=cfg.base_model,
        sha256=cfg.base_model_sha256,
        classes=int(p.get("classes", 4)),
        r=int(pick("r", cfg.lora.r)),
        lora_alpha=float(pick("lora_alpha", cfg.lora.lora_alpha)),
        lora_dropout=float(pick("lora_dropout", cfg.lora.lora_dropout)),
        target_modules=tuple(pick("target_modules", cfg.lora.target_modules)),
        bias=cfg.lora.bias,
        seed=int(ctx.seed),
    )


def _input(ctx: Context, inputs: dict[str, Path]) -> Path:
    name = ctx.params.get("input")
    if name:
        if name not in inputs:
            raise ValueError(f"params.input {name!r} is not among the inputs {sorted(inputs)}")
        return Path(inputs[name])
    if len(inputs) != 1:
        raise ValueError(f"expected exactly one input, got {sorted(inputs)}; set params.input")
    return Path(next(iter(inputs.values())))


def _round_seed(ctx: Context) -> int:
    """Different per node and round (shuffles, dropout), reproducible for a task."""
    digest = hashlib.sha256(f"{ctx.seed}|{ctx.node}|{ctx.round}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class LoRAText(Task):
    def validate_inputs(self, ctx: Context, inputs: dict[str, Path]) -> None:
        super().validate_inputs(ctx, inputs)
        if ctx.dp is not None:
            raise ValueError("lora-text does not implement differential privacy")
        problem = lm.imports_ok()
        if problem:
            raise ValueError(problem)
        lm.check_base(settings(ctx))
        texts, labels = load_texts(_input(ctx, inputs))
        min_rows = int(ctx.params.get("min_rows", 10))
        if len(texts) < min_rows:
            raise ValueError(f"input has {len(texts)} rows, fewer than min_rows={min_rows}")
        classes = int(ctx.params.get("classes", 4))
        if labels.min() < 0 or labels.max() >= classes:
            raise ValueError(
                f"labels must be in 0..{classes - 1}, found {labels.min()}..{labels.max()}"
            )

    def preprocess(self, ctx: Context, inputs: dict[str, Path]) -> dict[str, Any]:
        texts, labels = load_texts(_input(ctx, inputs))
        frac = float(ctx.params.get("validation_fraction", 0.2))
        # Seeded by the task: every run of this node holds out the same rows.
        tr, va = split_train_test(labels, frac, np.random.default_rng(ctx.seed), stratify=True)
        if tr.size == 0:
            raise ValueError("no training rows left after the validation hold-out")
        return {
            "texts": [texts[i] for i in tr],
            "y": labels[tr],
            "texts_val": [texts[i] for i in va],
            "y_val": labels[va],
        }

    def initial_weights(self, ctx: Context) -> Weights:
        return dict(lm.build(settings(ctx)).initial)

    def execute(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Update:
        built = lm.build(settings(ctx))
        p = ctx.params
        with built.lock:
            lm.load_state(built, weights if weights is not None else built.initial)
            loss, base_loss, steps = lm.train(
                built,
                data["texts"],
                data["y"],
                lr=float(p.get("lr", 3e-3)),
                batch_size=int(p.get("batch_size", 16)),
                max_length=int(p.get("max_length", 64)),
                epochs=int(p.get("local_epochs", 1)),
                max_steps=int(p.get("max_steps", 10)),
                seed=_round_seed(ctx),
            )
            weights_out = lm.state(built)
        ctx.log(f"round {ctx.round}: {steps} steps, loss {loss:.4f} (probe {base_loss:.4f})")
        return Update(
            num_samples=len(data["texts"]),
            weights=weights_out,
            metrics={
                "loss": loss,
                "base_loss": base_loss,
                "adapter_bytes": float(built.adapter_bytes),
            },
        )

    def evaluate(self, ctx: Context, data: dict[str, Any], weights: Weights | None) -> Metrics:
        built = lm.build(settings(ctx))
        texts, y = data["texts_val"], data["y_val"]
        if len(y) == 0:  # no hold-out: report on the training rows rather than nothing
            texts, y = data["texts"], data["y"]
        max_length = int(ctx.params.get("max_length", 64))
        batch = int(ctx.params.get("eval_batch_size", 64))
        with built.lock:
            lm.load_state(built, weights if weights is not None else built.initial)
            acc, loss = lm.evaluate(built, texts, y, batch_size=batch, max_length=max_length)
            base_acc, base_loss = lm.base_metrics(built, texts, y, max_length=max_length)
            full = built.full_model_bytes
        return {
            "accuracy": acc,
            "loss": loss,
            "base_accuracy": base_acc,
            "base_loss": base_loss,
            "accuracy_gain": acc - base_acc,
            "adapter_bytes": float(built.adapter_bytes),
            "full_model_bytes": float(full),
            "num_samples": float(len(y)),
        }

    def reduce(self, ctx: Context, partials: list[Partial]) -> dict[str, Any]:
        out = super().reduce(ctx, partials)
        s = settings(ctx)
        # How to load the result: `python -m p2pfl.fl.lora MODEL RESULT.json OUT` reads this.
        out["adapter"] = {
            "base_model": s.base_model,
            "base_model_package": llm_config().base_model_package,
            "base_model_sha256": s.sha256,
            "training_method": "lora",
            "num_labels": s.classes,
            "r": s.r,
            "lora_alpha": s.lora_alpha,
            "lora_dropout": s.lora_dropout,
            "target_modules": list(s.target_modules),
            "bias": s.bias,
        }
        return out
