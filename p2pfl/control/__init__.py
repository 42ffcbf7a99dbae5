"""The control socket: how the CLI and `p2pfl.Client` talk to a running node.

A node serves a Unix socket at ``DATA_DIR/control.sock``, readable only by its owner (the
socket is 0600, and the data directory 0700 when we create it): anyone who can connect can
publish and run code, so the file system is the access control.

Framing (p2pfl/control/framing.py): a 4-byte big-endian length, then a msgpack map; at
most 64 MiB. The server is p2pfl/control/server.py (trio); the client is p2pfl/client.py.

- request  ``{"id": int, "op": str, "args": {...}}``
- reply    ``{"id", "ok": True, "result": ...}`` or
           ``{"id", "ok": False, "error": "<one line>", "kind": "<exception class name>"}``
- a streaming op (``watch_task``) first sends ``{"id", "event": {...}}`` frames, then a reply.

Requests on one connection are served in order; clients open one connection per call (or per
stream), and the server serves many connections at once. End of input (even a half-close)
means the client is gone: whatever it asked for is cancelled. A client that sends garbage (bad
length, bad msgpack, not a request) loses its connection with a log line; the node goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pfl.control.server import ControlServer as ControlServer, NodeAPI as NodeAPI


def __getattr__(name: str) -> Any:
    # The server needs trio; import it only when asked, so the client stays light.
    if name in ("ControlServer", "NodeAPI"):
        from p2pfl.control import server

        return getattr(server, name)
    raise AttributeError(f"module 'p2pfl.control' has no attribute {name!r}")


__all__ = ["ControlServer", "NodeAPI"]
