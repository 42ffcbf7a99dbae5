"""A direct message with a blob sent along: what the driver does with Send.attach.

In a reduce-scatter round each participant fetches, as soon as the message naming it
arrives, the slice an author offers it (SliceOffer) and every combined slice an owner
tells it of (SliceDone): 15 fetches per node per round at 8 nodes, each a request and an
answer through both nodes' fetch machinery (about a millisecond of event loop apiece
over 8 in-process hosts, and a round trip on a real link). When the blob fits in a
direct message with its message, the sender's driver sends both in one `Attached`, and
the receiver's driver hands the message to the core as usual; if the core then asks to
fetch that very blob, the driver stores the attached bytes instead, once their hash is
the blob's content id. Otherwise the bytes are dropped: a peer cannot make a node keep a
blob it did not ask for, and a wrong one only costs the fetch it would have made anyway.

The envelope is a transport detail of the driver; the core never sees it (a
non-canonical one that the driver does not recognise reaches the core as an unknown
message and is refused there).
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfl.errors import RemoteProtocolError
from p2pfl.limits import MAX_DIRECT_BYTES
from p2pfl.store.cid import cid_of, digest_of_cid
from p2pfl.wire import decode, encode, message

# Room the envelope itself takes beyond its message and blob (keys, lengths, the cid).
ENVELOPE_BYTES = 256


@message("attached")
@dataclass(frozen=True, slots=True)
class Attached:
    msg: bytes  # the message, encoded
    cid: str  # the blob's content id, as the message names it
    data: bytes

    def __post_init__(self) -> None:
        digest_of_cid(self.cid)  # RemoteProtocolError unless a CIDv1 raw sha2-256
        if len(self.msg) + len(self.data) > MAX_DIRECT_BYTES:
            raise RemoteProtocolError("attached message and blob over MAX_DIRECT_BYTES")


def fits(message_bytes: int, blob_bytes: int) -> bool:
    """Whether a message and a blob fit in one direct message together."""
    return message_bytes + blob_bytes + ENVELOPE_BYTES <= MAX_DIRECT_BYTES


# Every canonical Attached starts with these bytes (a 3-entry map after "v" and "t":
# msgpack writes the keys in declaration order), so the driver tells one from any other
# direct message without decoding the others twice.
_SAMPLE = encode(Attached(b"", cid_of(b""), b""))
PREFIX = _SAMPLE[: _SAMPLE.index(b"attached") + len(b"attached")]


def decode_attached(data: bytes) -> Attached:
    """A peer's Attached; RemoteProtocolError if it is not a valid one."""
    env = decode(data, Attached)
    assert isinstance(env, Attached)
    return env
