"""yamux receive-window credit returned in batches, as go-yamux does (py-libp2p 0.8.1).

py-libp2p's YamuxStream sends a WINDOW_UPDATE frame after nearly every read: its
"partial slack" branch (and, by default, PY_YAMUX_RELEASE_ON_READ) credits each read's
bytes at once, so every gossip RPC, direct message, varint and header read costs a frame
back (Noise-encrypted, written and parsed in pure Python on both ends). Measured over
8 hosts in one process (benchmarks/round.py's libp2p part): 10,700-18,300 window updates
for 7,000-7,500 data frames in three rounds, a third of every frame a node handled.

go-yamux returns credit only once at least half the window has been consumed
(sendWindowUpdate: `if delta < max/2 && flags == 0 { return nil }`): the sender still
holds half a window to write into, so nothing stalls, and a stream of small messages
costs one update per half window instead of one per read. That is what this does; the
window auto-tuning (doubling the target within 4 RTTs under load) is kept.
"""

from __future__ import annotations

from typing import Any

from libp2p.stream_muxer.yamux.yamux import YamuxStream

_original = YamuxStream._auto_tune_and_send_window_update


async def _batched_window_update(self: Any, *, bytes_read: int = 0) -> None:
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        # What was consumed since credit was last returned (the window the sender lacks).
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta <= 0 or delta < self._grow_threshold():
            return
        self.recv_window += delta
        self._pending_recv_release = 0
        delta += self._apply_autotune_epoch(buffered)
    await self.send_window_update(delta, skip_lock=True)


def install() -> None:
    """Replace the per-read credit with go-yamux's batched credit (idempotent)."""
    YamuxStream._auto_tune_and_send_window_update = _batched_window_update  # type: ignore[method-assign]


def uninstall() -> None:
    """py-libp2p's own behaviour again (tests compare the two)."""
    YamuxStream._auto_tune_and_send_window_update = _original  # type: ignore[method-assign]
