"""`p2pfl.load_model(path)` reads a result model file back into named arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import p2pfl
from p2pfl.wire import encode_tensors


def test_load_model_round_trip(tmp_path: Path) -> None:
    weights = {
        "layer.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "layer.0.bias": np.array([0.5, -1.5, 2.0], dtype=np.float64),
        "steps": np.array([7], dtype=np.int64),
    }
    path = tmp_path / "model.p2tn"
    path.write_bytes(bytes(encode_tensors(weights)))
    model = p2pfl.load_model(path)
    assert list(model) == list(weights)  # the stored order
    for name, arr in weights.items():
        assert model[name].dtype == arr.dtype and np.array_equal(model[name], arr)
        assert model[name].flags.writeable  # a copy, safe to train further


def test_load_model_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(p2pfl.ValidationError, match="notes.txt: tensor blob: bad magic"):
        p2pfl.load_model(bad)
    nan = tmp_path / "nan.p2tn"
    nan.write_bytes(bytes(encode_tensors({"w": np.array([np.nan], dtype=np.float32)})))
    with pytest.raises(p2pfl.ValidationError, match="contains NaN or Inf"):
        p2pfl.load_model(nan)
    with pytest.raises(FileNotFoundError):
        p2pfl.load_model(tmp_path / "missing.p2tn")
