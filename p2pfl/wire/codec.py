"""Typed msgpack messages: registration, canonical encoding, strict validating decoding.

A message on the wire is a msgpack map ``{"v": WIRE_VERSION, "t": <type name>, <fields>}``.
Each registered dataclass gets a pair of converters compiled once (at registration, or at
first use when an annotation names a class defined later), so decoding a small message is
a msgpack unpack plus a handful of ``type(x) is T`` checks.

Errors: a peer's bad bytes raise `RemoteProtocolError` naming the field path
(``task.offer.blob.size: expected int, got str``); our own misuse (unregistered class,
wrong field type on encode, oversize message) raises `LocalProtocolError`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeAlias, TypeVar

import msgpack

from p2pfl.errors import LocalProtocolError, RemoteProtocolError

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024
# Longest array or map accepted anywhere in a message (msgpack enforces it while parsing).
MAX_CONTAINER_LEN = 65536
# Deepest nesting of containers inside a Json value.
MAX_JSON_DEPTH = 32
# Most values (scalars and containers) inside one Json field.
MAX_JSON_ITEMS = 65536

_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1

_JSON_MARK = "p2pfl.wire.Json"
# Any msgpack-native value: None, bool, int, float, str, bytes, list, dict[str, Json].
# For type checkers it is Any; the codec recognises the marker (and bare Any) as "Json".
Json: TypeAlias = Annotated[Any, _JSON_MARK]

T = TypeVar("T")


class _Invalid(Exception):
    """Internal: a validation failure; `parts` collects the path innermost-first."""

    def __init__(self, msg: str) -> None:
        self.msg = msg
        self.parts: list[str] = []


def _tname(v: object) -> str:
    return type(v).__name__


def _bad(expected: str, v: object) -> _Invalid:
    return _Invalid(f"expected {expected}, got {_tname(v)}")


def _join(root: str, parts: list[str]) -> str:
    path = root
    for p in reversed(parts):
        path = path + p if p.startswith("[") else f"{path}.{p}"
    return path


# --- scalar converters (one function serves both directions unless noted) ----------------


def _dec_int(v: Any) -> int:
    if type(v) is not int:
        raise _bad("int", v)
    if v < _INT_MIN or v > _INT_MAX:
        raise _Invalid("int outside int64")
    return v


def _enc_int(v: Any) -> int:
    if type(v) is not int:
        # IntEnum and friends are ints; bool is not a number here.
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad("int", v)
        v = int(v)
    if v < _INT_MIN or v > _INT_MAX:
        raise _Invalid("int outside int64")
    return v


def _float(v: Any) -> float:
    t = type(v)
    if t is float:
        if math.isfinite(v):
            return v
        raise _Invalid("NaN/Inf not allowed")
    if t is int:  # an int where a float is expected is fine (msgpack packs 1.0 as float)
        if v < _INT_MIN or v > _INT_MAX:
            raise _Invalid("int outside int64")
        return float(v)
    raise _bad("float", v)


def _enc_float(v: Any) -> float:
    t = type(v)
    if t is float or t is int:
        return _float(v)
    if isinstance(v, float | int) and not isinstance(v, bool):  # numpy floats, IntEnum...
        return _float(float(v))
    raise _bad("float", v)


def _dec_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _bad("bool", v)
    return v


def _dec_str(v: Any) -> str:
    if type(v) is not str:
        raise _bad("str", v)
    return v


def _enc_str(v: Any) -> str:
    if type(v) is not str:
        if not isinstance(v, str):
            raise _bad("str", v)
        v = str(v)
    return v


def _dec_bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise _bad("bytes", v)
    return v


def _enc_bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        if not isinstance(v, bytes | bytearray | memoryview):
            raise _bad("bytes", v)
        v = bytes(v)
    return v


# --- Json -----------------------------------------------------------------------------------


def _json(v: Any, encoding: bool) -> Any:
    """Validate (and on encode, normalise) a Json value: depth, size, types, finiteness."""
    return _walk(v, 0, [MAX_JSON_ITEMS], encoding)


def _walk(x: Any, depth: int, budget: list[int], encoding: bool) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _Invalid(f"Json value has more than {MAX_JSON_ITEMS} items")
    t = type(x)
    if t is str or t is bool or x is None or t is bytes:
        return x
    if t is int:
        if x < _INT_MIN or x > _INT_MAX:
            raise _Invalid("int outside int64")
        return x
    if t is float:
        if not math.isfinite(x):
            raise _Invalid("NaN/Inf not allowed")
        return x
    if t is list or (encoding and t is tuple):
        if depth >= MAX_JSON_DEPTH:
            raise _Invalid(f"nested deeper than {MAX_JSON_DEPTH}")
        out = []
        for i, item in enumerate(x):
            try:
                out.append(_walk(item, depth + 1, budget, encoding))
            except _Invalid as e:
                e.parts.append(f"[{i}]")
                raise
        return out
    if t is dict:
        if depth >= MAX_JSON_DEPTH:
            raise _Invalid(f"nested deeper than {MAX_JSON_DEPTH}")
        keys = list(x)
        for k in keys:
            if type(k) is not str:
                raise _Invalid(f"map key must be str, got {_tname(k)}")
        if encoding:
            keys.sort()  # canonical: equal dicts encode to equal bytes
        out_d = {}
        for k in keys:
            try:
                out_d[k] = _walk(x[k], depth + 1, budget, encoding)
            except _Invalid as e:
                e.parts.append(f"[{k!r}]")
                raise
        return out_d
    if encoding:  # normalise look-alikes (numpy scalars, IntEnum, StrEnum...) to natives
        if isinstance(x, bytearray | memoryview):
            return bytes(x)
        if isinstance(x, int) and not isinstance(x, bool):
            return _walk(int(x), depth, budget, encoding)
        if isinstance(x, float):
            return _walk(float(x), depth, budget, encoding)
        if isinstance(x, str):
            return str(x)
    raise _Invalid(f"not a Json value: {_tname(x)}")


def _dec_json(v: Any) -> Any:
    t = type(v)
    if t is str or t is bool or v is None or t is bytes:  # fast path for the common scalars
        return v
    return _json(v, False)


def _enc_json(v: Any) -> Any:
    return _json(v, True)


# --- registry ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Spec:
    cls: type
    name: str  # type name for messages, class name for records
    is_message: bool
    dec: Callable[[Any], Any] | None = None  # wire dict -> instance
    enc: Callable[[Any], dict[str, Any]] | None = None  # instance -> wire dict (fields only)
    compiling: bool = False


_MESSAGES: dict[str, _Spec] = {}  # type name -> spec
_BY_CLASS: dict[type, _Spec] = {}  # message or record class -> spec


def _is_json(tp: Any) -> bool:
    if tp is Any:
        return True
    return typing.get_origin(tp) is Annotated and _JSON_MARK in getattr(tp, "__metadata__", ())


def _compile_type(tp: Any, owner: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(decoder, encoder) converters for one annotation."""
    if _is_json(tp):
        return _dec_json, _enc_json
    if typing.get_origin(tp) is Annotated:
        return _compile_type(tp.__origin__, owner)
    if tp is bool:
        return _dec_bool, _dec_bool
    if tp is int:
        return _dec_int, _enc_int
    if tp is float:
        return _float, _enc_float
    if tp is str:
        return _dec_str, _enc_str
    if tp is bytes:
        return _dec_bytes, _enc_bytes
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is types.UnionType or origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise LocalProtocolError(f"{owner}: only `X | None` unions are supported, not {tp}")
        d, e = _compile_type(rest[0], owner)
        return (lambda v: None if v is None else d(v)), (lambda v: None if v is None else e(v))
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise LocalProtocolError(f"{owner}: only tuple[X, ...] is supported, not {tp}")
        return _compile_seq(args[0], owner, tuple)
    if origin is list:
        return _compile_seq(args[0], owner, list)
    if origin is dict:
        if args[0] is not str:
            raise LocalProtocolError(f"{owner}: dict keys must be str, not {tp}")
        return _compile_dict(args[1], owner)
    if isinstance(tp, type) and tp in _BY_CLASS:
        return _compile_nested(_BY_CLASS[tp], owner)
    raise LocalProtocolError(f"{owner}: unsupported field type {tp!r} (records need @record)")


