"""Torch helpers for taskpacks: weights <-> numpy, local training (FedProx, Opacus DP),
evaluation. torch and opacus are imported lazily so that importing p2pfl stays cheap.

Differential privacy, per node (DP-SGD with Opacus and an RDP accountant):
* the noise multiplier is calibrated once, at the first DP round, so that the whole task
  (``rounds * epochs`` local epochs at this node's sampling rate) spends at most
  ``dp.epsilon`` at ``dp.delta``; it is stored in ``dp_state`` and reused afterwards;
* the accountant history (a list of ``[noise_multiplier, sample_rate, steps]``) lives in
  ``dp_state`` (JSON-able), so later rounds and a restarted node continue the accounting;
* before a round, the epsilon *after* that round is computed; if it would exceed the
  budget, `BudgetExhausted` is raised and nothing is trained;
* the noise and the Poisson sampling draw from generators seeded with fresh secret bits
  (``secrets``) on every call, unless ``dp.deterministic`` (simulations only): a seed
  derived from public values (task id, round) would let any peer regenerate the noise and
  subtract it from a published update.
"""

from __future__ import annotations

import contextlib
import copy
import math
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pfl.taskpack.sdk import DPConfig

if TYPE_CHECKING:
    import torch

Weights = dict[str, np.ndarray]

# Accounting tolerance: the binary search in opacus stops within 0.01 of the target.
_EPS_SLACK = 1e-6


class BudgetExhausted(Exception):
    """The next round of DP training would spend more than the node's epsilon budget."""

    def __init__(self, spent: float, next_epsilon: float, budget: float) -> None:
        self.spent, self.next_epsilon, self.budget = spent, next_epsilon, budget
        super().__init__(
            f"DP budget exhausted: spent epsilon {spent:.3f}, the next round would reach "
            f"{next_epsilon:.3f} > budget {budget:.3f}"
        )


@dataclass
class TrainStats:
    loss: float  # mean training loss over the last local epoch
    num_samples: int
    epsilon: float | None = None  # epsilon spent so far (DP only)


def seed_cpu(seed: int) -> None:
    """Seed torch's CPU generator only. `torch.manual_seed` also seeds CUDA/XPU/MTIA lazily,
    formatting a stack trace each call (about 0.6 ms); training here runs on the CPU."""
    import torch

    torch.random.default_generator.manual_seed(int(seed))


def state_to_numpy(module_or_state_dict: Any) -> Weights:
    """A torch module or state dict -> ordered dict of numpy arrays (copies, CPU)."""
    state = (
        module_or_state_dict.state_dict()
        if hasattr(module_or_state_dict, "state_dict")
        else module_or_state_dict
    )
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def load_numpy_into(module: torch.nn.Module, weights: Weights) -> None:
    """Load numpy weights into `module` (strict: keys and shapes must match)."""
    import torch

    current = module.state_dict()
    missing = [k for k in current if k not in weights]
    extra = [k for k in weights if k not in current]
    if missing or extra:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {extra}")
    tensors = {}
    for key, ref in current.items():
        value = np.asarray(weights[key])
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"tensor {key!r}: shape {value.shape}, model has {tuple(ref.shape)}")
        tensors[key] = torch.as_tensor(value.copy()).to(ref.dtype)
    module.load_state_dict(tensors, strict=True)


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silence Opacus's known-harmless warnings (hooks on module outputs, RNG mode, and
    the RDP order hint printed during calibration)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*full backward hook.*")
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the.*")
        yield


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: reproducible reductions, and fair to other workers on the box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensors(X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yarr = np.asarray(y)
    yt = torch.as_tensor(
        yarr.astype(np.int64) if yarr.dtype.kind in "iub" else yarr.astype(np.float32)
    )
    return xt, yt


def _loss_fn(y: torch.Tensor) -> torch.nn.Module:
    import torch

    # Integer labels -> classification; float targets -> regression.
    return torch.nn.CrossEntropyLoss() if not y.is_floating_point() else torch.nn.MSELoss()


def _epsilon(history: list[list[float]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with _quiet_opacus():
        return float(acc.get_epsilon(delta=delta)) if history else 0.0


def _add_steps(history: list[list[float]], sigma: float, q: float, steps: int) -> list[list[float]]:
    out = [list(h) for h in history]
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1][2] = int(out[-1][2]) + steps
    else:
        out.append([sigma, q, steps])
    return out


def train_local(
    model: torch.nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    global_weights: Weights | None = None,
    mu: float = 0.0,
    dp: DPConfig | None = None,
    dp_state: dict[str, Any] | None = None,
    rounds: int = 1,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> TrainStats:
    """Train `model` in place on (X, y) for `epochs` local epochs.

    FedProx: with mu > 0 and `global_weights`, minimises loss + mu/2 * ||w - w_global||^2.
    DP: with `dp`, DP-SGD via Opacus; `rounds` is the task's number of rounds (needed to
    calibrate the noise for the whole task) and `dp_state` (mutated) carries the accounting
    between calls. Raises BudgetExhausted before training if the round would overspend.
    Deterministic for a given seed on CPU without DP, or with ``dp.deterministic``; with
    DP on a real node the sampling and the noise come from fresh secret seeds instead.
    """
    import torch

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"bad training params: epochs={epochs} batch_size={batch_size} lr={lr}")
    xt, yt = _tensors(X, y)
    n = int(xt.shape[0])
    if n == 0:
        raise ValueError("train_local: no training samples")
    seed_cpu(seed)
    # The loader's generator also drives Opacus's Poisson sampling: under real-node DP it
    # must be as secret as the noise (which batches a record joined is private too).
    secret = dp is not None and not dp.deterministic
    gen = torch.Generator().manual_seed(secrets.randbits(64) if secret else seed)
    noise_seed = secrets.randbits(64) if secret else seed + 1
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xt, yt),
        batch_size=min(batch_size, n),
        shuffle=True,
        generator=gen,
    )
    prox_ref = None
    if mu > 0 and global_weights is not None:
        prox_ref = {
            name: torch.as_tensor(np.asarray(global_weights[name])).to(p.dtype)
            for name, p in model.named_parameters()
        }

    def make_opt(params: Any) -> torch.optim.Optimizer:
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum)
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        raise ValueError(f"unknown optimizer {optimizer!r}; use sgd or adam")

    with _one_thread(), _quiet_opacus():
        if dp is None:
            return _train_plain(model, loader, make_opt, epochs, n, mu, prox_ref)
        return _train_dp(
            model, loader, make_opt, epochs, n, mu, prox_ref, dp, dp_state, rounds, noise_seed, lr
        )


