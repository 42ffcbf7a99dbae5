"""The bulk path's byte accounting: each serve counts exactly its own bytes.

No libp2p hosts: the negotiation stream is a trio memory stream pair with the small face
py-libp2p streams have (read/write/close/reset, muxed_conn.get_remote_address), and the
range travels over the BulkServer's real TCP listener on 127.0.0.1.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
import trio.testing

from p2pfl.net.libp2p import _bulk
from p2pfl.net.libp2p._blob import FetchRefused
from p2pfl.net.libp2p._bulk import BulkServer, fetch_bulk, serve_bulk_stream


class _Conn:
    def get_remote_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 0)


class FakeStream:
    """One end of a negotiation stream; `gate` (if set) holds reads after the first
    `gate_after` of them until it is set, so a test can line fetches up."""

    def __init__(self, end: Any, gate: trio.Event | None = None, gate_after: int = 0) -> None:
        self._end = end
        self._gate = gate
        self._gate_after = gate_after
        self.reads = 0
        self.muxed_conn = _Conn()

    async def read(self, n: int | None = None) -> bytes:
        if self._gate is not None and self.reads >= self._gate_after:
            await self._gate.wait()
        data = await self._end.receive_some(n)
        self.reads += 1
        return data

    async def write(self, data: bytes) -> None:
        await self._end.send_all(data)

    async def close(self) -> None:
        await self._end.aclose()

    async def reset(self) -> None:
        await self._end.aclose()


async def test_concurrent_serves_each_count_their_own_bytes(nursery: trio.Nursery) -> None:
    server = BulkServer("127.0.0.1")
    await nursery.start(server.run)
    blobs = {"a": os.urandom(3 * 1024 * 1024 + 7), "b": os.urandom(2 * 1024 * 1024 + 11)}

    def reader(cid: str, offset: int, length: int) -> bytes | None:
        blob = blobs.get(cid)
        return None if blob is None else blob[offset : offset + length]

    # Each fetcher reads the answer's header, then waits: both ranges are offered (and
    # both serves are waiting for their collection) before either TCP transfer starts.
    both_offered = trio.Event()
    headers = 0
    at_offer: list[int] = []
    served: dict[str, tuple[int, int]] = {}
    fetched: dict[str, tuple[bytes, int]] = {}
    limit = trio.Semaphore(4)

    async def one(cid: str) -> None:
        nonlocal headers
        client_end, server_end = trio.testing.memory_stream_pair()
        client = FakeStream(client_end, both_offered, gate_after=1)

        async def serve() -> None:
            served[cid] = await serve_bulk_stream(
                FakeStream(server_end), "peer-" + cid, server, reader, limit
            )

        async def fetch() -> None:
            fetched[cid] = await fetch_bulk(client, cid, 0, len(blobs[cid]))

        async def watch() -> None:
            nonlocal headers
            while client.reads < 1:
                await trio.sleep(0.001)
            headers += 1
            if headers == 2:
                at_offer.append(server.bytes_sent)
                both_offered.set()

        async with trio.open_nursery() as inner:
            inner.start_soon(serve)
            inner.start_soon(fetch)
            inner.start_soon(watch)

    with trio.fail_after(20):
        async with trio.open_nursery() as group:
            group.start_soon(one, "a")
            group.start_soon(one, "b")

    # Both serves were in flight before any range went out: the serves overlapped, so a
    # serve that counted the server's counter's growth would have counted both ranges.
    assert at_offer == [0]
    for cid, blob in blobs.items():
        data, wire = fetched[cid]
        assert data == blob
        received, sent = served[cid]
        assert received > 0
        # The serve's bytes out are exactly the fetcher's bytes in: its own range only.
        assert sent == wire
        assert len(blob) < sent < len(blob) + 256  # the range, plus tag and framing
    # The server's total is the sum of both ranges on the TCP side, not double.
    tcp = sum(len(b) + 16 + 4 for b in blobs.values())
    assert server.bytes_sent == tcp


async def test_refused_serve_counts_its_answer(nursery: trio.Nursery) -> None:
    server = BulkServer("127.0.0.1")
    await nursery.start(server.run)
    client_end, server_end = trio.testing.memory_stream_pair()
    served: list[tuple[int, int]] = []

    async def serve() -> None:
        served.append(
            await serve_bulk_stream(
                FakeStream(server_end), "p", server, lambda *_: None, trio.Semaphore(1)
            )
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(serve)
            with pytest.raises(FetchRefused, match="not found"):
                await fetch_bulk(FakeStream(client_end), "missing", 0, 10)
    ((received, sent),) = served
    assert received > 0 and sent == 5 + len(b"not found")
    assert server.bytes_sent == 0


async def test_serve_without_a_free_slot_answers_busy(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every slot of the peer is held (by serves that are themselves bounded): the next
    # request is answered "busy" after SLOT_TIMEOUT_S instead of waiting indefinitely.
    monkeypatch.setattr(_bulk, "SLOT_TIMEOUT_S", 0.2)
    server = BulkServer("127.0.0.1")
    await nursery.start(server.run)
    limit = trio.Semaphore(1)
    await limit.acquire()
    client_end, server_end = trio.testing.memory_stream_pair()
    served: list[tuple[int, int]] = []

    async def serve() -> None:
        served.append(
            await serve_bulk_stream(
                FakeStream(server_end), "p", server, lambda *_: b"x" * 10, limit
            )
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(serve)
            with pytest.raises(FetchRefused, match="busy"):
                await fetch_bulk(FakeStream(client_end), "cid", 0, 10)
    assert served[0][1] == 5 + len(b"busy")
    assert limit.value == 0  # the held slot was not taken, nor released, by the refused serve
