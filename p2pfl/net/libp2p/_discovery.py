"""Discovery through any libp2p peer: the Kademlia DHT (/ipfs/kad/1.0.0), peer routing only.

Our own peer exchange (_px) only works between p2pfl nodes. When nodes share only a
bootstrap peer of another implementation (a js-libp2p or go-libp2p node, an IPFS node)
they must use what libp2p peers speak: every node runs py-libp2p's KadDHT in server mode
(so others, and a js-libp2p bootstrap, keep it in their routing tables) and looks up the
peers closest to its own id, as Kademlia's bootstrap does; the answers carry addresses
(and signed peer records), which go into our PeerBook like peer-exchange answers.

What a peer can make us store is bounded: PUT_VALUE and ADD_PROVIDER are accepted on the
wire (the protocol has them) but stored nowhere, so the DHT holds only its routing table
(256 buckets of 20 peers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.tools.anyio_service import background_trio_service

from p2pfl.net.libp2p._addrs import strip_p2p

LOG = logging.getLogger("p2pfl.net.libp2p")

# First lookup after a new DHT peer connects; then doubling up to the configured interval.
FIRST_LOOKUP_S = 0.5
# One lookup's bound (py-libp2p's own is 30 s of rounds, each query 10 s).
LOOKUP_TIMEOUT_S = 30.0
MAX_FOUND_ADDRS = 8

# (peer id, full multiaddrs ending in /p2p/<peer id>)
Found = Callable[[str, list[str]], None]


def _store_nothing(*_args: Any, **_kwargs: Any) -> bool:
    return False


class DhtDiscovery:
    def __init__(self, host: Any, on_found: Found, interval_s: float) -> None:
        self._host = host
        self._on_found = on_found
        self._interval_s = interval_s
        self.dht = KadDHT(host, DHTMode.SERVER, enable_providers=False, enable_values=False)
        # Values and provider records from peers are dropped (see the module doc).
        self.dht.value_store.put_record = _store_nothing  # type: ignore[method-assign, assignment]
        self.dht.provider_store.add_provider = _store_nothing  # type: ignore[method-assign, assignment]
        self._wake = trio.Event()
        self.lookups = 0

    def wake(self) -> None:
        """A new peer connected: look up soon (it may know peers we do not)."""
        self._wake.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.dht):
            task_status.started()
            delay = self._interval_s
            while True:
                wake = self._wake
                with trio.move_on_after(delay):
                    await wake.wait()
                if wake.is_set():
                    self._wake = trio.Event()
                    # Let identify finish and the burst of new connections settle.
                    await trio.sleep(FIRST_LOOKUP_S)
                    delay = FIRST_LOOKUP_S * 2
                else:
                    delay = min(delay * 2, self._interval_s)
                await self.lookup()

    async def lookup(self) -> int:
        """One Kademlia lookup of our own id; each peer found is reported. Returns how
        many peers were reported."""
        me = self._host.get_id()
        found: list[Any] = []
        with trio.move_on_after(LOOKUP_TIMEOUT_S):
            try:
                found = await self.dht.peer_routing.find_closest_peers_network(me.to_bytes())
            except Exception as exc:
                LOG.debug("DHT lookup failed: %r", exc)
        self.lookups += 1
        # The routing table also holds peers learned from others' lookups of us.
        candidates = list(dict.fromkeys([*found, *self.dht.routing_table.get_peer_ids()]))
        reported = 0
        store = self._host.get_peerstore()
        for pid in candidates:
            if pid == me:
                continue
            try:
                addrs = store.addrs(pid)
            except Exception:
                continue
            peer = str(pid)
            # Stored with or without /p2p/ (identify keeps it): ours is appended to the
            # transport part; _px.clean_addrs then checks each address names this peer.
            full = [f"{strip_p2p(str(a))}/p2p/{peer}" for a in addrs[:MAX_FOUND_ADDRS]]
            if full:
                self._on_found(peer, full)
                reported += 1
        LOG.debug("DHT lookup: %d peers with addresses", reported)
        return reported
