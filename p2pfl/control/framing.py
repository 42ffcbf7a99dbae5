"""Control socket framing, shared by the server (trio) and the client (plain sockets).

No trio here: the client, and so `import p2pfl`, must stay light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

import msgpack

from p2pfl.errors import LocalProtocolError, RemoteProtocolError, ValidationError

MAX_FRAME = 64 * 1024 * 1024
HEADER = struct.Struct(">I")
# read_blob replies carry at most this much of a blob; the client asks again for the rest,
# so a blob of any size fits under MAX_FRAME.
BLOB_CHUNK = 16 * 1024 * 1024
# AF_UNIX paths are limited to 108 bytes on Linux; longer ones go through /proc/self/fd.
_MAX_SUN_PATH = 100


def _to_msgpack(obj: object) -> object:
    """Values msgpack does not know, as the node may hand them to us: make them plain."""
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    if isinstance(obj, tuple):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    for attr in ("item", "tolist"):  # numpy scalars and arrays
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    raise TypeError(f"cannot send a {type(obj).__name__} over the control socket")


def encode_frame(msg: dict[str, Any]) -> bytes:
    """One frame: length prefix + msgpack map. Raises LocalProtocolError if oversize."""
    body = msgpack.packb(msg, default=_to_msgpack, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(f"control frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes, *, strict_keys: bool = True) -> dict[str, Any]:
    """A frame's body as a map; RemoteProtocolError if it is not one."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=strict_keys)
    except Exception as exc:
        raise RemoteProtocolError(f"control frame is not msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise RemoteProtocolError(f"control frame is a {type(msg).__name__}, not a map")
    return msg


def frame_length(header: bytes) -> int:
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME:
        raise RemoteProtocolError(f"control frame of {n} bytes exceeds {MAX_FRAME}")
    return n


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (replies and CLI errors are one line)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) would add quotes
    elif isinstance(exc, ValidationError):
        head = str(exc).split("\n", 1)[0]
        text = f"{head} {'; '.join(exc.problems)}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for `path` that fits in sockaddr_un, even when `path` is long.

    A long path is reached through an O_PATH descriptor of its directory
    (/proc/self/fd/N/name), so no chdir (which is process-wide) is needed.
    """
    text = os.fspath(path)
    if len(text.encode()) <= _MAX_SUN_PATH:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def socket_is_live(path: Path, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the Unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with unix_address(path) as addr:
                s.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return False
            # A timeout or EAGAIN means a listener exists but its backlog is full.
            return True
        return True
