"""Gossip RPC framing read in whole pieces (p2pfl/net/libp2p/_gossip_io.py), against
py-libp2p's own byte-at-a-time reader on the same bytes."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
from libp2p.utils.varint import encode_uvarint

from p2pfl.net.libp2p import _gossip_io


class Reader:
    """The `read(n)` face the pubsub loop reads through, over one end of an in-memory
    byte stream (it returns what has arrived, up to n, as a yamux stream does)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        return await self.stream.receive_some(n)


async def _read_all(fn: object, data: bytes, pieces: list[int], count: int) -> tuple[list, int]:
    send, receive = trio.testing.memory_stream_one_way_pair()
    reader = Reader(receive)
    out: list[bytes] = []

    async def writer() -> None:
        at = 0
        for size in pieces:
            await send.send_all(data[at : at + size])
            at += size
            await trio.sleep(0)  # let the reader take what is there
        await send.send_all(data[at:])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        for _ in range(count):
            out.append(await fn(reader, 1 << 20))  # type: ignore[operator]
    return out, reader.reads


RPCS = [os.urandom(n) for n in (0, 1, 127, 128, 300, 70_000, 5)]
WIRE = b"".join(encode_uvarint(len(r)) + r for r in RPCS)


@pytest.mark.parametrize("pieces", [[len(WIRE)], [1] * 400, [3, 700, 1, 65_536, 2]])
async def test_same_rpcs_as_py_libp2p_with_far_fewer_reads(pieces: list[int]) -> None:
    ours, our_reads = await _read_all(_gossip_io.read_rpc, WIRE, pieces, len(RPCS))
    theirs, their_reads = await _read_all(_gossip_io._original, WIRE, pieces, len(RPCS))
    assert ours == theirs == RPCS
    if pieces == [len(WIRE)]:
        assert our_reads <= 3 < len(RPCS) * 2 <= their_reads


async def test_a_length_over_the_cap_is_refused_before_the_body() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(encode_uvarint(2_000_000))  # and nothing more: no body to wait for
    with pytest.raises(MessageTooLarge):
        await _gossip_io.read_rpc(Reader(receive), 1 << 20)


async def test_an_overlong_prefix_is_a_parse_error() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(b"\xff" * 11)
    with pytest.raises(ParseError):
        await _gossip_io.read_rpc(Reader(receive), 1 << 20)


async def test_a_stream_ending_mid_rpc_is_an_incomplete_read() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(encode_uvarint(100) + b"x" * 40)
    await send.aclose()
    with pytest.raises(IncompleteReadError):
        await _gossip_io.read_rpc(Reader(receive), 1 << 20)
