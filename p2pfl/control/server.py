"""The control socket server (trio side); the protocol is described in p2pfl/control/__init__.py."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from p2pfl.control.framing import (
    BLOB_CHUNK,
    HEADER,
    decode_body,
    encode_frame,
    frame_length,
    one_line,
    socket_is_live,
    unix_address,
)
from p2pfl.errors import LocalProtocolError, P2PFLError, RemoteProtocolError, ValidationError

log = logging.getLogger("p2pfl.control")


class NodeAPI(Protocol):
    """What the node offers the control socket (implemented in p2pfl/node.py)."""

    def info(self) -> dict[str, Any]: ...
    def peers(self) -> list[dict[str, Any]]: ...
    async def publish(
        self, path: str, run: bool, params: dict[str, str], rollout: str = ""
    ) -> dict[str, Any]: ...
    def taskpacks(self) -> list[dict[str, Any]]: ...
    async def create_task(
        self, ref: str, params: dict[str, str], rollout: str = ""
    ) -> dict[str, Any]: ...
    def tasks(self) -> list[dict[str, Any]]: ...
    def task(self, task_id: str) -> dict[str, Any]: ...
    def watch_task(self, task_id: str) -> AsyncIterator[dict[str, Any]]: ...
    def result(self, task_id: str) -> dict[str, Any]: ...
    def read_blob(self, cid: str) -> bytes | None: ...
    # Site policy and audit (p2pfl/policy; Node methods in p2pfl/node.py).
    def policy_show(self) -> dict[str, Any]: ...
    def policy_reload(self) -> dict[str, Any]: ...
    def policy_check(self, task_id: str) -> dict[str, Any]: ...
    def audit(self, task: str | None = None) -> list[dict[str, Any]]: ...
    def cancel_task(self, task_id: str, reason: str = "") -> dict[str, Any]: ...
    def withdraw_task(self, task_id: str) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------
# The server.


@dataclasses.dataclass(frozen=True)
class _Op:
    fn: Callable[..., Any]
    args: dict[str, type | tuple[type, ...]]  # argument name -> accepted types
    kind: str = "sync"  # "sync", "async" or "stream"
    subject: str = ""  # what a KeyError is about ("task", "taskpack", "blob")


class ControlServer:
    """Serves `api` on the Unix socket at `path` (see the module docstring)."""

    def __init__(self, path: Path, api: NodeAPI) -> None:
        self.path = Path(path)
        self.api = api
        self._ops: dict[str, _Op] = {
            "ping": _Op(lambda: "pong", {}),
            "info": _Op(api.info, {}),
            "peers": _Op(api.peers, {}),
            "publish": _Op(
                self._publish,
                {"path": str, "run": bool, "params": dict, "rollout": str},
                "async",
                "taskpack",
            ),
            "taskpacks": _Op(api.taskpacks, {}),
            "create_task": _Op(
                self._create_task,
                {"ref": str, "params": dict, "rollout": str},
                "async",
                "taskpack",
            ),
            "tasks": _Op(api.tasks, {}),
            "task": _Op(api.task, {"task_id": str}, subject="task"),
            "watch_task": _Op(api.watch_task, {"task_id": str}, "stream", "task"),
            "result": _Op(api.result, {"task_id": str}, subject="task"),
            "read_blob": _Op(
                self._read_blob, {"cid": str, "offset": int, "length": int}, subject="blob"
            ),
            "policy_show": _Op(api.policy_show, {}),
            "policy_reload": _Op(api.policy_reload, {}),
            "policy_check": _Op(api.policy_check, {"task_id": str}, subject="task"),
            "audit": _Op(api.audit, {"task": (str, type(None))}),
            "cancel_task": _Op(api.cancel_task, {"task_id": str, "reason": str}, subject="task"),
            "withdraw_task": _Op(api.withdraw_task, {"task_id": str}, subject="task"),
        }
        flows = getattr(api, "flows_api", None)
        if flows is not None:  # flows (p2pfl/flow/api.py) bring their own ops
            from p2pfl.flow.api import control_ops

            for name, (fn, args, kind) in control_ops(flows).items():
                self._ops[name] = _Op(fn, args, kind, "flow")
        self._inode: tuple[int, int] | None = None

    # -- ops that adapt the api ------------------------------------------------------------

    async def _publish(
        self, path: str, run: bool, params: dict[str, str], rollout: str = ""
    ) -> dict[str, Any]:
        return await self.api.publish(path, run, _str_params(params), rollout[:1000])

    async def _create_task(
        self, ref: str, params: dict[str, str], rollout: str = ""
    ) -> dict[str, Any]:
        return await self.api.create_task(ref, _str_params(params), rollout[:1000])

    def _read_blob(self, cid: str, offset: int = 0, length: int = BLOB_CHUNK) -> dict[str, Any]:
        data = self.api.read_blob(cid)
        if data is None:
            raise KeyError(f"blob {cid} is not stored on this node")
        if offset < 0 or length < 0:
            raise RemoteProtocolError("read_blob: offset and length must be >= 0")
        length = min(length, BLOB_CHUNK)
        return {"data": bytes(data[offset : offset + length]), "size": len(data)}

    # -- socket life cycle -----------------------------------------------------------------

    def _bind(self) -> socket.socket:
        """Bind and listen, owner-only, replacing a stale socket but never a live one.

        The socket is bound inside a fresh 0700 directory, chmod-ed 0600, then hard-linked
        into place: link() fails if the name exists, so two nodes cannot both take it, and
        the socket is never reachable with looser permissions.
        """
        d = self.path.parent
        if not d.exists():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
        tmpdir = Path(tempfile.mkdtemp(prefix=".control-", dir=d))
        tmp = tmpdir / "s"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with unix_address(tmp) as addr:
                sock.bind(addr)
            os.chmod(tmp, 0o600)
            sock.listen(64)
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    self._remove_stale()
                except OSError:
                    # A file system without hard links for sockets: rename (which would
                    # replace a socket that appeared meanwhile; a rare, local race).
                    if self.path.exists():
                        self._remove_stale()
                    os.rename(tmp, self.path)
                    break
            else:
                raise LocalProtocolError(f"could not take the control socket {self.path}")
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
            with contextlib.suppress(OSError):
                tmpdir.rmdir()
        return sock

    def _remove_stale(self) -> None:
        st = os.lstat(self.path)
        if not stat.S_ISSOCK(st.st_mode):
            raise LocalProtocolError(f"{self.path} exists and is not a socket; not replacing it")
        if socket_is_live(self.path):
            raise LocalProtocolError(
                f"a node is already running in {self.path.parent} (its control socket answers)"
            )
        log.info("removing stale control socket %s", self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _unlink_ours(self) -> None:
        """Remove the socket file, unless another node has replaced it since."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status.started()` once clients can connect."""
        sock = self._bind()
        try:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, [listener])
                log.info("control socket listening at %s", self.path)
                task_status.started()
        finally:
            self._unlink_ours()
            sock.close()

    # -- one connection --------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Never let one client's trouble escape: serve_listeners would take the node down.
        try:
            async with stream, trio.open_nursery() as nursery:
                send, recv = trio.open_memory_channel[dict[str, Any]](8)
                nursery.start_soon(self._reader, stream, send, nursery.cancel_scope)
                async with recv:
                    async for req in recv:
                        await self._serve_request(stream, req)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("control client went away")
        except Exception:
            log.exception("control connection failed")

    async def _reader(
        self,
        stream: trio.SocketStream,
        send: trio.MemorySendChannel[dict[str, Any]],
        conn_scope: trio.CancelScope,
    ) -> None:
        """Parse frames into requests. EOF or garbage ends the whole connection, which also
        cancels a stream in progress (nobody is left to read it)."""
        buf = bytearray()
        async with send:
            try:
                while True:
                    header = await _read_exact(stream, buf, HEADER.size)
                    if header is None:
                        break
                    body = await _read_exact(stream, buf, frame_length(header))
                    if body is None:
                        raise RemoteProtocolError("connection closed inside a frame")
                    await send.send(_check_request(decode_body(body)))
            except RemoteProtocolError as exc:
                log.warning("closing control connection: %s", exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        conn_scope.cancel()

    async def _serve_request(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        rid, op_name, args = req["id"], req["op"], req["args"]
        op = self._ops.get(op_name)
        try:
            if op is None:
                raise RemoteProtocolError(f"unknown op {op_name!r}")
            kwargs = _check_args(op_name, op, args)
            if op.kind == "stream":
                await self._stream(stream, rid, op, kwargs)
                result: Any = None
            elif op.kind == "async":
                result = await op.fn(**kwargs)
            else:
                result = op.fn(**kwargs)
            frame = encode_frame({"id": rid, "ok": True, "result": result})
        except Exception as exc:
            frame = encode_frame(self._error_reply(rid, op_name, op, req["args"], exc))
        await stream.send_all(frame)

    async def _stream(
        self, stream: trio.SocketStream, rid: int, op: _Op, kwargs: dict[str, Any]
    ) -> None:
        events = op.fn(**kwargs)
        try:
            async for event in events:
                await stream.send_all(encode_frame({"id": rid, "event": event}))
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()

    def _error_reply(
        self, rid: int, op_name: str, op: _Op | None, args: dict[str, Any], exc: Exception
    ) -> dict[str, Any]:
        if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
            raise exc  # the client is gone: nothing to reply to
        kind = type(exc).__name__
        if isinstance(exc, KeyError):
            message = _key_error_message(exc, op, args)
            kind = "KeyError"
        else:
            message = one_line(exc)
        if not isinstance(exc, _EXPECTED):
            # Not one of ours: probably a bug in the node; keep the traceback in the log.
            log.warning("control op %s failed", op_name, exc_info=exc)
        reply: dict[str, Any] = {"id": rid, "ok": False, "error": message, "kind": kind}
        if isinstance(exc, ValidationError):
            reply["problems"] = list(exc.problems)
        return reply


# Errors the api raises on purpose; anything else is likely a bug and is logged in full.
_EXPECTED = (P2PFLError, KeyError, ValueError, OSError)


def _str_params(params: dict[Any, Any]) -> dict[str, str]:
    bad = [k for k, v in params.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise RemoteProtocolError(f"params must map strings to strings (bad: {bad[0]!r})")
    return dict(params)


def _key_error_message(exc: KeyError, op: _Op | None, args: dict[str, Any]) -> str:
    arg = exc.args[0] if exc.args else ""
    if isinstance(arg, str) and " " in arg:  # the api already wrote a sentence
        return one_line(exc)
    subject = op.subject if op is not None and op.subject else "item"
    ref = next((v for v in args.values() if isinstance(v, str)), arg)
    return f"unknown {subject} {ref}"


def _check_request(msg: dict[str, Any]) -> dict[str, Any]:
    rid, op, args = msg.get("id"), msg.get("op"), msg.get("args", {})
    if type(rid) is not int or not isinstance(op, str) or not isinstance(args, dict):
        raise RemoteProtocolError("control request must be {id: int, op: str, args: map}")
    return {"id": rid, "op": op, "args": args}


def _check_args(op_name: str, op: _Op, args: dict[str, Any]) -> dict[str, Any]:
    for name, value in args.items():
        want = op.args.get(name)
        if want is None:
            raise RemoteProtocolError(f"{op_name}: unexpected argument {name!r}")
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise RemoteProtocolError(f"{op_name}: argument {name!r} has the wrong type")
    return dict(args)


async def _read_exact(stream: trio.SocketStream, buf: bytearray, n: int) -> bytes | None:
    """Exactly n bytes (keeping any surplus in buf), or None on EOF at a frame boundary."""
    while len(buf) < n:
        chunk = await stream.receive_some(min(max(65536, n - len(buf)), 1 << 20))
        if not chunk:
            if buf:
                raise RemoteProtocolError("connection closed inside a frame")
            return None
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


__all__ = ["ControlServer", "NodeAPI"]
