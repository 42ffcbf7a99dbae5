"""Bulk session streams (/p2pfl/bulk/1.1.0): one stream carries range after range, kept
between them by the fetcher (p2pfl/net/libp2p/_fetch.BulkStreams), between real hosts.

A fetcher prefers a bulk channel (/p2pfl/bulk/1.2.0, tests/net/test_libp2p_bulk_channel.py);
here the server is one without channels, so its ranges are negotiated on sessions."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.custom_types import TProtocol

from p2pfl.net.base import FetchDone, FetchFailed
from p2pfl.net.libp2p import _bulk, _channel
from tests.net.test_libp2p import start_node

KIB = 1024


async def _fetch_wave(b: Any, a: Any, offsets: list[int], size: int) -> None:
    before = len(b.rec.of(FetchDone)) + len(b.rec.of(FetchFailed))
    for off in offsets:
        b.net.fetch(a.id, "blob", off, size, off)
    await b.rec.wait_for(
        lambda ev: len(b.rec.of(FetchDone)) + len(b.rec.of(FetchFailed)) >= before + len(offsets),
        timeout=30,
    )


async def _pair(nursery: trio.Nursery) -> tuple[Any, Any]:
    a = await start_node(nursery)
    a.net._host.remove_stream_handler(TProtocol(_channel.BULK_CHANNEL_PROTOCOL))
    b = await start_node(nursery, bootstrap=[a.addr])
    a.blobs["blob"] = os.urandom(64 * 64 * KIB)
    await b.rec.wait_for(lambda ev: a.id in b.rec.connected())
    return a, b


def _check(a: Any, b: Any, count: int) -> None:
    assert [e.reason for e in b.rec.of(FetchFailed)] == []
    done = b.rec.of(FetchDone)
    assert len(done) == count
    for e in done:
        assert e.data == a.blobs["blob"][e.token : e.token + 64 * KIB]


async def test_ranges_from_one_peer_reuse_kept_streams(nursery: trio.Nursery) -> None:
    a, b = await _pair(nursery)
    await _fetch_wave(b, a, [i * 64 * KIB for i in range(3)], 64 * KIB)
    extra = b.net.stats().extra
    assert extra.get("bulk_streams_reused", 0) == 0  # nothing kept yet
    assert b.net._bulk_streams.idle(a.id) == 3  # each went back after its range
    for wave in range(4):  # one at a time: each takes the stream the last one gave back
        await _fetch_wave(b, a, [(3 + wave) * 64 * KIB], 64 * KIB)
    _check(a, b, 7)
    extra = b.net.stats().extra
    assert extra["bulk_streams_reused"] == 4
    assert extra["bulk_fetches"] == 7
    # The server counted every range it served on the kept streams (it counts a serve
    # once its range is sent, which the fetcher may see first).
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert a.net.stats().extra["blob_served"] == 7


async def test_a_peer_without_sessions_gets_a_stream_per_range(nursery: trio.Nursery) -> None:
    # An older peer speaks only /p2pfl/bulk/1.0.0: multistream-select picks it, and the
    # fetcher closes each stream after its range instead of keeping it.
    a, b = await _pair(nursery)
    a.net._host.remove_stream_handler(TProtocol(_bulk.BULK_SESSION_PROTOCOL))
    await _fetch_wave(b, a, [0, 64 * KIB], 64 * KIB)
    await _fetch_wave(b, a, [2 * 64 * KIB], 64 * KIB)
    _check(a, b, 3)
    extra = b.net.stats().extra
    assert extra["bulk_fetches"] == 3 and "bulk_fallbacks" not in extra
    assert "bulk_streams_reused" not in extra and b.net._bulk_streams.idle(a.id) == 0


async def test_a_kept_stream_the_server_closed_is_replaced(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server ends idle sessions (here after 0.2 s) while the fetcher would still reuse
    # them (its limit raised to an hour): the dead stream is swapped for a fresh one, the
    # range arrives, and no fallback to the stream protocol happens.
    monkeypatch.setattr(_bulk, "SESSION_IDLE_S", 0.2)
    monkeypatch.setattr(_bulk, "FETCHER_IDLE_S", 3600.0)
    a, b = await _pair(nursery)
    await _fetch_wave(b, a, [0], 64 * KIB)
    assert b.net._bulk_streams.idle(a.id) == 1
    await trio.sleep(0.6)  # the server closed its side
    await _fetch_wave(b, a, [64 * KIB], 64 * KIB)
    _check(a, b, 2)
    extra = b.net.stats().extra
    assert extra["bulk_streams_reused"] == 1 and "bulk_fallbacks" not in extra
    assert b.net._bulk_streams.idle(a.id) == 1  # the fresh one, kept in turn


async def test_ranges_come_on_kept_tcp_connections(nursery: trio.Nursery) -> None:
    # Each range is still its own one-time token and key; only the TCP connect is saved.
    a, b = await _pair(nursery)
    await _fetch_wave(b, a, [0], 64 * KIB)
    assert a.net._bulk.accepted == 1 and b.net._bulk_streams.sockets.pool.count() == 1
    for wave in range(3):
        await _fetch_wave(b, a, [(1 + wave) * 64 * KIB], 64 * KIB)
    _check(a, b, 4)
    assert a.net._bulk.accepted == 1  # one connection carried all four ranges
    assert b.net.stats().extra["bulk_fetches"] == 4


async def test_a_kept_connection_the_server_closed_is_replaced(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server closes kept connections past MAX_KEPT_CONNECTIONS (here: at once, after
    # each range); the fetcher's kept one then ends before an answer, and the same token
    # goes on a fresh connection: the range arrives, with no fallback.
    monkeypatch.setattr(_bulk, "MAX_KEPT_CONNECTIONS", 0)
    a, b = await _pair(nursery)
    for wave in range(3):
        await _fetch_wave(b, a, [wave * 64 * KIB], 64 * KIB)
    _check(a, b, 3)
    assert a.net._bulk.accepted == 3 and a.net._bulk._kept == 0
    assert "bulk_fallbacks" not in b.net.stats().extra


async def test_a_connection_with_a_wrong_token_after_a_range_is_closed(
    nursery: trio.Nursery,
) -> None:
    # A kept connection is no licence: a token the server did not hand out ends it.
    a, b = await _pair(nursery)
    await _fetch_wave(b, a, [0], 64 * KIB)
    sockets = b.net._bulk_streams.sockets
    (address,) = sockets.pool.keys()
    sock = sockets.take(address)
    assert sock is not None
    await sock.send_all(os.urandom(_bulk.TOKEN_LEN))
    with trio.fail_after(10):
        assert await sock.receive_some(4) == b""  # closed, nothing sent
    await sock.aclose()
    assert a.net._bulk._kept == 0
