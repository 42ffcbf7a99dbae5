"""Every size a peer can make this node hold, in one place.

A peer's bytes are an attacker's bytes (shared/THREATS.md): each bound here is checked
before the bytes are kept, fetched or handed on, and a refusal says which bound it hit.
Blob transfers are not in these per-peer budgets: they stream to disk, range by range, and
only ranges this node asked for.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- announced blobs, by kind: refused before any fetch --------------------------------
# A taskpack archive (code plus small assets; datasets never travel).
MAX_TASKPACK_BYTES = 256 * MiB
# One participant's model update or partial for a round.
MAX_UPDATE_BYTES = 1 * GiB
# A task's final model / result blob.
MAX_RESULT_BYTES = 1 * GiB

# --- one message ----------------------------------------------------------------------
# py-libp2p silently drops gossip frames over about 1 MiB, so we stay well below; anything
# larger travels as a blob.
MAX_GOSSIP_BYTES = 512 * KiB
# One direct message (a stream frame); larger data goes through fetch().
MAX_DIRECT_BYTES = 512 * KiB
# Largest range one fetch() may ask for. Blobs of any size move as many ranges.
MAX_FETCH_BYTES = 4 * MiB

# --- messages received but not yet handled by the core ----------------------------------
# Bytes of one peer's messages waiting for the core. Past it, that peer's new messages are
# dropped (counted per peer, logged at most once per LOG_EVERY_S): a flooding peer loses
# its own messages, the others are not affected.
INBOUND_PEER_BYTES = 8 * MiB
# Bytes of all peers' messages waiting for the core: bounds a flood from many peer ids.
INBOUND_TOTAL_BYTES = 64 * MiB
# Direct-message streams one peer may hold open to us at once (each can buffer a yamux
# window); a further stream is reset.
MAX_INBOUND_STREAMS_PER_PEER = 4
# Gossip queued for one peer that reads slowly (our publishes and relays); past it, new
# RPCs for that peer are dropped.
OUTBOUND_GOSSIP_PEER_BYTES = 16 * MiB
# Direct messages queued for one peer that reads slowly; past it, new ones are dropped.
OUTBOUND_DIRECT_PEER_BYTES = 32 * MiB
# Per-peer drop logs are rate-limited to one line per peer this often.
LOG_EVERY_S = 10.0

# Every announced size above a kind's cap is refused; these name the kinds.
BLOB_CAPS = {
    "taskpack": MAX_TASKPACK_BYTES,
    "update": MAX_UPDATE_BYTES,
    "result": MAX_RESULT_BYTES,
}


def blob_too_big(kind: str, size: int) -> str | None:
    """Why an announced blob of `size` bytes of `kind` is refused, or None if it fits."""
    cap = BLOB_CAPS[kind]
    if size > cap:
        return f"announced {kind} of {size} bytes exceeds the cap of {cap} bytes"
    return None


# --- what the protocol core holds on a peer's behalf ------------------------------------

# A task offer larger than this is refused (real offers carry a few KiB of parameters).
MAX_OFFER_BYTES = 64 * KiB
# Messages held for tasks whose offer has not arrived yet, all tasks together.
PENDING_BYTES = 8 * MiB
# Round messages one task holds until its roster arrives.
EARLY_BYTES_PER_TASK = 4 * MiB
# Reduce-scatter (core/scatter.py): a model is cut into at most this many slices (one per
# participant; more participants use hierarchical aggregation).
MAX_SLICES = 256
# Its slice check (core/sketch.py): one signed SliceSketch (5 float32 per slice, at most
# 256 slices, and as many witnessed: about 11 KiB) and one signed SliceOffer (a quarter of
# a 1 GiB update, the largest slice, has 256 chunks of 1 MiB: 8 KiB of chunk hashes), as
# carried inside a SketchProof.
MAX_SKETCH_BYTES = 32 * KiB
MAX_SIGNED_OFFER_BYTES = 16 * KiB
# Decoded messages shared between simulated nodes are memoised only up to this size.
DECODE_CACHE_MAX_MESSAGE = 64 * KiB
