"""Peer exchange: "/p2pfl/px/1.0.0". The asker opens a stream; the answerer writes one
frame(msgpack {"self": [its addrs], "peers": [[peer id, [addrs]], ...]}) and closes.

Addresses are full multiaddrs ending in /p2p/<that peer>; anything else is dropped, so a
peer cannot make us dial one id at another id's address.
"""

from __future__ import annotations

import msgpack

from p2pfl.errors import RemoteProtocolError

PX_PROTOCOL = "/p2pfl/px/1.0.0"
MAX_PX_BYTES = 256 * 1024
MAX_PX_PEERS = 64
_MAX_ADDRS = 8
_MAX_ADDR_LEN = 256


def encode_px(self_addrs: list[str], peers: dict[str, tuple[str, ...]]) -> bytes:
    items = [[p, list(a[:_MAX_ADDRS])] for p, a in list(peers.items())[:MAX_PX_PEERS] if a]
    return msgpack.packb({"self": self_addrs[:_MAX_ADDRS], "peers": items})


def _clean_addrs(peer: str, addrs: object) -> list[str]:
    if not isinstance(addrs, list):
        raise RemoteProtocolError("px: addrs must be a list")
    suffix = f"/p2p/{peer}"
    return [
        a
        for a in addrs[:_MAX_ADDRS]
        if isinstance(a, str) and len(a) <= _MAX_ADDR_LEN and a.endswith(suffix)
    ]


def clean_addrs(peer: str, addrs: list[str]) -> list[str]:
    """Addresses of `peer` learned elsewhere (the DHT), held to the same rules."""
    return _clean_addrs(peer, addrs)


def decode_px(answerer: str, raw: bytes) -> tuple[list[str], dict[str, list[str]]]:
    """(answerer's own addrs, {peer: addrs}) with every address checked."""
    try:
        value = msgpack.unpackb(raw)
    except Exception as exc:
        raise RemoteProtocolError(f"px answer is not msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError("px answer must be a map")
    own = _clean_addrs(answerer, value.get("self", []))
    peers: dict[str, list[str]] = {}
    items = value.get("peers", [])
    if not isinstance(items, list):
        raise RemoteProtocolError("px: peers must be a list")
    for item in items[:MAX_PX_PEERS]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise RemoteProtocolError("px: each peer must be [peer id, [addrs]]")
        addrs = _clean_addrs(item[0], item[1])
        if addrs:
            peers[item[0]] = addrs
    return own, peers
