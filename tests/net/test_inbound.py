"""The inbound byte budget (net/inbound.py) and the real node's queue that charges it."""

from __future__ import annotations

import logging

import pytest
import trio

from p2pfl.io_trio import TrioIO
from p2pfl.net.base import Message, PeerConnected
from p2pfl.net.inbound import InboundBudget


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_budget_is_per_peer_and_total() -> None:
    b = InboundBudget(per_peer=100, total=150, clock=Clock())
    assert b.take("a", 60) and b.take("a", 40)
    assert not b.take("a", 1)  # a is full
    assert b.take("b", 50)
    assert not b.take("c", 1)  # everyone is full
    assert (b.dropped("a"), b.dropped("b"), b.dropped("c")) == (1, 0, 1)
    b.release("a", 60)
    assert b.take("c", 10) and b.held == {"a": 40, "b": 50, "c": 10}
    for peer, n in (("a", 40), ("b", 50), ("c", 10)):
        b.release(peer, n)
    assert b.held == {} and b.held_total == 0


def test_drop_logs_are_rate_limited_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    b = InboundBudget(per_peer=10, total=100, log_every=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="p2pfl.net"):
        for _ in range(1000):
            b.take("a", 11)
        b.take("b", 11)
        clock.t = 10.0
        b.take("a", 11)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # a once, b once, a again after log_every
    assert "1001 dropped (1000 since the last report" in lines[2]
    assert b.dropped("a") == 1001


async def test_trio_queue_charges_peer_messages_until_handled() -> None:
    handled: list[object] = []
    async with trio.open_nursery() as nursery:
        io = TrioIO(nursery, runner=None, inbound=InboundBudget(per_peer=1000), me="me")  # type: ignore[arg-type]
        # Not running yet: everything queues, as when the core is slower than the peer.
        for _ in range(5):
            io.deliver(Message(None, "flooder", bytes(300)), handled.append)
        io.deliver(Message("t", "other", bytes(300)), handled.append)
        io.deliver(Message(None, "me", bytes(5000)), handled.append)  # our own: not charged
        io.deliver(PeerConnected("x"), handled.append)
        assert io.inbound.held == {"flooder": 900, "other": 300}
        assert io.inbound.dropped("flooder") == 2
        await nursery.start(io.run)
        with trio.fail_after(5):
            while len(handled) < 6:
                await trio.sleep(0.01)
        assert io.inbound.held == {} and io.inbound.held_total == 0
        nursery.cancel_scope.cancel()
