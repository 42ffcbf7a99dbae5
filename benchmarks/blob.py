"""Blob throughput on loopback, in one process: our blob protocol vs its floors and ceilings.

* blob_mb_s:       50 MB between two Libp2pNetwork nodes through fetch(), as the store's
                   fetcher does it (RANGE-byte ranges, IN_FLIGHT outstanding), over the
                   bulk path (TCP + AES-GCM keyed over libp2p; the default).
* blob_stream_mb_s: the same with bulk_tcp=False: the "/p2pfl/blob/1.0.0" stream protocol.
* raw_libp2p_mb_s: the same bytes over one plain py-libp2p stream (Noise + yamux), 1 MiB
                   writes: what libp2p itself manages.
* tcp_mb_s:        the same bytes over a plain trio TCP socket, 1 MiB writes.
* small ranges: --small-kib (512) KiB ranges fetched one after another, as a
  reduce-scatter round fetches slices: CPU ms per range (both nodes share the process)
  on a bulk channel (/p2pfl/bulk/1.2.0, the default) and negotiated per range on a kept
  session stream (a server without channels); `channel_vs_session` is their ratio.

Prints one JSON line. Usage: python benchmarks/blob.py [--mb 50] [--range-mib 4] [--in-flight 4]
                                                [--small-kib 512] [--small-count 300]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import multiaddr
import trio

from p2pfl.identity import Identity
from p2pfl.net.base import FetchDone, FetchFailed, NetEvent, PeerConnected
from p2pfl.net.libp2p import Libp2pConfig, Libp2pNetwork

MIB = 1024 * 1024


async def bench_blob(blob: bytes, range_bytes: int, in_flight: int, bulk: bool) -> float:
    done = trio.Event()
    connected = trio.Event()
    got: dict[int, bytes] = {}
    state = {"next": 0, "failed": ""}

    def server_sink(ev: NetEvent) -> None:
        pass

    def client_sink(ev: NetEvent) -> None:
        if isinstance(ev, PeerConnected):
            connected.set()
        elif isinstance(ev, FetchDone):
            got[ev.offset] = ev.data
            ask_next()
            if sum(len(d) for d in got.values()) >= len(blob):
                done.set()
        elif isinstance(ev, FetchFailed):
            state["failed"] = ev.reason
            done.set()

    server = Libp2pNetwork(
        Identity.generate(),
        Libp2pConfig(bulk_tcp=bulk),
        server_sink,
        lambda cid, off, n: blob[off : off + n] if cid == "b" else None,
    )

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client = Libp2pNetwork(
            Identity.generate(),
            Libp2pConfig(bootstrap=server.listen_addrs(), bulk_tcp=bulk),
            client_sink,
        )

        def ask_next() -> None:
            off = state["next"]
            if off < len(blob):
                state["next"] = off + range_bytes
                client.fetch(server.peer_id, "b", off, range_bytes, off)

        await nursery.start(client.run)
        await connected.wait()
        start = time.perf_counter()
        for _ in range(in_flight):
            ask_next()
        await done.wait()
        elapsed = time.perf_counter() - start
        bulk_used = client.stats().extra.get("bulk_fetches", 0)
        nursery.cancel_scope.cancel()
    if state["failed"]:
        raise RuntimeError(f"fetch failed: {state['failed']}")
    assert b"".join(got[o] for o in sorted(got)) == blob
    assert (bulk_used > 0) == bulk, "the bulk path was not taken as configured"
    return len(blob) / elapsed / 1e6


async def bench_small_ranges(size: int, count: int, channels: bool) -> float:
    """CPU milliseconds per `size`-byte range fetched one at a time (after 20 to warm up)."""
    from libp2p.custom_types import TProtocol

    from p2pfl.net.libp2p import _channel

    blob = os.urandom(4 * size)
    connected = trio.Event()
    answers: list[FetchDone | FetchFailed] = []
    arrived = trio.Event()

    def client_sink(ev: NetEvent) -> None:
        nonlocal arrived
        if isinstance(ev, PeerConnected):
            connected.set()
        elif isinstance(ev, FetchDone | FetchFailed):
            answers.append(ev)
            arrived.set()

    server = Libp2pNetwork(
        Identity.generate(),
        Libp2pConfig(),
        lambda ev: None,
        lambda cid, off, n: blob[off : off + n] if cid == "b" else None,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        if not channels:
            server._host.remove_stream_handler(TProtocol(_channel.BULK_CHANNEL_PROTOCOL))
        client = Libp2pNetwork(
            Identity.generate(), Libp2pConfig(bootstrap=server.listen_addrs()), client_sink
        )
        await nursery.start(client.run)
        await connected.wait()

        async def fetch(i: int) -> None:
            nonlocal arrived
            arrived = trio.Event()
            client.fetch(server.peer_id, "b", (i % 4) * size, size, i)
            await arrived.wait()
            last = answers[-1]
            if isinstance(last, FetchFailed):
                raise RuntimeError(f"fetch failed: {last.reason}")

        for i in range(20):
            await fetch(i)
        start = time.process_time()
        for i in range(count):
            await fetch(i)
        cpu = time.process_time() - start
        used = client.stats().extra.get("bulk_channels_opened", 0) > 0
        nursery.cancel_scope.cancel()
    assert used == channels, "the bulk channel was not used as configured"
    return cpu / count * 1000


async def bench_raw_libp2p(blob: bytes) -> float:
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from p2pfl.net.libp2p._host import build_host

    proto = TProtocol("/bench/raw/1.0.0")
    received = trio.Event()
    cfg = Libp2pConfig()

    async def handler(stream: object) -> None:
        n = 0
        while True:
            try:
                chunk = await stream.read(MIB)  # type: ignore[attr-defined]
            except Exception:
                break
            if not chunk:
                break
            n += len(chunk)
        assert n == len(blob)
        received.set()

    a = build_host(Identity.generate().libp2p_keypair(), cfg)
    b = build_host(Identity.generate().libp2p_keypair(), cfg)
    a.set_stream_handler(proto, handler)
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        addr = f"{a.get_transport_addrs()[0]}/p2p/{a.get_id()}"
        await b.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
        stream = await b.new_stream(a.get_id(), [proto])
        start = time.perf_counter()
        view = memoryview(blob)
        for off in range(0, len(blob), MIB):
            await stream.write(bytes(view[off : off + MIB]))
        await stream.close()
        await received.wait()
        elapsed = time.perf_counter() - start
    return len(blob) / elapsed / 1e6


async def bench_tcp(blob: bytes) -> float:
    received = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        n = 0
        while chunk := await stream.receive_some(MIB):
            n += len(chunk)
        assert n == len(blob)
        received.set()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        start = time.perf_counter()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        view = memoryview(blob)
        for off in range(0, len(blob), MIB):
            await stream.send_all(view[off : off + MIB])
        await stream.aclose()
        await received.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return len(blob) / elapsed / 1e6


async def main(args: argparse.Namespace) -> None:
    blob = os.urandom(args.mb * 1_000_000)
    rng = args.range_mib * MIB
    small = args.small_kib * 1024
    channel_ms = await bench_small_ranges(small, args.small_count, channels=True)
    session_ms = await bench_small_ranges(small, args.small_count, channels=False)
    result = {
        "blob_mb_s": round(await bench_blob(blob, rng, args.in_flight, bulk=True), 1),
        "blob_stream_mb_s": round(await bench_blob(blob, rng, args.in_flight, bulk=False), 1),
        "raw_libp2p_mb_s": round(await bench_raw_libp2p(blob), 1),
        "tcp_mb_s": round(await bench_tcp(blob), 1),
        "mb": args.mb,
        "range_mib": args.range_mib,
        "in_flight": args.in_flight,
        "small_range_kib": args.small_kib,
        "channel_ms_per_range": round(channel_ms, 3),
        "session_ms_per_range": round(session_ms, 3),
        "channel_vs_session": round(channel_ms / session_ms, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--range-mib", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--small-kib", type=int, default=512)
    parser.add_argument("--small-count", type=int, default=300)
    trio.run(main, parser.parse_args())