def _compile_seq(item: Any, owner: str, kind: type) -> tuple[Callable, Callable]:
    d_item, e_item = _compile_type(item, owner)
    # Sequences of str/bytes/bool from the wire need no conversion: one C-speed type scan.
    simples: dict[Callable[[Any], Any], type] = {_dec_str: str, _dec_bytes: bytes, _dec_bool: bool}
    simple = simples.get(d_item)

    def convert(v: Any, conv: Callable[[Any], Any], accept: tuple[type, ...]) -> Any:
        if type(v) not in accept:
            raise _bad(kind.__name__, v)
        i = 0
        try:
            out = []
            for i, x in enumerate(v):  # noqa: B007 (i is read in the error path)
                out.append(conv(x))
        except _Invalid as e:
            e.parts.append(f"[{i}]")
            raise
        return kind(out) if kind is tuple else out

    def dec(v: Any) -> Any:
        if simple is not None and type(v) is list:
            if all(type(x) is simple for x in v):
                return tuple(v) if kind is tuple else v
        return convert(v, d_item, (list,))

    return dec, lambda v: convert(v, e_item, (list, tuple))


def _compile_dict(value: Any, owner: str) -> tuple[Callable, Callable]:
    d_val, e_val = _compile_type(value, owner)

    def convert(v: Any, conv: Callable[[Any], Any], encoding: bool) -> dict[str, Any]:
        if type(v) is not dict:
            raise _bad("dict", v)
        keys = list(v)
        for k in keys:
            if type(k) is not str:
                raise _Invalid(f"map key must be str, got {_tname(k)}")
        if encoding:
            keys.sort()  # canonical: equal dicts encode to equal bytes
        out = {}
        k = ""
        try:
            for k in keys:
                out[k] = conv(v[k])
        except _Invalid as e:
            e.parts.append(f"[{k!r}]")
            raise
        return out

    return (lambda v: convert(v, d_val, False)), (lambda v: convert(v, e_val, True))


