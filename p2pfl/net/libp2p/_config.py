"""Settings of a Libp2pNetwork: addresses, peer targets, timers, limits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from p2pfl.errors import LocalProtocolError


@dataclass(frozen=True)
class Libp2pConfig:
    # Multiaddrs to listen on; tcp/0 picks a free port (see Libp2pNetwork.listen_addrs()).
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    # What the node advertises (identify, signed peer records, peer exchange) instead of
    # its listen addresses: e.g. a NAT's public address. Empty: the listen addresses, with
    # a wildcard (0.0.0.0, ::) replaced by each interface's address (see _addrs).
    announce: list[str] = field(default_factory=list)
    # Circuit relay v2 (see _relay): relays to reserve a slot at and be reachable through
    # (full multiaddrs with /p2p/<relay id>; kept connected like bootstrap peers), and
    # whether this node serves as a relay for others.
    relay_via: list[str] = field(default_factory=list)
    relay_service: bool = False
    # Full multiaddrs ending in /p2p/<peer id>; redialled with backoff whenever not connected.
    bootstrap: list[str] = field(default_factory=list)
    # How many peers discovery tries to stay connected to (bootstrap peers always count).
    target_peers: int = 8
    # GossipSub heartbeat (py-libp2p's default of 120 s forms meshes far too slowly).
    heartbeat_s: float = 1.0
    gossip_degree: int = 6
    gossip_degree_low: int = 4
    gossip_degree_high: int = 12
    # Every liveness_interval_s each connected peer is pinged; a peer not heard from for
    # liveness_timeout_s is dropped (PeerDisconnected) even if TCP never said so.
    liveness_interval_s: float = 2.0
    liveness_timeout_s: float = 6.0
    # Peer exchange: asked of every new peer, and of one random peer this often.
    px_interval_s: float = 10.0
    # Redial backoff: doubles per failure from min to max (with jitter).
    dial_backoff_min_s: float = 0.5
    dial_backoff_max_s: float = 30.0
    dial_timeout_s: float = 10.0
    # A non-bootstrap peer that failed this many dials in a row is forgotten.
    max_dial_failures: int = 8
    # Bound on concurrent blob requests served to one peer (others wait their turn).
    max_blob_serves_per_peer: int = 4
    # Move blob ranges over the fast bulk path (TCP + AES-GCM keyed over a libp2p stream),
    # falling back to the blob stream protocol when it fails. Needs an /ip4 listen address.
    bulk_tcp: bool = True
    # The bulk path's TCP port, on the first /ip4 listen address's interface: 0 picks a
    # free port at start (fine on one machine; behind a firewall, fix it and open it).
    bulk_port: int = 0
    # Ask peers that speak Kademlia (/ipfs/kad/1.0.0: js-libp2p, go-libp2p, IPFS nodes)
    # for the peers close to us, so nodes that share only a non-p2pfl bootstrap peer
    # find each other; and answer such lookups (peer routing only: no values, no
    # provider records are stored for anyone).
    dht: bool = True
    # Lookups while below target_peers: soon after each new DHT peer, then backing off
    # to this interval.
    dht_interval_s: float = 30.0
    # A fetch that has not completed by then fails with reason "timeout".
    fetch_timeout_s: float = 60.0
    # Level of the routed `libp2p` loggers (quiet by default).
    libp2p_log_level: int = logging.WARNING

    def __post_init__(self) -> None:
        problems = []
        if not self.listen:
            problems.append("listen: at least one address is needed")
        for addr in self.bootstrap:
            if "/p2p/" not in addr:
                problems.append(f"bootstrap: {addr!r} lacks /p2p/<peer id>")
        for addr in self.relay_via:
            if "/p2p/" not in addr or "/p2p-circuit" in addr:
                problems.append(f"relay_via: {addr!r} must be a relay's address with /p2p/<id>")
        if not 0 <= self.bulk_port < 65536:
            problems.append("bulk_port: must be 0..65535")
        if self.target_peers < 1:
            problems.append("target_peers: must be >= 1")
        if self.liveness_timeout_s <= self.liveness_interval_s:
            problems.append("liveness_timeout_s: must exceed liveness_interval_s")
        if not 0 < self.gossip_degree_low <= self.gossip_degree <= self.gossip_degree_high:
            problems.append("gossip_degree: need 0 < low <= degree <= high")
        if problems:
            raise LocalProtocolError("invalid Libp2pConfig: " + "; ".join(problems))
