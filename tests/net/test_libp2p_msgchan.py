"""Message channels (p2pfl/net/libp2p/_msgchan.py): direct messages over a TCP connection
keyed over libp2p, between real hosts on 127.0.0.1; and what a forged, replayed or
oversized write does (ends that channel, delivers nothing of it)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from p2pfl.errors import RemoteProtocolError
from p2pfl.limits import MAX_DIRECT_BYTES
from p2pfl.net.base import Message
from p2pfl.net.libp2p import _bulk, _msgchan
from p2pfl.net.libp2p._channel import _nonce
from p2pfl.net.libp2p._framing import frame
from tests.net.test_libp2p import Node, _pair, start_node


async def _until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """Bounded wait for a condition no event announces (a channel being up)."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


def _direct(node: Node, sender: str) -> list[bytes]:
    return [m.data for m in node.rec.of(Message) if m.topic is None and m.sender == sender]


async def _channel_up(a: Node, b: Node) -> None:
    """a's first message to b opens a channel and goes on it."""
    a.net.send(b.id, b"hello")
    await b.rec.wait_for(lambda ev: b"hello" in _direct(b, a.id))
    await _until(lambda: a.net.stats().extra["msg_channels_opened"] == 1)


async def test_messages_go_on_the_channel_once_it_is_up(nursery: trio.Nursery) -> None:
    a, b = await _pair(nursery)
    await _channel_up(a, b)
    sent = [b"m%03d" % i + bytes(i) for i in range(200)]
    for data in sent:
        a.net.send(b.id, data)
    a.net.send(b.id, b"x" * MAX_DIRECT_BYTES)  # the largest message fits a write
    await b.rec.wait_for(lambda ev: len(_direct(b, a.id)) >= 202)
    assert _direct(b, a.id) == [b"hello", *sent, b"x" * MAX_DIRECT_BYTES]  # all, in order
    extra = a.net.stats().extra
    assert extra["direct_via_channel"] == 202 and extra["msg_channel_failed"] == 0
    # Counted as before, message by message, with their 4-byte lengths.
    assert a.net.stats().messages_sent == 202
    assert b.net.stats().messages_received == 202
    assert b.net.stats().bytes_received == a.net.stats().bytes_sent


async def test_a_peer_without_a_bulk_port_gets_its_messages_on_streams(
    nursery: trio.Nursery,
) -> None:
    a = await start_node(nursery)
    b = await start_node(nursery, bootstrap=[a.addr], bulk_tcp=False)
    await a.rec.wait_for(lambda ev: b.id in a.rec.connected())
    for i in range(3):
        a.net.send(b.id, b"m%d" % i)
        await b.rec.wait_for(lambda ev, i=i: len(_direct(b, a.id)) > i)
    await _until(lambda: b.id in a.net._no_msg_channel)  # asked once, remembered
    a.net.send(b.id, b"last")
    await b.rec.wait_for(lambda ev: b"last" in _direct(b, a.id))
    assert a.net.stats().extra["msg_channels_opened"] == 0
    assert a.net.stats().extra["direct_via_channel"] == 0
    # And b, which keeps no bulk port, opens none either.
    b.net.send(a.id, b"back")
    await a.rec.wait_for(lambda ev: b"back" in _direct(a, b.id))
    assert b.net.stats().extra["msg_channels_opened"] == 0


async def test_on_a_stream_a_message_goes_without_its_blob(nursery: trio.Nursery) -> None:
    # A yamux stream must not carry bulk (Network.send): b keeps no bulk port, so a's
    # messages to it go on a stream, each in its `plain` form when it has one.
    a = await start_node(nursery)
    b = await start_node(nursery, bootstrap=[a.addr], bulk_tcp=False)
    await a.rec.wait_for(lambda ev: b.id in a.rec.connected())
    a.net.send(b.id, b"with a blob" + bytes(300_000), plain=b"alone")
    a.net.send(b.id, b"no blob")
    await b.rec.wait_for(lambda ev: len(_direct(b, a.id)) >= 2)
    assert _direct(b, a.id) == [b"alone", b"no blob"]
    assert a.net.stats().extra["attachments_left_off"] == 1
    # On a channel the message goes whole.
    c = await start_node(nursery, bootstrap=[a.addr])
    await a.rec.wait_for(lambda ev: c.id in a.rec.connected())
    a.net.send(c.id, b"with a blob" + bytes(300_000), plain=b"alone")
    await c.rec.wait_for(lambda ev: len(_direct(c, a.id)) >= 1)
    assert _direct(c, a.id) == [b"with a blob" + bytes(300_000)]
    assert a.net.stats().extra["msg_channels_opened"] == 1


async def test_an_idle_channel_is_closed_by_its_sender_and_opened_again(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_msgchan, "SENDER_IDLE_S", 0.2)
    a, b = await _pair(nursery)
    await _channel_up(a, b)
    a.net.send(b.id, b"on the channel")
    await b.rec.wait_for(lambda ev: b"on the channel" in _direct(b, a.id))
    await trio.sleep(0.3)  # past the (shortened) idle limit
    a.net.send(b.id, b"after idle")  # the idle channel is closed, not used
    await b.rec.wait_for(lambda ev: b"after idle" in _direct(b, a.id))
    # On a new channel, which the message waited for.
    assert a.net.stats().extra["msg_channels_opened"] == 2
    assert a.net.stats().extra["direct_via_channel"] == 3
    assert a.net.stats().extra["msg_channel_failed"] == 0


