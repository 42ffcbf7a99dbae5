"""The addresses a node advertised when it last started, kept in DATA_DIR/addrs.json so
`p2pfl id` can print them while the node is down (to hand to another site, say).

Written by the node itself (temp + rename); read back with every field checked, since a
stale or hand-edited file must never crash `p2pfl id`.
"""

from __future__ import annotations

import json
from pathlib import Path

from p2pfl.config import ADDRS_FILE
from p2pfl.fsutil import atomic_write

_MAX_FILE = 64 * 1024


def save_addrs(data_dir: Path, peer_id: str, addrs: list[str]) -> None:
    body = json.dumps({"peer_id": peer_id, "addrs": list(addrs)}, indent=1)
    atomic_write(Path(data_dir) / ADDRS_FILE, body.encode())


def load_addrs(data_dir: Path, peer_id: str) -> list[str]:
    """The addresses saved for `peer_id`, or [] (no file, another key's, unreadable)."""
    path = Path(data_dir) / ADDRS_FILE
    try:
        raw = path.read_bytes()[:_MAX_FILE]
        value = json.loads(raw)
    except (OSError, ValueError):
        return []
    if not isinstance(value, dict) or value.get("peer_id") != peer_id:
        return []
    addrs = value.get("addrs")
    if not isinstance(addrs, list):
        return []
    return [a for a in addrs if isinstance(a, str) and a.endswith(f"/p2p/{peer_id}")]
