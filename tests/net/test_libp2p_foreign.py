"""p2pfl nodes beside libp2p peers that are not p2pfl nodes (tests/net/foreign_peer.py):
discovery through such a bootstrap peer (Kademlia DHT), unsigned gossip counted per peer,
liveness with a peer that closes its ping stream after each ping, protocols it lacks not
asked again."""

from __future__ import annotations

import logging

import pytest
import trio

from p2pfl.net.base import Message
from tests.net.foreign_peer import foreign_peer
from tests.net.test_libp2p import WAIT_S, start_node


async def _wait(pred: object, timeout: float = WAIT_S) -> None:
    assert callable(pred)
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def test_unsigned_gossip_is_counted_per_peer_and_logged_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="p2pfl.net.libp2p")
    async with foreign_peer(dht=False, gossip_unsigned=True) as js:
        node = await start_node(nursery, bootstrap=[js.addr], dht=False)
        node.net.subscribe("t")
        await node.rec.wait_for(lambda ev: js.id in node.rec.connected())
        sent = 0
        with trio.fail_after(WAIT_S):
            # Until the node's subscription has reached the foreign peer's router.
            while node.net.bad_gossip().get(js.id, 0) < 3:
                await js.pubsub.publish("t", b"unsigned %d" % sent)
                sent += 1
                await trio.sleep(0.1)
        # Each copy received is counted (a dropped message is not marked seen, so one
        # sent again through gossip's IWANT counts again).
        counted = node.net.bad_gossip()[js.id]
        assert counted >= 3 and sent >= 1
        assert node.net.stats().extra["gossip_bad_signature"] >= counted
        # Dropped, never delivered; one warning for the peer, however many messages.
        assert not [e for e in node.rec.of(Message) if e.topic == "t"]
        warnings = [r for r in caplog.records if "unsigned gossip from peer" in r.getMessage()]
        assert len(warnings) == 1 and js.id in warnings[0].getMessage()
        node.stop()


@pytest.mark.slow
async def test_one_shot_ping_peer_stays_connected_and_lacking_px_is_not_asked_again(
    nursery: trio.Nursery,
) -> None:
    async with foreign_peer(dht=False, one_shot_ping=True) as js:
        node = await start_node(nursery, bootstrap=[js.addr], dht=False, px_interval_s=0.3)
        await node.rec.wait_for(lambda ev: js.id in node.rec.connected())
        net = node.net
        await _wait(lambda: js.id in net._ping_oneshot)
        assert js.id in net._no_px
        # Several liveness timeouts (2 s each): a ping per interval on a fresh stream.
        await trio.sleep(3 * 2.0)
        assert js.id in node.rec.connected()
        assert js.id in {p.peer_id for p in net.connected_peers()}
        node.stop()


@pytest.mark.slow
async def test_nodes_sharing_only_a_foreign_bootstrap_find_and_dial_each_other(
    nursery: trio.Nursery,
) -> None:
    async with foreign_peer(dht=True, one_shot_ping=True) as js:
        a = await start_node(nursery, bootstrap=[js.addr], dht_interval_s=2.0)
        b = await start_node(nursery, bootstrap=[js.addr], dht_interval_s=2.0)
        # Neither knows the other's address: only the DHT (through js) can tell them.
        assert b.id not in a.net._book.known() and a.id not in b.net._book.known()
        await a.rec.wait_for(lambda ev: b.id in a.rec.connected(), timeout=60)
        await b.rec.wait_for(lambda ev: a.id in b.rec.connected(), timeout=60)
        # They talk p2pfl to each other directly, not through the foreign peer.
        a.net.send(b.id, b"hello over a direct stream")
        await b.rec.wait_for(
            lambda ev: any(
                isinstance(e, Message) and e.data == b"hello over a direct stream" for e in ev
            )
        )
        assert js.id in a.net._no_px and js.id in b.net._no_px
        a.stop()
        b.stop()


@pytest.mark.slow
async def test_peer_without_ping_protocol_stays_connected(nursery: trio.Nursery) -> None:
    """Its "na" to each ping stream shows it is alive (a frozen peer would not answer)."""
    from libp2p.host.ping import ID as PING_ID

    async with foreign_peer(dht=False) as js:
        js.host.remove_stream_handler(PING_ID)
        node = await start_node(nursery, bootstrap=[js.addr], dht=False)
        await node.rec.wait_for(lambda ev: js.id in node.rec.connected())
        await _wait(lambda: js.id in node.net._no_ping)
        await trio.sleep(3 * 2.0)  # several liveness timeouts
        assert js.id in node.rec.connected()
        node.stop()
