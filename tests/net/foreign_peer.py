"""A libp2p peer that is not a p2pfl node: a plain py-libp2p host with only what any
libp2p implementation speaks (identify, ping, optionally the Kademlia DHT and GossipSub),
none of p2pfl's protocols. Stands in for a js-libp2p or go-libp2p bootstrap node.

Usable from tests (`foreign_peer(...)` async context) and as a process
(`python -m tests.net.foreign_peer --listen /ip4/.../tcp/PORT`, prints its address).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_keypair
from libp2p.host.ping import ID as PING_PROTOCOL, PING_LENGTH
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID, Transport as Noise
from libp2p.tools.anyio_service import background_trio_service


@dataclass
class ForeignPeer:
    host: Any
    dht: Any = None
    pubsub: Any = None

    @property
    def addr(self) -> str:
        return str(self.host.get_addrs()[0])

    @property
    def id(self) -> str:
        return str(self.host.get_id())


async def _one_ping_then_close(stream: Any) -> None:
    """Answer one ping and close the stream, as js-libp2p does."""
    try:
        payload = b""
        while len(payload) < PING_LENGTH:
            chunk = await stream.read(PING_LENGTH - len(payload))
            if not chunk:
                return
            payload += chunk
        await stream.write(payload)
        await stream.close()
    except Exception:
        await stream.reset()


@asynccontextmanager
async def foreign_peer(
    listen: str = "/ip4/127.0.0.1/tcp/0",
    *,
    dht: bool = True,
    gossip_unsigned: bool = False,
    one_shot_ping: bool = False,
) -> AsyncIterator[ForeignPeer]:
    kp = create_new_key_pair()
    host = new_host(
        key_pair=kp,
        # Noise, the security every libp2p implementation has (p2pfl accepts nothing else).
        sec_opt={NOISE_ID: Noise(kp, noise_privkey=x25519_keypair().private_key)},
    )
    peer = ForeignPeer(host)
    if one_shot_ping:
        host.set_stream_handler(PING_PROTOCOL, _one_ping_then_close)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(host.run(listen_addrs=[multiaddr.Multiaddr(listen)]))
        if dht:
            peer.dht = KadDHT(host, DHTMode.SERVER)
            await stack.enter_async_context(background_trio_service(peer.dht))
        if gossip_unsigned:
            router = GossipSub(
                protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
                degree=6,
                degree_low=4,
                degree_high=12,
                heartbeat_interval=0.2,  # type: ignore[arg-type]
            )
            # StrictNoSign, as some js-libp2p applications configure GossipSub.
            peer.pubsub = Pubsub(host, router, strict_signing=False)
            await stack.enter_async_context(background_trio_service(peer.pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await peer.pubsub.wait_until_ready()
        yield peer


async def _main(listen: str) -> None:
    async with foreign_peer(listen, one_shot_ping=True) as peer:
        print(peer.addr, flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    trio.run(_main, parser.parse_args().listen)
