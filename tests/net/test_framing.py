"""FrameReader (p2pfl/net/libp2p/_framing.py): frames from a stream read ahead, over a
fake stream that hands out bytes in chosen pieces."""

from __future__ import annotations

import pytest

from p2pfl.errors import RemoteProtocolError
from p2pfl.net.libp2p._framing import FrameReader, StreamClosedEarly, frame


class PiecesStream:
    """`read(n)` returns the next piece, cut to n (the rest kept); b"" at the end."""

    def __init__(self, pieces: list[bytes], eof_error: bool = False) -> None:
        self.pieces = list(pieces)
        self.eof_error = eof_error
        self.reads: list[int] = []

    async def read(self, n: int | None = None) -> bytes:
        self.reads.append(n or 0)
        if not self.pieces:
            if self.eof_error:
                raise EOFError
            return b""
        piece = self.pieces.pop(0)
        if n is not None and len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece


async def _all(reader: FrameReader) -> list[bytes]:
    out = []
    while (data := await reader.next()) is not None:
        out.append(data)
    return out


async def test_many_frames_in_one_read() -> None:
    frames = [b"m%03d" % i for i in range(100)]
    stream = PiecesStream([b"".join(frame(f) for f in frames)])
    assert await _all(FrameReader(stream, 1024)) == frames
    assert len(stream.reads) == 2  # one read for all of them, one for the end


@pytest.mark.parametrize("eof_error", [False, True])
async def test_frames_cut_anywhere_come_out_whole(eof_error: bool) -> None:
    frames = [b"", b"a" * 5, b"b" * 300, b"c", b"d" * 70_000]
    data = b"".join(frame(f) for f in frames)
    for step in (1, 3, 4, 7, 4096):
        stream = PiecesStream([data[i : i + step] for i in range(0, len(data), step)], eof_error)
        assert await _all(FrameReader(stream, 100_000)) == frames


async def test_a_frame_over_the_limit_is_refused_before_its_body() -> None:
    stream = PiecesStream([frame(b"ok") + (1_000_001).to_bytes(4, "big") + b"x" * 10])
    reader = FrameReader(stream, 1_000_000)
    assert await reader.next() == b"ok"
    with pytest.raises(RemoteProtocolError, match="1000001 bytes exceeds the limit"):
        await reader.next()


@pytest.mark.parametrize("cut", [2, 4, 9])
async def test_a_stream_ending_inside_a_frame_is_an_error(cut: int) -> None:
    stream = PiecesStream([frame(b"whole"), frame(b"0123456789")[:cut]])
    reader = FrameReader(stream, 100)
    assert await reader.next() == b"whole"
    with pytest.raises(StreamClosedEarly):
        await reader.next()


async def test_a_big_frame_is_read_in_few_large_reads() -> None:
    body = bytes(range(256)) * 2048  # 512 KiB
    stream = PiecesStream([frame(body)])
    assert await _all(FrameReader(stream, len(body))) == [body]
    assert len(stream.reads) <= 3
