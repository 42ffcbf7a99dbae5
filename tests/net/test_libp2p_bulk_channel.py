"""Bulk channels (/p2pfl/bulk/1.2.0, p2pfl/net/libp2p/_channel.py): keys handed over a
Noise stream once, then range after range on one TCP connection; between real hosts, and
against a BulkServer spoken to by hand (the attacks)."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from libp2p.custom_types import TProtocol

from p2pfl.errors import RemoteProtocolError
from p2pfl.net.base import FetchDone, FetchFailed
from p2pfl.net.libp2p import _blob, _bulk, _channel
from tests.net.test_libp2p import start_node

KIB = 1024
RANGE = 64 * KIB


async def _pair(nursery: trio.Nursery, **config: Any) -> tuple[Any, Any]:
    a = await start_node(nursery, **config)
    b = await start_node(nursery, bootstrap=[a.addr])
    a.blobs["blob"] = os.urandom(64 * RANGE)
    await b.rec.wait_for(lambda ev: a.id in b.rec.connected())
    return a, b


async def _wave(b: Any, a: Any, offsets: list[int], cid: str = "blob") -> None:
    before = len(b.rec.of(FetchDone)) + len(b.rec.of(FetchFailed))
    for off in offsets:
        b.net.fetch(a.id, cid, off, RANGE, off)
    await b.rec.wait_for(
        lambda ev: len(b.rec.of(FetchDone)) + len(b.rec.of(FetchFailed)) >= before + len(offsets),
        timeout=30,
    )


def _check(a: Any, b: Any, count: int) -> None:
    assert [e.reason for e in b.rec.of(FetchFailed)] == []
    done = b.rec.of(FetchDone)
    assert len(done) == count
    for e in done:
        assert e.data == a.blobs["blob"][e.token : e.token + RANGE]


# --- between hosts ---------------------------------------------------------------------


async def test_ranges_come_on_one_kept_channel(nursery: trio.Nursery) -> None:
    a, b = await _pair(nursery)
    for wave in range(5):  # one at a time: each takes the channel the last one gave back
        await _wave(b, a, [wave * RANGE])
    _check(a, b, 5)
    extra = b.net.stats().extra
    assert extra["bulk_channels_opened"] == 1 and extra["bulk_channels_reused"] == 4
    assert extra["bulk_fetches"] == 5 and "bulk_fallbacks" not in extra
    assert a.net._bulk.accepted == 1  # one TCP connection carried every range
    assert b.net._bulk_streams.idle(a.id) == 0  # no session stream was needed
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert a.net.stats().extra["blob_served"] == 5
    assert a.net._bulk.channels(b.id) == 1


async def test_ranges_at_once_open_a_channel_each_and_keep_them(nursery: trio.Nursery) -> None:
    a, b = await _pair(nursery)
    await _wave(b, a, [0, RANGE, 2 * RANGE])
    assert b.net._bulk_streams.channels.idle(a.id) == 3
    await _wave(b, a, [3 * RANGE, 4 * RANGE, 5 * RANGE])
    _check(a, b, 6)
    extra = b.net.stats().extra
    assert extra["bulk_channels_opened"] == 3 and extra["bulk_channels_reused"] == 3


async def test_a_refused_or_missing_range_keeps_the_channel(nursery: trio.Nursery) -> None:
    # may_serve is asked per request, for the peer the channel's keys went to.
    def may_serve(peer: str, cid: str) -> bool:
        return cid != "secret"

    a, b = await _pair(nursery, may_serve=may_serve)
    a.blobs["secret"] = b"s" * RANGE
    await _wave(b, a, [0])
    await _wave(b, a, [0], cid="secret")
    await _wave(b, a, [0], cid="absent")
    await _wave(b, a, [RANGE])
    reasons = [e.reason for e in b.rec.of(FetchFailed)]
    assert reasons == ["not allowed", "not found"]
    assert len(b.rec.of(FetchDone)) == 2
    extra = b.net.stats().extra
    assert extra["bulk_channels_opened"] == 1 and extra["bulk_channels_reused"] == 3
    assert "bulk_fallbacks" not in extra


async def test_a_server_without_channels_gets_sessions(nursery: trio.Nursery) -> None:
    a, b = await _pair(nursery)
    a.net._host.remove_stream_handler(TProtocol(_channel.BULK_CHANNEL_PROTOCOL))
    await _wave(b, a, [0])
    await _wave(b, a, [RANGE])
    _check(a, b, 2)
    extra = b.net.stats().extra
    assert a.id in b.net._bulk_streams.channels.unsupported  # not asked again
    assert extra["bulk_streams_reused"] == 1 and "bulk_channels_opened" not in extra
    assert "bulk_fallbacks" not in extra


async def test_a_busy_server_negotiates_per_range(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server holding MAX_KEPT_CONNECTIONS connections hands out no channel: the range is
    # negotiated on a session instead, and the next range asks for a channel again.
    monkeypatch.setattr(_bulk, "MAX_KEPT_CONNECTIONS", 0)
    a, b = await _pair(nursery)
    await _wave(b, a, [0])
    await _wave(b, a, [RANGE])
    _check(a, b, 2)
    extra = b.net.stats().extra
    assert "bulk_channels_opened" not in extra and extra["bulk_fetches"] == 2
    assert a.id not in b.net._bulk_streams.channels.unsupported
    assert a.net._bulk.channels() == 0


async def test_a_kept_channel_the_server_closed_is_replaced(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bulk, "SESSION_IDLE_S", 0.2)
    monkeypatch.setattr(_bulk, "FETCHER_IDLE_S", 3600.0)
    a, b = await _pair(nursery)
    await _wave(b, a, [0])
    await trio.sleep(0.6)  # the server closed the idle channel
    assert a.net._bulk.channels() == 0
    await _wave(b, a, [RANGE])
    _check(a, b, 2)
    extra = b.net.stats().extra
    assert extra["bulk_channels_opened"] == 2 and extra["bulk_channels_reused"] == 1
    assert "bulk_fallbacks" not in extra


async def test_a_peer_gone_closes_its_channels(nursery: trio.Nursery) -> None:
    a, b = await _pair(nursery)
    await _wave(b, a, [0])
    assert a.net._bulk.channels(b.id) == 1
    a.net._peer_gone(b.id, "test")
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert a.net._bulk.channels(b.id) == 0
    b.net._bulk_streams.forget(a.id)
    assert b.net._bulk_streams.channels.idle(a.id) == 0


# --- the server, spoken to by hand -----------------------------------------------------


class _Served:
    """A channel offered by `server` to a made-up peer, as serve_channel_request would."""

    def __init__(self, server: _bulk.BulkServer, data: bytes) -> None:
        self.up, self.down = os.urandom(32), os.urandom(32)
        self.counted: list[tuple[int, int]] = []

        def reader(cid: str, offset: int, length: int) -> bytes | None:
            return data[offset : offset + length] if cid == "blob" else None

        served = _channel._Served(
            "peer",
            AESGCM(self.up),
            AESGCM(self.down),
            reader,
            trio.Semaphore(2),
            lambda got, sent: self.counted.append((got, sent)),
            lambda peer, cid: True,
        )
        claim = server.offer_channel("peer", served.serve)
        assert claim is not None
        self.token = claim[0]

    async def connect(self, server: _bulk.BulkServer) -> trio.SocketStream:
        sock = await trio.open_tcp_stream("127.0.0.1", server.port)
        await sock.send_all(self.token)
        return sock

    def request(self, i: int, offset: int = 0, length: int = RANGE) -> bytes:
        raw = _blob.encode_request("blob", offset, length)[4:]
        sealed = AESGCM(self.up).encrypt(i.to_bytes(12, "big"), raw, _channel.CHANNEL_AAD)
        return struct.pack(">I", len(sealed)) + sealed


async def _serve_nothing(sock: trio.SocketStream) -> None:
    await sock.aclose()


async def _server(nursery: trio.Nursery) -> _bulk.BulkServer:
    server = _bulk.BulkServer("127.0.0.1")
    await nursery.start(server.run)
    return server


async def _closed_without_answer(sock: trio.SocketStream) -> None:
    with trio.fail_after(10):
        assert await sock.receive_some(64) == b""
    await sock.aclose()


async def test_channel_answers_in_order_under_its_own_keys(nursery: trio.Nursery) -> None:
    server = await _server(nursery)
    data = os.urandom(4 * RANGE)
    chan = _Served(server, data)
    sock = await chan.connect(server)
    channel = _channel.Channel(sock, AESGCM(chan.up), AESGCM(chan.down))
    for k in range(3):
        got, wire = await channel.fetch("blob", k * RANGE, RANGE)
        assert got == data[k * RANGE : (k + 1) * RANGE]
        assert wire == 5 + RANGE + 16
    await trio.testing.wait_all_tasks_blocked(0.05)  # the server counts after it sends
    assert [sent for _got, sent in chan.counted] == [5 + RANGE + 16] * 3
    await channel.aclose()


async def test_a_channel_token_is_good_once(nursery: trio.Nursery) -> None:
    server = await _server(nursery)
    chan = _Served(server, b"x" * RANGE)
    first = await chan.connect(server)
    second = await chan.connect(server)  # the same token again: an unknown one now
    await _closed_without_answer(second)
    channel = _channel.Channel(first, AESGCM(chan.up), AESGCM(chan.down))
    assert (await channel.fetch("blob", 0, 16))[0] == b"x" * 16
    await channel.aclose()


async def test_a_forged_request_ends_the_channel(nursery: trio.Nursery) -> None:
    server = await _server(nursery)
    chan = _Served(server, b"x" * RANGE)
    sock = await chan.connect(server)
    junk = os.urandom(40)
    await sock.send_all(struct.pack(">I", len(junk)) + junk)
    await _closed_without_answer(sock)
    assert server.channels() == 0 and chan.counted == []


async def test_a_replayed_request_ends_the_channel(nursery: trio.Nursery) -> None:
    # Someone on the path who saw request 0 sends it again: it opens only under nonce 0.
    server = await _server(nursery)
    chan = _Served(server, b"x" * RANGE)
    sock = await chan.connect(server)
    frame = chan.request(0)
    await sock.send_all(frame)
    with trio.fail_after(10):
        answer = await _bulk._receive_exactly(sock, 5 + RANGE + 16)
    assert answer[:1] == bytes([_blob.OK])
    await sock.send_all(frame)
    await _closed_without_answer(sock)
    assert len(chan.counted) == 1


async def test_an_oversized_request_is_refused_unread(nursery: trio.Nursery) -> None:
    server = await _server(nursery)
    chan = _Served(server, b"x" * RANGE)
    sock = await chan.connect(server)
    await sock.send_all(struct.pack(">I", 1 << 30))  # and no body: it is never read
    await _closed_without_answer(sock)
    assert server.channels() == 0


async def test_channels_count_towards_the_servers_connection_cap(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bulk, "MAX_KEPT_CONNECTIONS", 2)
    server = await _server(nursery)
    _Served(server, b"")  # handed out, not yet connected: it counts
    chan = _Served(server, b"")
    sock = await chan.connect(server)
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert server.channels() == 1
    assert server.offer_channel("peer", _serve_nothing) is None
    await sock.aclose()


# --- the fetcher, against a server that lies -------------------------------------------


async def _fake_server(answer: bytes) -> tuple[_channel.Channel, trio.SocketStream]:
    """A channel whose other end is ours, which has already sent `answer`."""
    near, far = trio.socket.socketpair()
    channel = _channel.Channel(
        trio.SocketStream(near), AESGCM(os.urandom(32)), AESGCM(os.urandom(32))
    )
    server = trio.SocketStream(far)
    await server.send_all(answer)
    return channel, server


async def test_the_fetcher_refuses_a_forged_or_misplaced_answer() -> None:
    raw = _blob.encode_request("blob", 0, 16)[4:]
    body = b"y" * 16
    for nonce, aad in [(0, b"other request" + bytes([_blob.OK])), (1, raw + bytes([_blob.OK]))]:
        down = os.urandom(32)
        near, far = trio.socket.socketpair()
        channel = _channel.Channel(trio.SocketStream(near), AESGCM(os.urandom(32)), AESGCM(down))
        sealed = AESGCM(down).encrypt(nonce.to_bytes(12, "big"), body, aad)
        await trio.SocketStream(far).send_all(struct.pack(">BI", _blob.OK, len(sealed)) + sealed)
        with pytest.raises(RemoteProtocolError, match="failed authentication"):
            await channel.fetch("blob", 0, 16)


async def test_the_fetcher_refuses_an_answer_longer_than_asked_unread() -> None:
    channel, _server_end = await _fake_server(struct.pack(">BI", _blob.OK, 1 << 30))
    with pytest.raises(RemoteProtocolError, match="at most"):
        await channel.fetch("blob", 0, 16)


async def test_one_peer_holds_at_most_its_share_of_channels(nursery: trio.Nursery) -> None:
    server = await _server(nursery)
    for _ in range(_bulk.CHANNELS_PER_PEER):
        assert server.offer_channel("greedy", _serve_nothing) is not None
    assert server.offer_channel("greedy", _serve_nothing) is None
    assert server.offer_channel("other", _serve_nothing) is not None
