"""The real network: py-libp2p hosts (TCP, Noise, yamux), GossipSub, our stream protocols.

Importing this package imports libp2p (about 1 s); keep it out of code paths that only
need the interface (``p2pfl.net.base``).
"""

from p2pfl.net.libp2p._blob import BLOB_PROTOCOL as BLOB_PROTOCOL
from p2pfl.net.libp2p._config import Libp2pConfig as Libp2pConfig
from p2pfl.net.libp2p._network import MSG_PROTOCOL as MSG_PROTOCOL, Libp2pNetwork as Libp2pNetwork
from p2pfl.net.libp2p._px import PX_PROTOCOL as PX_PROTOCOL

__all__ = ["BLOB_PROTOCOL", "MSG_PROTOCOL", "PX_PROTOCOL", "Libp2pConfig", "Libp2pNetwork"]