def _compile_nested(spec: _Spec, owner: str) -> tuple[Callable, Callable]:
    if spec.compiling:
        raise LocalProtocolError(f"{owner}: recursive record {spec.cls.__name__} not supported")
    _ensure(spec)
    cls = spec.cls

    def dec(v: Any) -> Any:
        if type(v) is not dict:
            raise _bad(f"map ({cls.__name__})", v)
        return spec.dec(v)  # type: ignore[misc]

    def enc(v: Any) -> Any:
        if type(v) is not cls:
            raise _bad(cls.__name__, v)
        return spec.enc(v)  # type: ignore[misc]

    return dec, enc


def _ensure(spec: _Spec) -> None:
    """Compile `spec`'s converters now if not yet done (annotations may name later classes)."""
    if spec.dec is not None:
        return
    spec.compiling = True
    try:
        _compile_spec(spec)
    finally:
        spec.compiling = False


def _compile_spec(spec: _Spec) -> None:
    cls = spec.cls
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except NameError as e:
        raise LocalProtocolError(f"{cls.__name__}: cannot resolve annotation: {e}") from e
    fields = []  # (name, decoder, encoder, required)
    for f in dataclasses.fields(cls):
        if not f.init:
            raise LocalProtocolError(f"{cls.__name__}.{f.name}: init=False fields not supported")
        decoder, encoder = _compile_type(hints[f.name], f"{cls.__name__}.{f.name}")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, decoder, encoder, required))
    names = frozenset(f[0] for f in fields)
    # Messages carry "v" and "t" in the same map as their fields.
    extra_ok = 2 if spec.is_message else 0
    reserved = {"v", "t"} & names
    if spec.is_message and reserved:
        raise LocalProtocolError(f"{cls.__name__}: field names {sorted(reserved)} are reserved")

    def dec(d: dict[Any, Any]) -> Any:
        kwargs = {}
        name = ""
        try:
            for name, conv, _e, required in fields:
                if name in d:
                    kwargs[name] = conv(d[name])
                elif required:
                    raise _Invalid("missing field")
        except _Invalid as e:
            e.parts.append(name)
            raise
        # A top-level message's map also holds "v" and "t"; the same class nested as a
        # field is encoded without them. Count the ones actually present.
        tags = ("v" in d) + ("t" in d) if extra_ok else 0
        if len(d) - tags != len(kwargs):
            # Every known field present went into kwargs, so the rest are unknown.
            unknown = sorted(
                repr(k) for k in d if k not in names and not (extra_ok and k in ("v", "t"))
            )
            raise _Invalid(f"unknown field(s) {', '.join(unknown)}")
        return cls(**kwargs)

    def enc(obj: Any) -> dict[str, Any]:
        out = {}
        name = ""
        try:
            for name, _d, conv, _r in fields:
                out[name] = conv(getattr(obj, name))
        except _Invalid as e:
            e.parts.append(name)
            raise
        return out

    spec.dec, spec.enc = dec, enc


