"""Fetches under load and from peers we are not connected to (real hosts, 127.0.0.1)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol

from p2pfl.net.base import FetchDone, FetchFailed
from p2pfl.net.libp2p import _bulk, _channel
from tests.net.test_libp2p import start_node

MIB = 1024 * 1024


async def test_hosts_fetch_multi_mb_blobs_from_each_other_at_once(nursery: trio.Nursery) -> None:
    # What a fedavg round does: every host fetches every other host's update at once, in
    # 1 MiB ranges, as soon as it is announced (the mesh may not be complete yet: fetches
    # from a peer we have no connection to must wait for one, not fail at once).
    a = await start_node(nursery)
    nodes = [a] + [await start_node(nursery, bootstrap=[a.addr]) for _ in range(3)]
    for i, node in enumerate(nodes):
        node.blobs[f"update-{i}"] = os.urandom(4 * MIB + 1000 * i)
    await nodes[-1].rec.wait_for(lambda ev: a.id in nodes[-1].rec.connected())
    wanted: dict[int, list[tuple[str, int]]] = {}
    for i, fetcher in enumerate(nodes):
        wanted[i] = []
        for j, source in enumerate(nodes):
            if i == j:
                continue
            cid = f"update-{j}"
            for off in range(0, len(source.blobs[cid]), MIB):
                fetcher.net.fetch(source.id, cid, off, MIB, (cid, off))
                wanted[i].append((cid, off))
    for i, fetcher in enumerate(nodes):
        n = len(wanted[i])
        await fetcher.rec.wait_for(
            lambda ev, f=fetcher, n=n: len(f.rec.of(FetchDone)) + len(f.rec.of(FetchFailed)) >= n,
            timeout=60,
        )
        assert [e.reason for e in fetcher.rec.of(FetchFailed)] == []
        got = {e.token: e.data for e in fetcher.rec.of(FetchDone)}
        assert sorted(got) == sorted(wanted[i])
        for (cid, off), data in got.items():
            source = nodes[int(cid.split("-")[1])]
            assert data == source.blobs[cid][off : off + MIB]
    assert sum(n.net.stats().extra.get("bulk_fetches", 0) for n in nodes) == sum(
        len(w) for w in wanted.values()
    )


async def test_fetch_from_a_peer_we_are_not_connected_to_dials_it(nursery: trio.Nursery) -> None:
    # B and C each keep one connection (to A); B learns C's address by peer exchange
    # with A, but has no connection to C. The fetch dials C instead of failing with
    # "No known addresses".
    a = await start_node(nursery)
    c = await start_node(nursery, bootstrap=[a.addr], target_peers=1)
    await a.rec.wait_for(lambda ev: c.id in a.rec.connected())
    b = await start_node(nursery, bootstrap=[a.addr], target_peers=1)
    await b.rec.wait_for(lambda ev: a.id in b.rec.connected())
    assert c.id not in b.rec.connected()
    c.blobs["x"] = os.urandom(MIB)
    b.net.fetch(c.id, "x", 0, MIB, "t")
    await b.rec.wait_for(lambda ev: len(b.rec.of(FetchDone)) + len(b.rec.of(FetchFailed)) == 1)
    assert [e.reason for e in b.rec.of(FetchFailed)] == []
    assert b.rec.of(FetchDone)[0].data == c.blobs["x"]


async def test_fetch_from_a_peer_without_any_address_fails_after_the_dial_timeout(
    nursery: trio.Nursery,
) -> None:
    from p2pfl.identity import Identity

    a = await start_node(nursery, dial_timeout_s=0.5)
    a.net.fetch(Identity.generate().peer_id, "cid", 0, 10, 7)
    await a.rec.wait_for(lambda ev: len(a.rec.of(FetchFailed)) == 1)
    (failed,) = a.rec.of(FetchFailed)
    assert failed.token == 7 and "no address known" in failed.reason


@pytest.mark.parametrize("channels", [True, False], ids=["channel", "session"])
async def test_bulk_offer_that_never_comes_fails_fast_without_fallback(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, channels: bool
) -> None:
    # A server stuck before its offer (overloaded, or a bug) must not hold the fetch for
    # fetch_timeout_s; and a timeout is not a broken path: no fallback onto the same server.
    # The channel offer (a server with channels) and the per-range offer (one without).
    monkeypatch.setattr(_bulk, "OFFER_TIMEOUT_S", 0.5)
    a = await start_node(nursery)
    b = await start_node(nursery, bootstrap=[a.addr], fetch_timeout_s=30.0)
    await b.rec.wait_for(lambda ev: a.id in b.rec.connected())
    stuck: list[Any] = []

    async def hang(stream: Any) -> None:
        stuck.append(stream)
        await trio.sleep_forever()

    for protocol in (_bulk.BULK_PROTOCOL, _bulk.BULK_SESSION_PROTOCOL):
        a.net._host.set_stream_handler(TProtocol(protocol), hang)
    if channels:
        a.net._host.set_stream_handler(TProtocol(_channel.BULK_CHANNEL_PROTOCOL), hang)
    else:
        a.net._host.remove_stream_handler(TProtocol(_channel.BULK_CHANNEL_PROTOCOL))
    a.blobs["x"] = b"data"
    b.net.fetch(a.id, "x", 0, 4, "t")
    with trio.fail_after(10):  # far below fetch_timeout_s
        await b.rec.wait_for(lambda ev: len(b.rec.of(FetchFailed)) == 1)
    (failed,) = b.rec.of(FetchFailed)
    what = "bulk channel offer" if channels else "bulk offer"
    assert f"{what} timed out" in failed.reason
    assert "bulk_fallbacks" not in b.net.stats().extra
    assert stuck
