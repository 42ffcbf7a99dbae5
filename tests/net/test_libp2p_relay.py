"""Circuit relay v2: a node that cannot be dialled is reached through its relay."""

from __future__ import annotations

import pytest
import trio

from p2pfl.net.base import Message
from tests.net.test_libp2p import start_node

# Advertised instead of the real listen address: nothing listens there (port 1), so a
# peer dialling it directly is refused, as it would be by a NAT.
UNREACHABLE = "/ip4/127.0.0.1/tcp/1"


@pytest.mark.slow
async def test_node_behind_nat_is_reached_through_its_relay(nursery: trio.Nursery) -> None:
    relay = await start_node(nursery, relay_service=True, dht=False)
    hidden = await start_node(nursery, announce=[UNREACHABLE], relay_via=[relay.addr], dht=False)
    await relay.rec.wait_for(lambda ev: hidden.id in relay.rec.connected())
    circuit = f"{relay.addr}/p2p-circuit/p2p/{hidden.id}"
    assert circuit in hidden.net.listen_addrs()
    with trio.fail_after(30):
        while hidden.net._relay is None or relay.id not in hidden.net._relay.reserved:
            await trio.sleep(0.05)
    # A third node, itself not dialable either: it must dial the hidden one, and can
    # only do so through the relay.
    other = await start_node(nursery, announce=[UNREACHABLE], bootstrap=[relay.addr], dht=False)
    await other.rec.wait_for(lambda ev: hidden.id in other.rec.connected(), timeout=60)
    assert hidden.id in other.net._no_bulk  # its only route is the relay
    other.net.send(hidden.id, b"through the relay")
    await hidden.rec.wait_for(
        lambda ev: any(isinstance(e, Message) and e.data == b"through the relay" for e in ev)
    )
    hidden.net.send(other.id, b"and back")
    await other.rec.wait_for(
        lambda ev: any(isinstance(e, Message) and e.data == b"and back" for e in ev)
    )
    for node in (other, hidden, relay):
        node.stop()
