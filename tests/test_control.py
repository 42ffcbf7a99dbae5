"""The control socket server in-process (trio): framing, errors, garbage, streams, files."""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

sys.path.insert(0, str(Path(__file__).parent / "cli"))
from fakenode import FakeNodeAPI  # noqa: E402

from p2pfl.control import ControlServer  # noqa: E402
from p2pfl.control.framing import (  # noqa: E402
    HEADER,
    MAX_FRAME,
    decode_body,
    encode_frame,
    frame_length,
    unix_address,
)
from p2pfl.errors import LocalProtocolError  # noqa: E402


class Conn:
    """A raw trio connection speaking the framing, for the tests."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, msg: dict[str, Any]) -> None:
        await self.stream.send_all(encode_frame(msg))

    async def recv(self) -> dict[str, Any] | None:
        async def need(n: int) -> bool:
            while len(self.buf) < n:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    return False
                self.buf += chunk
            return True

        if not await need(HEADER.size):
            return None
        n = frame_length(bytes(self.buf[: HEADER.size]))
        assert await need(HEADER.size + n)
        body = bytes(self.buf[HEADER.size : HEADER.size + n])
        del self.buf[: HEADER.size + n]
        return decode_body(body, strict_keys=False)

    async def call(self, op: str, rid: int = 1, **args: Any) -> dict[str, Any]:
        await self.send({"id": rid, "op": op, "args": args})
        reply = await self.recv()
        assert reply is not None
        return reply


async def connect(path: Path) -> Conn:
    with unix_address(path) as addr:
        return Conn(await trio.open_unix_socket(addr))


@pytest.fixture
async def served(tmp_path: Path, nursery: trio.Nursery) -> tuple[Path, FakeNodeAPI]:
    api = FakeNodeAPI()
    path = tmp_path / "node" / "control.sock"
    await nursery.start(ControlServer(path, api).serve)
    return path, api


async def test_request_reply_and_types(served: tuple[Path, FakeNodeAPI]) -> None:
    path, _ = served
    conn = await connect(path)
    reply = await conn.call("info", rid=7)
    assert reply["id"] == 7 and reply["ok"] is True
    # Path and frozenset from the api are sent as plain values.
    assert reply["result"]["data_dir"] == "/tmp/x"
    assert reply["result"]["trusted"] == [FakeNodeAPI().peers()[0]["peer_id"]]
    # Several requests on one connection are answered in order.
    assert (await conn.call("tasks", rid=8))["id"] == 8
    assert (await conn.call("ping", rid=9))["result"] == "pong"


async def test_errors_are_one_line_replies(served: tuple[Path, FakeNodeAPI]) -> None:
    path, _ = served
    conn = await connect(path)
    r = await conn.call("task", task_id="nope")
    assert r == {"id": 1, "ok": False, "error": "unknown task nope", "kind": "KeyError"}
    r = await conn.call("result", task_id="bad1")
    assert r["kind"] == "TaskFailed" and "no quorum" in r["error"]
    r = await conn.call("result", task_id="slow1")
    assert r["kind"] == "TaskNotFinished"
    r = await conn.call("no_such_op")
    assert r["ok"] is False and r["kind"] == "RemoteProtocolError" and "no_such_op" in r["error"]
    r = await conn.call("task", task_id=5)
    assert r["kind"] == "RemoteProtocolError" and "wrong type" in r["error"]
    r = await conn.call("task", task_id="good1", extra=1)
    assert r["kind"] == "RemoteProtocolError"
    r = await conn.call("publish", path="/nonexistent", run=False, params={})
    assert r["kind"] == "ValidationError" and "\n" not in r["error"]
    assert r["problems"] == ["/nonexistent/manifest.yaml: missing"]
    r = await conn.call("create_task", ref="x", params={"a": 1})
    assert r["kind"] == "RemoteProtocolError"
    # The connection survived all of that.
    assert (await conn.call("ping"))["ok"] is True


async def test_stream_sends_events_then_reply(served: tuple[Path, FakeNodeAPI]) -> None:
    path, _ = served
    conn = await connect(path)
    await conn.send({"id": 3, "op": "watch_task", "args": {"task_id": "goo"}})
    kinds = []
    while True:
        msg = await conn.recv()
        assert msg is not None and msg["id"] == 3
        if "event" in msg:
            kinds.append(msg["event"]["kind"])
        else:
            assert msg["ok"] is True
            break
    assert kinds == ["state", "roster", "node", "round", "result"]


async def test_client_leaving_cancels_stream(served: tuple[Path, FakeNodeAPI]) -> None:
    path, api = served
    conn = await connect(path)
    await conn.send({"id": 1, "op": "watch_task", "args": {"task_id": "slow1"}})
    for _ in range(3):
        assert "event" in (await conn.recv() or {})
    await conn.stream.aclose()
    with trio.fail_after(10):
        while api.watchers_closed < 1:
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    "garbage",
    [
        HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        HEADER.pack(3) + msgpack.packb([1, 2]),  # not a map
        HEADER.pack(MAX_FRAME + 1),  # oversize
        encode_frame({"id": "x", "op": "info"}),  # not a request
        HEADER.pack(100) + b"short",  # ends inside a frame
    ],
)
async def test_garbage_closes_only_that_connection(
    served: tuple[Path, FakeNodeAPI], garbage: bytes
) -> None:
    path, _ = served
    bad = await connect(path)
    await bad.stream.send_all(garbage)
    if garbage.endswith(b"short"):
        await bad.stream.send_eof()
    with trio.fail_after(10):
        assert await bad.recv() is None  # closed without a reply
    good = await connect(path)
    assert (await good.call("ping"))["result"] == "pong"


async def test_many_clients_at_once(served: tuple[Path, FakeNodeAPI]) -> None:
    path, _ = served
    # A stream left open does not block other clients.
    streaming = await connect(path)
    await streaming.send({"id": 1, "op": "watch_task", "args": {"task_id": "slow1"}})
    results = []

    async def one(i: int) -> None:
        conn = await connect(path)
        results.append((await conn.call("info", rid=i))["id"])

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(one, i)
    assert sorted(results) == list(range(20))


async def test_blob_in_chunks(served: tuple[Path, FakeNodeAPI]) -> None:
    path, _ = served
    conn = await connect(path)
    r = await conn.call("read_blob", cid="bafymodel", offset=10, length=5)
    from fakenode import MODEL

    assert r["result"] == {"data": MODEL[10:15], "size": len(MODEL)}
    r = await conn.call("read_blob", cid="nope")
    assert r["kind"] == "KeyError" and "nope" in r["error"]


async def test_permissions_and_cleanup(tmp_path: Path) -> None:
    d = tmp_path / "fresh"
    path = d / "control.sock"
    async with trio.open_nursery() as n:
        await n.start(ControlServer(path, FakeNodeAPI()).serve)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert sorted(os.listdir(d)) == ["control.sock"]  # no temp files left
        n.cancel_scope.cancel()
    assert not path.exists()


async def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a dead node's socket file: nobody listens
    async with trio.open_nursery() as n:
        await n.start(ControlServer(path, FakeNodeAPI()).serve)
        assert (await (await connect(path)).call("ping"))["ok"]
        with pytest.raises(LocalProtocolError, match="already running"):
            await ControlServer(path, FakeNodeAPI()).serve()
        # The refused second server did not remove the live socket.
        assert (await (await connect(path)).call("ping"))["ok"]
        n.cancel_scope.cancel()


async def test_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(LocalProtocolError, match="not a socket"):
        await ControlServer(path, FakeNodeAPI()).serve()
    assert path.read_text() == "precious"


async def test_long_path(tmp_path: Path) -> None:
    d = tmp_path / ("x" * 60) / ("y" * 60)
    path = d / "control.sock"
    async with trio.open_nursery() as n:
        await n.start(ControlServer(path, FakeNodeAPI()).serve)
        assert path.exists()
        assert (await (await connect(path)).call("ping"))["ok"]
        n.cancel_scope.cancel()
    assert not path.exists()


async def test_bug_in_api_is_an_error_reply(tmp_path: Path) -> None:
    class Buggy(FakeNodeAPI):
        def tasks(self) -> list[dict[str, Any]]:
            raise ZeroDivisionError("oops")

        def peers(self) -> list[dict[str, Any]]:
            return [{"x": object()}]  # not sendable

    path = tmp_path / "control.sock"
    async with trio.open_nursery() as n:
        await n.start(ControlServer(path, Buggy()).serve)
        conn = await connect(path)
        r = await conn.call("tasks")
        assert r["kind"] == "ZeroDivisionError" and r["error"] == "oops"
        r = await conn.call("peers")
        assert r["ok"] is False and r["kind"] == "TypeError"
        assert (await conn.call("ping"))["ok"]
        n.cancel_scope.cancel()


def test_frame_roundtrip() -> None:
    frame = encode_frame({"id": 1, "op": "x", "args": {"b": b"\x00\x01"}})
    assert frame_length(frame[:4]) == len(frame) - 4
    assert decode_body(frame[4:])["args"]["b"] == b"\x00\x01"
    with pytest.raises(LocalProtocolError):
        encode_frame({"big": b"\x00" * (MAX_FRAME + 1)})
