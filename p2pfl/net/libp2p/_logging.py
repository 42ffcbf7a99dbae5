"""Route py-libp2p's loggers into ours (``p2pfl.net.libp2p``), quiet by default.

The ``libp2p`` logger has no handler of its own, so its warnings would reach stderr through
Python's last-resort handler. We attach one forwarding handler that renames each record
under ``p2pfl.net.libp2p.lib`` (so the node's logging configuration decides where it goes)
and drops messages known to be harmless.
"""

from __future__ import annotations

import logging

LOG = logging.getLogger("p2pfl.net.libp2p")
_TARGET = logging.getLogger("p2pfl.net.libp2p.lib")

# Substrings of libp2p messages that are expected in normal operation (peers leaving,
# shutdown races, our own deliberate resets) and say nothing actionable.
HARMLESS = (
    "[ADDCONN_FAIL]",
    "fail to deliver message to subscription",
    "Connection closed while starting",
    "Stream reset",
    "Failed to clean up command stream",
    "Error stopping",
    "negative cache",
    "Failed to open stream",
    "Failed to identify",
    "error reading response",
    # A peer that is down is redialled with backoff by our own dialer, which logs it.
    "all attempts to connect",
    # py-libp2p's DHT server, when a querier closes its stream after its answer (its own
    # client does) or a lookup meets a peer that left.
    "Failed to read DHT message",
    "Query to peer",
    # py-libp2p's relay logs each reservation stream its client closes at ERROR, and a
    # reservation asked before identify finished (we ask again, see _network).
    "Error reading from hop stream",
    "Cannot make reservation with unknown relay",
    # A listen address that cannot be bound: the node stops with its own clear error.
    "Failed to start TCP listener",
)


class _Forward(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        if any(s in message for s in HARMLESS):
            return
        record.name = f"{_TARGET.name}.{record.name}"
        _TARGET.handle(record)


_installed: _Forward | None = None


def route_libp2p_logs(level: int = logging.WARNING) -> None:
    """Idempotent: install the forwarder once per process and set the libp2p level."""
    global _installed
    lib = logging.getLogger("libp2p")
    if _installed is None:
        _installed = _Forward()
        lib.addHandler(_installed)
        # Without this, records would also reach the root logger a second time.
        lib.propagate = False
    lib.setLevel(level)
    # Some libp2p modules set their own logger level (auto_connector logs at INFO), so
    # the level is enforced on the forwarder too.
    _installed.setLevel(level)