def _train_plain(model, loader, make_opt, epochs, n, mu, prox_ref) -> TrainStats:
    model.train()
    opt = make_opt(model.parameters())
    loss_fn = _loss_fn(loader.dataset.tensors[1])
    last = 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            total += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
            if prox_ref is not None:
                # FedProx proximal term keeps the local model near the global one.
                prox = sum(
                    ((p - prox_ref[name]) ** 2).sum() for name, p in model.named_parameters()
                )
                loss = loss + (mu / 2.0) * prox
            loss.backward()
            opt.step()
        last = total / max(count, 1)
    return TrainStats(loss=last, num_samples=n, epsilon=None)


def _train_dp(
    model, loader, make_opt, epochs, n, mu, prox_ref, dp, dp_state, rounds, noise_seed, lr
) -> TrainStats:
    import torch
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    state = dp_state if dp_state is not None else {}
    # Poisson sampling rate and expected steps per epoch, as Opacus's DPDataLoader uses them.
    steps_per_epoch = len(loader)
    q = 1.0 / steps_per_epoch
    if "noise_multiplier" not in state or state.get("sample_rate") != q:
        if state.get("history"):
            # Calibration must stay fixed once spending began; a changed dataset size breaks it.
            raise ValueError(
                f"DP state was calibrated for sample rate {state.get('sample_rate')}, now {q}"
            )
        state["noise_multiplier"] = float(
            get_noise_multiplier(
                target_epsilon=dp.epsilon,
                target_delta=dp.delta,
                sample_rate=q,
                steps=steps_per_epoch * epochs * max(rounds, 1),
                accountant="rdp",
            )
        )
        state["sample_rate"] = q
        state["history"] = []
    sigma = float(state["noise_multiplier"])
    history: list[list[float]] = state.get("history", [])
    spent = _epsilon(history, dp.delta)
    after = _epsilon(_add_steps(history, sigma, q, steps_per_epoch * epochs), dp.delta)
    if after > dp.epsilon + _EPS_SLACK:
        raise BudgetExhausted(spent, after, dp.epsilon)

    # Train a copy: Opacus attaches hooks; the caller's module must stay a plain module.
    work = copy.deepcopy(model)
    work.train()
    opt = make_opt(work.parameters())
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [(float(s), float(qq), int(k)) for s, qq, k in history]
    # Opacus warnings are silenced by the caller (_quiet_opacus).
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=work,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )
    loss_fn = _loss_fn(loader.dataset.tensors[1])
    last = 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in dp_loader:
            if xb.shape[0] == 0:
                continue  # Poisson sampling can draw an empty batch; the step is still counted
            dp_opt.zero_grad()
            loss = loss_fn(dp_model(xb), yb)
            total += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
            loss.backward()
            dp_opt.step()
            if prox_ref is not None:
                # FedProx with DP: the proximal gradient mu*(w - w_g) does not touch
                # the data, so it is applied after the privatised step (decoupled),
                # outside the per-sample clipping.
                with torch.no_grad():
                    for name, p in work.named_parameters():
                        p -= lr * mu * (p - prox_ref[name])
        last = total / max(count, 1)
    epsilon = float(engine.accountant.get_epsilon(delta=dp.delta))
    new_history = [[float(s), float(qq), int(k)] for s, qq, k in engine.accountant.history]
    # Empty Poisson batches skip dp_opt.step(), so the accountant may have counted fewer
    # steps than planned; account conservatively for the full planned round instead.
    planned = _add_steps(history, sigma, q, steps_per_epoch * epochs)
    if sum(h[2] for h in new_history) < sum(h[2] for h in planned):
        new_history = planned
        epsilon = _epsilon(planned, dp.delta)
    state["history"] = new_history
    state["epsilon"] = epsilon
    if hasattr(dp_model, "_close"):
        dp_model._close()  # remove Opacus hooks from the copy
    model.load_state_dict({k.removeprefix("_module."): v for k, v in work.state_dict().items()})
    if math.isnan(last):
        raise FloatingPointError("DP training diverged (loss is NaN)")
    return TrainStats(loss=last, num_samples=n, epsilon=epsilon)


def evaluate_model(model: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Loss and accuracy (classification) of `model` on (X, y), without gradients."""
    import torch

    xt, yt = _tensors(X, y)
    n = int(xt.shape[0])
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num_samples": 0.0}
    model.eval()
    with _one_thread(), torch.no_grad():
        out = model(xt)
        loss = float(_loss_fn(yt)(out, yt))
        if yt.is_floating_point():
            acc = float("nan")
        else:
            acc = float((out.argmax(dim=1) == yt).float().mean())
    return {"loss": loss, "accuracy": acc, "num_samples": float(n)}
