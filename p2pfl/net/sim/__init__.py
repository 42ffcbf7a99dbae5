"""The in-memory simulated network: a deterministic discrete-event simulator.

Many nodes live in one process under virtual time. There is no trio here: ``SimHub`` is
an event loop over a heap keyed (virtual_time, seq), so the same seed and the same calls
give the same run bit for bit, and a 1,000-node run is cheap::

    hub = SimHub(seed=1, link=LinkModel(latency_ms=20, bandwidth_mbps=100), detect_s=1.0)
    net = hub.add_node(peer_id, sink=on_event, blob_reader=store.read)   # a Network
    hub.apply_topology("random-regular", degree=8)
    hub.call_at(5.0, lambda: hub.crash(peer_id))
    hub.run(until=60.0)

See ``_hub.py`` (nodes, links, failures), ``_network.py`` (timing and byte model) and
``_gossip.py`` (broadcast trees).
"""

from p2pfl.net.sim._hub import SimHub as SimHub
from p2pfl.net.sim._loop import TimerHandle as TimerHandle
from p2pfl.net.sim._network import (
    FETCH_REQUEST_BYTES as FETCH_REQUEST_BYTES,
    FETCH_RESPONSE_BYTES as FETCH_RESPONSE_BYTES,
    SimNetwork as SimNetwork,
)
from p2pfl.net.sim._node import LinkModel as LinkModel
from p2pfl.net.sim._topology import TOPOLOGIES as TOPOLOGIES

__all__ = [
    "FETCH_REQUEST_BYTES",
    "FETCH_RESPONSE_BYTES",
    "TOPOLOGIES",
    "LinkModel",
    "SimHub",
    "SimNetwork",
    "TimerHandle",
]