async def test_a_channel_the_receiver_closed_loses_no_message(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver's idle limit shortened below the sender's: it closes first. A write
    # into that connection would land in the kernel's buffer and be lost; the sender
    # sees the close first and uses the stream.
    monkeypatch.setattr(_bulk, "SESSION_IDLE_S", 0.2)
    a, b = await _pair(nursery)
    await _channel_up(a, b)
    await trio.sleep(0.5)  # b has closed the idle channel
    a.net.send(b.id, b"after the close")
    await b.rec.wait_for(lambda ev: b"after the close" in _direct(b, a.id))
    assert a.net.stats().extra["msg_channel_failed"] == 1


async def test_a_message_channel_outlives_the_receivers_view_of_the_connection(
    nursery: trio.Nursery,
) -> None:
    # b's liveness gave up on a (a loaded machine): b's fetch channels to a close, its
    # message channel from a does not (a only learns of a close at a later write).
    a, b = await _pair(nursery)
    await _channel_up(a, b)
    assert b.net._bulk is not None
    b.net._bulk.drop_peer(a.id)
    a.net.send(b.id, b"still on the channel")
    await b.rec.wait_for(lambda ev: b"still on the channel" in _direct(b, a.id))
    assert a.net.stats().extra["direct_via_channel"] == 2
    assert a.net.stats().extra["msg_channel_failed"] == 0


# --- a peer writing what it should not -----------------------------------------------------


async def _raw_channel(b: Node, a: Node) -> _msgchan.MessageChannel:
    """A channel b opens to a by hand: its writes are under the test's control."""
    return await _msgchan.open_message_channel(b.net._host, a.id)


async def _ends(channel: _msgchan.MessageChannel) -> None:
    """a closed the connection (it reads EOF, or a reset)."""
    with trio.fail_after(10):
        try:
            while await channel.sock.receive_some(1024):
                pass
        except trio.BrokenResourceError:
            pass  # reset: a closed with our bytes unread


def _sealed(channel: _msgchan.MessageChannel, batch: bytes, nonce: int | None = None) -> bytes:
    i = channel.sent if nonce is None else nonce
    sealed = channel.key.encrypt(_nonce(i), batch, _msgchan.AAD)
    return _msgchan._LEN.pack(len(sealed)) + sealed


@pytest.mark.parametrize(
    "write",
    [
        "forged",  # sealed under another key
        "oversized",  # a length over MAX_BATCH_BYTES
        "message over the limit",  # sealed right, but one message over MAX_DIRECT_BYTES
        "truncated batch",  # sealed right, but the batch ends inside a message
        "replayed",  # a genuine write sent twice: the second's nonce is stale
    ],
)
async def test_a_bad_write_ends_that_channel_and_delivers_nothing_of_it(
    nursery: trio.Nursery, write: str
) -> None:
    a, b = await _pair(nursery)
    channel = await _raw_channel(b, a)
    good = _sealed(channel, frame(b"genuine"))
    if write == "forged":
        other = await _raw_channel(b, a)  # a key a gave for another channel
        data = _sealed(other, frame(b"forged"), nonce=0)
    elif write == "oversized":
        data = _msgchan._LEN.pack(_msgchan.MAX_BATCH_BYTES + 17) + bytes(64)
    elif write == "message over the limit":
        data = _sealed(channel, frame(b"ok") + frame(b"y" * (MAX_DIRECT_BYTES + 1)))
    elif write == "truncated batch":
        data = _sealed(channel, frame(b"ok") + frame(b"cut short")[:-3])
    else:
        await channel.sock.send_all(good)
        await a.rec.wait_for(lambda ev: b"genuine" in _direct(a, b.id))
        data = good
    await channel.sock.send_all(data)
    await _ends(channel)
    got = _direct(a, b.id)
    assert got == ([b"genuine"] if write == "replayed" else [])  # once, or nothing
    # a is fine, and so is b's ordinary path to it.
    b.net.send(a.id, b"still here")
    await a.rec.wait_for(lambda ev: b"still here" in _direct(a, b.id))
    assert a.id in b.rec.connected() and b.id in a.rec.connected()


def test_split_batch() -> None:
    assert _msgchan.split_batch(b"") == []
    assert _msgchan.split_batch(frame(b"") + frame(b"ab") + frame(b"c")) == [b"", b"ab", b"c"]
    for bad, why in [
        (frame(b"ab")[:3], "inside a length"),
        (frame(b"abc")[:-1], "inside a message"),
        ((MAX_DIRECT_BYTES + 1).to_bytes(4, "big"), "exceeds"),
    ]:
        with pytest.raises(RemoteProtocolError, match=why):
            _msgchan.split_batch(bad)
