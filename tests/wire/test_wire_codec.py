"""The typed msgpack codec: round trips, canonical bytes, and strict refusal of bad input."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.wire import (
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    WIRE_VERSION,
    Json,
    decode,
    encode,
    message,
    record,
)


@record
@dataclass(frozen=True, slots=True)
class Ref:
    cid: str
    size: int
    chunk_size: int
    chunk_hashes: tuple[bytes, ...]


@record
@dataclass(frozen=True, slots=True)
class Outer:
    name: str
    refs: list[Ref]
    best: Ref | None = None


@message("test.offer")
@dataclass(frozen=True, slots=True)
class Offer:
    task_id: str
    params: Json
    blob: Ref | None = None
    peers: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)


@message("test.all")
@dataclass(frozen=True, slots=True)
class AllTypes:
    i: int
    f: float
    b: bool
    s: str
    raw: bytes
    maybe: int | None
    ints: list[int]
    strs: tuple[str, ...]
    table: dict[str, Outer]
    nested: tuple[tuple[int, ...], ...]
    outer: Outer
    j: Json = None


@message("test.ping")
@dataclass(frozen=True, slots=True)
class Ping:
    n: int = 0


def _offer() -> Offer:
    ref = Ref("bafk", 10, 5, (b"a" * 32, b"b" * 32))
    return Offer("t1", {"lr": 0.1, "x": [1, None, {"a": b"z"}]}, ref, ("p1", "p2"), {"a": 1.0})


# --- strategies ---------------------------------------------------------------------

i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=20)
refs = st.builds(Ref, text, i64, i64, st.lists(st.binary(max_size=40), max_size=4).map(tuple))
outers = st.builds(Outer, text, st.lists(refs, max_size=3), st.none() | refs)
json_values = st.recursive(
    st.none() | st.booleans() | i64 | floats | text | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)
all_types = st.builds(
    AllTypes,
    i=i64,
    f=floats,
    b=st.booleans(),
    s=text,
    raw=st.binary(max_size=50),
    maybe=st.none() | i64,
    ints=st.lists(i64, max_size=5),
    strs=st.lists(text, max_size=5).map(tuple),
    table=st.dictionaries(text, outers, max_size=3),
    nested=st.lists(st.lists(i64, max_size=3).map(tuple), max_size=3).map(tuple),
    outer=outers,
    j=json_values,
)
offers = st.builds(
    Offer,
    task_id=text,
    params=json_values,
    blob=st.none() | refs,
    peers=st.lists(text, max_size=5).map(tuple),
    weights=st.dictionaries(text, floats, max_size=4),
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.one_of(all_types, offers))
def test_round_trip(msg: object) -> None:
    data = encode(msg)
    back = decode(data)
    assert back == msg
    assert type(back) is type(msg)
    assert encode(back) == data  # canonical: re-encoding gives the same bytes


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_remote_errors(data: bytes) -> None:
    try:
        decode(data)
    except RemoteProtocolError:
        pass


@SETTINGS
@given(all_types, st.data())
def test_mutated_encodings_only_raise_remote_errors(msg: AllTypes, data: st.DataObject) -> None:
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        decode(bytes(raw))
    except RemoteProtocolError:
        pass


@SETTINGS
@given(all_types, st.data())
def test_mutated_maps_only_raise_remote_errors(msg: AllTypes, data: st.DataObject) -> None:
    """Structure-aware mutation: replace one field with any msgpack value."""
    d = msgpack.unpackb(encode(msg))
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(json_values)
    try:
        decode(msgpack.packb(d))
    except RemoteProtocolError:
        pass


def test_wire_shape_and_field_order() -> None:
    d = msgpack.unpackb(encode(_offer()))
    assert list(d) == ["v", "t", "task_id", "params", "blob", "peers", "weights"]
    assert d["v"] == WIRE_VERSION and d["t"] == "test.offer"
    assert list(d["blob"]) == ["cid", "size", "chunk_size", "chunk_hashes"]


def test_dict_keys_sorted_for_canonical_bytes() -> None:
    a = Offer("t", {"b": 1, "a": 2}, weights={"y": 1.0, "x": 2.0})
    b = Offer("t", {"a": 2, "b": 1}, weights={"x": 2.0, "y": 1.0})
    assert encode(a) == encode(b)


def test_defaults_may_be_absent() -> None:
    data = msgpack.packb({"v": WIRE_VERSION, "t": "test.offer", "task_id": "x", "params": None})
    assert decode(data) == Offer("x", None)


def test_expected_type() -> None:
    data = encode(Ping(3))
    assert decode(data, expected=Ping) == Ping(3)
    assert decode(data, expected=(Offer, Ping)) == Ping(3)
    with pytest.raises(RemoteProtocolError, match="unexpected message type 'test.ping'"):
        decode(data, expected=Offer)


def test_int_for_float_is_converted() -> None:
    d = msgpack.unpackb(encode(_offer()))
    d["weights"]["a"] = 3
    out = decode(msgpack.packb(d))
    assert out.weights == {"a": 3.0} and type(out.weights["a"]) is float
    # ... and on encode too, so the bytes are canonical.
    assert encode(Offer("t", None, weights={"a": 3})) == encode(
        Offer("t", None, weights={"a": 3.0})
    )


def _mutate(fn) -> bytes:
    d = msgpack.unpackb(encode(_offer()))
    fn(d)
    return msgpack.packb(d)


@pytest.mark.parametrize(
    ("mutation", "error"),
    [
        (
            lambda d: d["blob"].__setitem__("size", "x"),
            "test.offer.blob.size: expected int, got str",
        ),
        (
            lambda d: d["blob"].__setitem__("size", True),
            "test.offer.blob.size: expected int, got bool",
        ),
        (lambda d: d["blob"].__setitem__("size", 2**63), "test.offer.blob.size: int outside int64"),
        (
            lambda d: d["blob"].__setitem__("size", 1.5),
            "test.offer.blob.size: expected int, got float",
        ),
        (
            lambda d: d["blob"]["chunk_hashes"].__setitem__(1, "s"),
            r"chunk_hashes\[1\]: expected bytes",
        ),
        (lambda d: d["blob"].__setitem__("extra", 1), "test.offer.blob: unknown field"),
        (lambda d: d["blob"].pop("cid"), "test.offer.blob.cid: missing field"),
        (lambda d: d.pop("task_id"), "test.offer.task_id: missing field"),
        (lambda d: d.__setitem__("zz", 1), "test.offer: unknown field"),
        (lambda d: d.__setitem__("v", 2), "unsupported wire version 2"),
        (lambda d: d.__setitem__("v", True), "unsupported wire version True"),
        (lambda d: d.pop("v"), "no version"),
        (lambda d: d.__setitem__("t", "nope"), "unknown message type 'nope'"),
        (lambda d: d.pop("t"), "unknown message type None"),
        (lambda d: d.__setitem__("peers", "p1"), "test.offer.peers: expected tuple, got str"),
        (lambda d: d["peers"].__setitem__(0, 1), r"test.offer.peers\[0\]: expected str"),
        (lambda d: d["weights"].__setitem__("a", math.nan), r"weights\['a'\]: NaN/Inf"),
        (lambda d: d["weights"].__setitem__("a", math.inf), r"weights\['a'\]: NaN/Inf"),
        (lambda d: d.__setitem__("weights", {b"k": 1.0}), "map key must be str"),
        (lambda d: d.__setitem__("params", {"a": math.nan}), r"params\['a'\]: NaN/Inf"),
        (lambda d: d.__setitem__("params", {1: 2}), "not allowed for map key"),  # msgpack refuses
        (lambda d: d.__setitem__("blob", [1]), "test.offer.blob: expected map"),
    ],
)
def test_rejections_name_the_problem(mutation, error: str) -> None:
    try:
        data = _mutate(mutation)
    except Exception:
        pytest.skip("msgpack cannot pack this mutation")
    with pytest.raises(RemoteProtocolError, match=error):
        decode(data)


def test_non_str_map_key_rejected() -> None:
    data = msgpack.packb({"v": 1, "t": "test.offer", "task_id": "x", "params": {1: 2}})
    with pytest.raises(RemoteProtocolError):
        decode(data)


def test_not_msgpack_not_map_and_trailing_data() -> None:
    with pytest.raises(RemoteProtocolError, match="not a valid msgpack"):
        decode(b"\xc1")
    with pytest.raises(RemoteProtocolError, match="not a map"):
        decode(msgpack.packb([1, 2]))
    with pytest.raises(RemoteProtocolError, match="not a valid msgpack"):
        decode(encode(Ping(1)) + b"\x00")


def test_ext_types_rejected() -> None:
    d = {"v": 1, "t": "test.offer", "task_id": "x", "params": msgpack.ExtType(5, b"")}
    with pytest.raises(RemoteProtocolError, match="ext"):
        decode(msgpack.packb(d))
    d["params"] = msgpack.Timestamp(1)
    with pytest.raises(RemoteProtocolError):
        decode(msgpack.packb(d))


def test_size_and_depth_limits() -> None:
    with pytest.raises(RemoteProtocolError, match="over"):
        decode(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    deep: object = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    data = msgpack.packb({"v": 1, "t": "test.offer", "task_id": "x", "params": deep})
    with pytest.raises(RemoteProtocolError, match="nested deeper"):
        decode(data)
    with pytest.raises(RemoteProtocolError):
        decode(b"\x91" * 100_000)  # msgpack's own stack limit
    long_list = msgpack.packb({"v": 1, "t": "test.offer", "task_id": "x", "params": [0] * 70_000})
    with pytest.raises(RemoteProtocolError):
        decode(long_list)


def test_encode_refuses_misuse() -> None:
    with pytest.raises(LocalProtocolError, match="not a registered"):
        encode(Ref("a", 1, 1, ()))
    with pytest.raises(LocalProtocolError, match="test.offer.blob.size: expected int, got str"):
        encode(Offer("t", None, Ref("a", "1", 1, ())))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="test.offer.params: not a Json value: object"):
        encode(Offer("t", object()))
    with pytest.raises(LocalProtocolError, match="NaN"):
        encode(Offer("t", None, weights={"a": math.nan}))
    with pytest.raises(LocalProtocolError, match="over"):
        encode(Offer("t", "x" * MAX_MESSAGE_BYTES))


def test_registration_errors() -> None:
    with pytest.raises(LocalProtocolError, match="already registered"):

        @message("test.ping")
        @dataclass(frozen=True)
        class OtherPing:
            n: int

    with pytest.raises(LocalProtocolError, match="unsupported field type"):

        @message("test.bad")
        @dataclass(frozen=True)
        class Bad:
            x: set[int]

    with pytest.raises(LocalProtocolError, match="only `X | None`"):

        @record
        @dataclass(frozen=True)
        class Bad2:
            x: int | str


def test_forward_reference_resolved_at_first_use() -> None:
    msg = Later(Late(3))
    assert decode(encode(msg)) == msg


@message("test.later")
@dataclass(frozen=True, slots=True)
class Later:
    inner: Late


@record
@dataclass(frozen=True, slots=True)
class Late:
    x: int
