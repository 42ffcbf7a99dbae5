"""yamux credit in batches (p2pfl/net/libp2p/_yamux.py), between real hosts on 127.0.0.1."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from libp2p.stream_muxer.yamux import yamux as ym

from p2pfl.net.base import FetchDone, FetchFailed, Message
from p2pfl.net.libp2p import _yamux
from tests.net.test_libp2p import start_node

MIB = 1024 * 1024
TYPE_WINDOW_UPDATE = 1


@pytest.fixture
def window_updates() -> Iterator[list[int]]:
    """Every plain WINDOW_UPDATE frame (no SYN/ACK/FIN/RST flag) any host writes: its
    credit increments, in order."""
    seen: list[int] = []
    original = ym.Yamux._write_frame

    async def counting(self: Any, data: bytes) -> None:
        _version, typ, flags, _sid, length = struct.unpack(ym.YAMUX_HEADER_FORMAT, data[:12])
        if typ == TYPE_WINDOW_UPDATE and flags == 0:
            seen.append(length)
        await original(self, data)

    ym.Yamux._write_frame = counting  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        ym.Yamux._write_frame = original  # type: ignore[method-assign]


async def _send_small_messages(nursery: trio.Nursery, count: int) -> tuple[Any, Any]:
    # No bulk port: direct messages stay on their yamux stream (no message channel).
    a = await start_node(nursery, bulk_tcp=False)
    b = await start_node(nursery, bootstrap=[a.addr], bulk_tcp=False)
    await a.rec.wait_for(lambda ev: b.id in a.rec.connected())
    # One at a time, each after the last arrived: each is then its own write and read
    # (messages queued together leave in one write, see _direct_sender).
    for i in range(count):
        a.net.send(b.id, b"m%04d" % i + bytes(100))
        await b.rec.wait_for(
            lambda ev, i=i: len([e for e in b.rec.of(Message) if e.topic is None]) > i,
            timeout=30,
        )
    return a, b


async def test_small_messages_cost_no_window_update_each(
    nursery: trio.Nursery, window_updates: list[int]
) -> None:
    # 300 direct messages of 105 bytes on one stream: about 32 KB, an eighth of the
    # 256 KiB window, so no credit needs returning. py-libp2p's own rule sent a
    # WINDOW_UPDATE back after nearly every read (the frame length and the frame body are
    # two): hundreds here.
    a, b = await _send_small_messages(nursery, 300)
    got = [e.data[:5] for e in b.rec.of(Message) if e.topic is None and e.sender == a.id]
    assert got == [b"m%04d" % i for i in range(300)]  # all there, in order
    assert len(window_updates) < 30  # pings, peer exchange, gossip hellos: a few each


async def test_py_libp2p_rule_sends_an_update_per_read(
    nursery: trio.Nursery, window_updates: list[int]
) -> None:
    # The same exchange under py-libp2p's own rule: what the batching saves.
    _yamux.uninstall()
    try:
        await _send_small_messages(nursery, 300)
    finally:
        _yamux.install()
    assert len(window_updates) >= 300


async def test_transfers_larger_than_the_window_still_flow(
    nursery: trio.Nursery, window_updates: list[int]
) -> None:
    # 6 MiB over the blob stream protocol (no bulk path): 24 times the initial window, so
    # the reader must return credit as it consumes or the sender stalls for good.
    a = await start_node(nursery, bulk_tcp=False)
    b = await start_node(nursery, bootstrap=[a.addr], bulk_tcp=False)
    a.blobs["big"] = os.urandom(6 * MIB)
    await b.rec.wait_for(lambda ev: a.id in b.rec.connected())
    for off in range(0, 6 * MIB, 2 * MIB):
        b.net.fetch(a.id, "big", off, 2 * MIB, off)
    await b.rec.wait_for(
        lambda ev: len(b.rec.of(FetchDone)) + len(b.rec.of(FetchFailed)) >= 3, timeout=60
    )
    assert [e.reason for e in b.rec.of(FetchFailed)] == []
    data = b"".join(e.data for e in sorted(b.rec.of(FetchDone), key=lambda e: e.token))
    assert data == a.blobs["big"]
    # Credit came back in batches of at least half a window, never per read.
    big = [n for n in window_updates if n >= 128 * 1024]
    assert big and len(window_updates) < 60
