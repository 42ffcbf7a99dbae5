"""Content ids: CIDv1, codec raw, sha2-256, base32 (``bafkrei...``), via `multiformats`.

Every blob (taskpack, model update, result) is named by the CID of its bytes, so a node can
check anything it fetched against the name it asked for.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re

from multiformats import CID, multihash

from p2pfl.errors import RemoteProtocolError

# CIDv1 + raw + sha2-256 in base32 is always "bafkrei" + 52 base32 characters. The regex is
# a cheap pre-filter (it also keeps path separators out of store paths); the real check
# goes through multiformats.
_CID_RE = re.compile(r"bafkrei[a-z2-7]{52}")
_SHA256 = multihash.get("sha2-256")


# The binary CID before the digest: version 1, codec raw (0x55), sha2-256 (0x12), 32 bytes.
_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])


def cid_from_sha256(digest: bytes) -> str:
    """The CID of data whose sha256 is `digest` (for data hashed incrementally).

    Spelt out ("b" + unpadded lower-case RFC 4648 base32 of the binary CID) rather than
    built by multiformats, which takes about a millisecond per CID: a simulation of
    thousands of nodes names every model it stores. tests/store check both agree."""
    if len(digest) != 32:
        raise ValueError("a sha256 digest is 32 bytes")
    return "b" + base64.b32encode(_PREFIX + bytes(digest)).decode("ascii").lower().rstrip("=")


def cid_from_sha256_multiformats(digest: bytes) -> str:
    """The same CID built by multiformats (the reference cid_from_sha256 is checked against)."""
    return str(CID("base32", 1, "raw", _SHA256.wrap(bytes(digest))))


def cid_of(data: bytes | bytearray | memoryview) -> str:
    """The CID of `data`."""
    return cid_from_sha256(hashlib.sha256(data).digest())


@functools.lru_cache(maxsize=65536)
def digest_of_cid(cid: str) -> bytes:
    """The 32-byte sha256 inside `cid`; RemoteProtocolError unless a CIDv1 raw sha2-256."""
    if type(cid) is not str or not _CID_RE.fullmatch(cid):
        raise RemoteProtocolError(f"not a CIDv1 raw sha2-256 content id: {str(cid)[:80]!r}")
    # Decoded by hand, as cid_from_sha256 encodes (multiformats' decoder took about a
    # millisecond per CID, on the event path for every ref a peer sends); tests/store
    # check both agree. The regex fixed the multibase, the length and the prefix.
    binary = base64.b32decode(cid[1:].upper() + "======")
    if binary[: len(_PREFIX)] != _PREFIX:
        raise RemoteProtocolError(f"not a CIDv1 raw sha2-256 content id: {cid!r}")
    digest = binary[len(_PREFIX) :]
    # A canonical CID re-encodes to itself (rejects non-zero padding bits in the base32).
    if len(digest) != 32 or cid_from_sha256(digest) != cid:
        raise RemoteProtocolError(f"non-canonical content id {cid!r}")
    return digest


def digest_of_cid_multiformats(cid: str) -> bytes:
    """The digest as multiformats reads it (the reference digest_of_cid is checked
    against); RemoteProtocolError unless a CIDv1 raw sha2-256."""
    try:
        parsed = CID.decode(cid)
    except Exception as e:
        raise RemoteProtocolError(f"bad content id {cid!r}: {e}") from None
    if parsed.version != 1 or parsed.codec.name != "raw" or parsed.hashfun.name != "sha2-256":
        raise RemoteProtocolError(f"not a CIDv1 raw sha2-256 content id: {cid!r}")
    return bytes(parsed.raw_digest)


def is_cid(s: object) -> bool:
    """True when `s` is a valid CIDv1 raw sha2-256 string."""
    if type(s) is not str or not _CID_RE.fullmatch(s):
        return False
    try:
        digest_of_cid(s)
    except RemoteProtocolError:
        return False
    return True
