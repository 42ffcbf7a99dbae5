"""Byzantine model-poisoning attacks, for simulations only.

Each attack turns the update an honest node would have sent into a malicious one, given
the current global model. All take the same arguments so a scenario can name one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Weights = dict[str, np.ndarray]

# scale=None picks these: flip with the honest magnitude, noise of unit std, a 10x boost.
DEFAULT_SCALE: dict[str, float] = {
    "none": 0.0,
    "sign-flip": 1.0,
    "gaussian-noise": 1.0,
    "scaled": 10.0,
}


def _sign_flip(honest: Weights, global_: Weights, rng: np.random.Generator, s: float) -> Weights:
    # Step in the opposite direction of the honest update: global - s * (honest - global).
    return {k: _like(global_[k] - (honest[k] - global_[k]) * s, honest[k]) for k in honest}


def _gaussian(honest: Weights, global_: Weights, rng: np.random.Generator, s: float) -> Weights:
    # Honest update plus isotropic noise of std s; rng order follows the key order.
    return {
        k: _like(honest[k] + rng.normal(0.0, s, np.shape(honest[k])), honest[k]) for k in honest
    }


def _scaled(honest: Weights, global_: Weights, rng: np.random.Generator, s: float) -> Weights:
    # Model replacement style boost: global + s * (honest - global).
    return {k: _like(global_[k] + (honest[k] - global_[k]) * s, honest[k]) for k in honest}


def _none(honest: Weights, global_: Weights, rng: np.random.Generator, s: float) -> Weights:
    return {k: np.array(v, copy=True) for k, v in honest.items()}


def _like(value: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).astype(np.asarray(ref).dtype)


ATTACKS: dict[str, Callable[[Weights, Weights, np.random.Generator, float], Weights]] = {
    "none": _none,
    "sign-flip": _sign_flip,
    "gaussian-noise": _gaussian,
    "scaled": _scaled,
}


def attack(
    name: str,
    honest: Weights,
    global_: Weights,
    rng: np.random.Generator,
    scale: float | None = None,
) -> Weights:
    """The malicious version of `honest`. Names: none | sign-flip | gaussian-noise | scaled."""
    try:
        fn = ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}") from None
    if list(honest.keys()) != list(global_.keys()):
        raise ValueError("attack: honest and global models have different tensors")
    return fn(honest, global_, rng, DEFAULT_SCALE[name] if scale is None else float(scale))