def _register(cls: type, spec: _Spec) -> None:
    if not dataclasses.is_dataclass(cls):
        raise LocalProtocolError(f"{cls.__name__}: @message/@record need a @dataclass")
    _BY_CLASS[cls] = spec
    try:
        _ensure(spec)
    except LocalProtocolError as e:
        # An annotation naming a class defined later: compile at first use instead.
        if "cannot resolve annotation" not in str(e):
            del _BY_CLASS[cls]
            if spec.is_message:
                del _MESSAGES[spec.name]
            raise


def message(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass as the top-level message type `name`."""
    if not isinstance(name, str) or not name or name in ("v", "t"):
        raise LocalProtocolError(f"bad message type name {name!r}")

    def deco(cls: type[T]) -> type[T]:
        old = _MESSAGES.get(name)
        if old is not None and old.cls.__qualname__ != cls.__qualname__:
            raise LocalProtocolError(
                f"message type {name!r} already registered by {old.cls.__qualname__}"
            )
        spec = _Spec(cls, name, True)
        _MESSAGES[name] = spec
        _register(cls, spec)
        return cls

    return deco


def record(cls: type[T]) -> type[T]:
    """Class decorator: a dataclass usable as a nested field type (no type tag on the wire)."""
    _register(cls, _Spec(cls, cls.__name__, False))
    return cls


def type_name(cls_or_obj: Any) -> str:
    """The registered wire type name of a message class or instance."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    spec = _BY_CLASS.get(cls)
    if spec is None or not spec.is_message:
        raise LocalProtocolError(f"{cls.__name__} is not a registered @message")
    return spec.name


# --- encode / decode --------------------------------------------------------------------


def encode(msg: Any) -> bytes:
    """Canonical msgpack bytes of a registered message (fields in declaration order)."""
    spec = _BY_CLASS.get(type(msg))
    if spec is None or not spec.is_message:
        raise LocalProtocolError(f"{type(msg).__name__} is not a registered @message")
    _ensure(spec)
    out: dict[str, Any] = {"v": WIRE_VERSION, "t": spec.name}
    try:
        out.update(spec.enc(msg))  # type: ignore[misc]
    except _Invalid as e:
        raise LocalProtocolError(f"{_join(spec.name, e.parts)}: {e.msg}") from None
    data = msgpack.packb(out, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(
            f"{spec.name}: encoded message is {len(data)} bytes, over {MAX_MESSAGE_BYTES}"
        )
    return data


def _reject_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack ext type {code} not allowed")


def decode(
    data: bytes | bytearray | memoryview, expected: type | tuple[type, ...] | None = None
) -> Any:
    """Parse and validate one message; raises only RemoteProtocolError on bad input.

    `expected`: a message class or tuple of classes; any other type is refused before its
    fields are even looked at.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise RemoteProtocolError(f"message is {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    try:
        d = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_str_len=MAX_MESSAGE_BYTES,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_ext_len=0,
            ext_hook=_reject_ext,
        )
    except RemoteProtocolError:
        raise
    except Exception as e:  # FormatError, ExtraData, StackError, ValueError, UnicodeError...
        raise RemoteProtocolError(f"not a valid msgpack message: {type(e).__name__}: {e}") from None
    if type(d) is not dict:
        raise RemoteProtocolError(f"message is not a map (got {_tname(d)})")
    v = d.get("v")
    if type(v) is not int or v != WIRE_VERSION:
        if "v" not in d:
            raise RemoteProtocolError('message has no version field "v"')
        raise RemoteProtocolError(f"unsupported wire version {v!r} (we speak {WIRE_VERSION})")
    t = d.get("t")
    spec = _MESSAGES.get(t) if type(t) is str else None
    if spec is None or not isinstance(t, str):
        raise RemoteProtocolError(f"unknown message type {t!r}")
    if expected is not None:
        ok = spec.cls in expected if isinstance(expected, tuple) else spec.cls is expected
        if not ok:
            want = expected if isinstance(expected, tuple) else (expected,)
            names = ", ".join(_BY_CLASS[c].name if c in _BY_CLASS else c.__name__ for c in want)
            raise RemoteProtocolError(f"unexpected message type {t!r} (expected {names})")
    if spec.dec is None:
        try:
            _ensure(spec)
        except LocalProtocolError as e:  # our bug, but the caller only handles remote errors
            raise RemoteProtocolError(f"{t}: cannot decode: {e}") from e
    try:
        return spec.dec(d)  # type: ignore[misc]
    except _Invalid as e:
        raise RemoteProtocolError(f"{_join(t, e.parts)}: {e.msg}") from None
    except Exception as e:  # a dataclass __post_init__ refusing the values
        raise RemoteProtocolError(f"{t}: invalid: {type(e).__name__}: {e}") from None
