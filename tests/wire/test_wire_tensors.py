"""Tensor blobs: round trips for every dtype and shape, zero-copy decode, strict refusal."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.wire import TENSOR_DTYPES, decode_tensors, encode_tensors
from p2pfl.wire.tensors import MAGIC

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text(max_size=12), max_size=5, unique=True))
    out = {}
    for name in names:
        dtype = TENSOR_DTYPES[draw(st.sampled_from(sorted(TENSOR_DTYPES)))]
        elements = (
            st.floats(allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
            if dtype.kind == "f"
            else None
        )
        out[name] = draw(hnp.arrays(dtype, draw(shapes), elements=elements))
    return out


@SETTINGS
@given(tensor_dicts())
def test_round_trip(tensors: dict[str, np.ndarray]) -> None:
    blob = encode_tensors(tensors)
    back = decode_tensors(blob)
    assert list(back) == list(tensors)
    for name, arr in tensors.items():
        got = back[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert np.array_equal(got, arr)
        assert not got.flags.writeable
    assert encode_tensors(back) == blob  # canonical


@pytest.mark.parametrize("dtype", sorted(TENSOR_DTYPES))
def test_every_dtype_including_0d_and_empty(dtype: str) -> None:
    dt = TENSOR_DTYPES[dtype]
    tensors = {
        "scalar": np.array(1, dt),
        "empty": np.zeros((0, 3), dt),
        "matrix": np.ones((3, 4), dt),
    }
    back = decode_tensors(encode_tensors(tensors))
    for k, v in tensors.items():
        assert back[k].shape == v.shape and back[k].dtype == dt and np.array_equal(back[k], v)


def test_decode_is_zero_copy_and_aligned() -> None:
    blob = bytes(encode_tensors({"a": np.arange(5, dtype=np.float32), "b": np.arange(3.0)}))
    out = decode_tensors(blob)
    base = np.frombuffer(blob, np.uint8).ctypes.data
    for arr in out.values():
        assert np.shares_memory(arr, np.frombuffer(blob, np.uint8))
        assert (arr.ctypes.data - base) % 64 == 0
    # A bytearray input also yields read-only views.
    out2 = decode_tensors(bytearray(blob))
    assert not out2["a"].flags.writeable


def test_big_endian_non_contiguous_and_torch_inputs() -> None:
    torch = pytest.importorskip("torch")
    src = {
        "be": np.arange(6, dtype=">i4").reshape(2, 3),
        "strided": np.arange(20.0)[::3],
        "t": torch.arange(4, dtype=torch.float32, requires_grad=True),
    }
    out = decode_tensors(encode_tensors(src))
    assert out["be"].dtype == np.dtype("<i4") and out["be"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out["strided"].tolist() == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0]
    assert out["t"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(LocalProtocolError, match="not allowed"):
        encode_tensors({"c": np.zeros(2, np.complex64)})
    with pytest.raises(LocalProtocolError, match="expected numpy array"):
        encode_tensors({"x": [1, 2]})
    with pytest.raises(LocalProtocolError, match="name"):
        encode_tensors({3: np.zeros(2)})  # type: ignore[dict-item]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_refused_unless_allowed(dtype: str, bad: float) -> None:
    arr = np.zeros(100, TENSOR_DTYPES[dtype])
    arr[37] = bad
    blob = encode_tensors({"w": arr})
    with pytest.raises(RemoteProtocolError, match="NaN or Inf"):
        decode_tensors(blob)
    assert np.isnan(decode_tensors(blob, allow_nonfinite=True)["w"][37]) == np.isnan(bad)


def test_large_finite_values_pass_despite_sum_overflow() -> None:
    # The fast check sums the array; an overflowing sum must fall back, not refuse.
    arr = np.full(1000, np.finfo(np.float32).max, np.float32)
    assert decode_tensors(encode_tensors({"w": arr}))["w"][0] == arr[0]
    half = np.full(1000, 60000, np.float16)
    assert decode_tensors(encode_tensors({"w": half}))["w"][0] == 60000


def _blob_with_header(entries: list, data_len: int, header: dict | None = None) -> bytes:
    hdr = msgpack.packb(header if header is not None else {"v": 1, "tensors": entries})
    start = -(-(8 + len(hdr)) // 64) * 64
    return MAGIC + struct.pack("<I", len(hdr)) + hdr + b"\0" * (start - 8 - len(hdr) + data_len)


def test_header_rejections() -> None:
    start = 64
    good = _blob_with_header([["a", "float32", [2], start, 8]], 8)
    assert decode_tensors(good)["a"].tolist() == [0.0, 0.0]
    cases = {  # error -> (header entries, bytes of data after the header)
        "not allowed": ([["a", "complex64", [2], start, 16]], 16),
        "bytes, header says": ([["a", "float32", [3], start, 8]], 8),
        "out of range": ([["a", "float32", [4], start, 16]], 8),
        "bad dimension": ([["a", "float32", [-2], start, 8]], 8),
        "expected 64": ([["a", "float32", [2], start + 4, 8]], 12),
        "duplicate": ([["a", "float32", [1], start, 4], ["a", "float32", [1], start + 64, 4]], 68),
        "expected \\[name": ([["a", "float32", [2], start]], 8),
    }
    for error, (entries, data_len) in cases.items():
        with pytest.raises(RemoteProtocolError, match=error):
            decode_tensors(_blob_with_header(entries, data_len))
    overlap = [["a", "float32", [16], start, 64], ["b", "float32", [1], start + 32, 4]]
    with pytest.raises(RemoteProtocolError, match="overlapping"):
        decode_tensors(_blob_with_header(overlap, 128))
    with pytest.raises(RemoteProtocolError, match="unsupported header"):
        decode_tensors(_blob_with_header([], 0, {"v": 2, "tensors": []}))
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        decode_tensors(b"XXXX" + good[4:])
    with pytest.raises(RemoteProtocolError, match="over"):
        decode_tensors(MAGIC + struct.pack("<I", 1 << 30) + b"\0" * 64)
    with pytest.raises(RemoteProtocolError, match="trailing"):
        decode_tensors(good + b"\0")


@SETTINGS
@given(tensor_dicts(), st.data())
def test_truncated_or_mutated_blobs_only_raise_remote_errors(
    tensors: dict[str, np.ndarray], data: st.DataObject
) -> None:
    blob = bytearray(encode_tensors(tensors))
    op = data.draw(st.sampled_from(["cut", "flip", "append"]))
    if op == "cut":
        cut = data.draw(st.integers(0, len(blob) - 1))
        with pytest.raises(RemoteProtocolError):
            decode_tensors(bytes(blob[:cut]))
        return
    if op == "append":
        with pytest.raises(RemoteProtocolError):
            decode_tensors(bytes(blob + data.draw(st.binary(min_size=1, max_size=70))))
        return
    # Flip bytes, mostly in the header where the structure lives.
    hlen = struct.unpack_from("<I", blob, 4)[0]
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, min(len(blob) - 1, 8 + hlen + 8)))
        blob[pos] ^= data.draw(st.integers(1, 255))
    try:
        decode_tensors(bytes(blob))
    except RemoteProtocolError:
        pass
