"""Publisher signatures over a taskpack: the canonical manifest and the archive's whole BlobRef.

Version 2 of the payload (record kind ``"taskpack/2"``; identity.py adds the domain
separation ``p2pfl/v1/taskpack/2\\x00``)::

    b"p2pfl-taskpack-v2\\x00" || sha256(manifest_bytes) || ref_digest(ref)

``ref_digest`` is sha256 over the BlobRef's every field a receiver acts on: the CID, the
size, the chunk size and each chunk hash, length-prefixed so no two refs share an encoding.
A receiver verifies this before it fetches anything, so a genuine signature can no longer
be paired with a forged size or forged chunk hashes (version 1 signed only the manifest and
the CID: a forged ``ref`` made a node download a gigabyte before the CID check failed).
Version 1 signatures are signed under another kind, so they never verify as version 2.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from p2pfl.identity import Identity, verify
from p2pfl.store.blobref import BlobRef

__all__ = [
    "SIGNATURE_KIND",
    "ref_digest",
    "sign_taskpack",
    "signing_payload",
    "verify_taskpack",
]

SIGNATURE_KIND = "taskpack/2"
_PAYLOAD_TAG = b"p2pfl-taskpack-v2\x00"
# Version 1 (record kind "taskpack") signed sha256(manifest) || cid only; never accepted.
_U64 = struct.Struct(">Q")


def ref_digest(ref: BlobRef) -> bytes:
    """32-byte sha256 of the BlobRef's canonical encoding (cid, size, chunk size, hashes)."""
    cid = ref.cid.encode("ascii")
    h = hashlib.sha256()
    h.update(_U64.pack(len(cid)) + cid)
    h.update(_U64.pack(ref.size) + _U64.pack(ref.chunk_size) + _U64.pack(len(ref.chunk_hashes)))
    for chunk_hash in ref.chunk_hashes:
        h.update(_U64.pack(len(chunk_hash)) + chunk_hash)
    return h.digest()


def signing_payload(manifest_bytes: bytes, ref: BlobRef) -> bytes:
    """The exact bytes signed (fixed length: tag, two 32-byte digests)."""
    return _PAYLOAD_TAG + hashlib.sha256(manifest_bytes).digest() + ref_digest(ref)


def sign_taskpack(identity: Identity, manifest_bytes: bytes, ref: BlobRef) -> bytes:
    """The publisher's 64-byte Ed25519 signature of (manifest_bytes, the whole BlobRef).

    Pass ``Manifest.canonical_bytes()`` as `manifest_bytes`: that is what nodes receive.
    """
    return identity.sign(SIGNATURE_KIND, signing_payload(manifest_bytes, ref))


def verify_taskpack(publisher: str, manifest_bytes: bytes, ref: Any, sig: bytes) -> bool:
    """True when `sig` is `publisher`'s (a peer id) signature of (manifest_bytes, ref).

    Never raises on a peer's bad input: malformed ids, refs or signatures give False.
    """
    if not isinstance(ref, BlobRef) or not isinstance(sig, (bytes, bytearray)):
        return False
    if not isinstance(manifest_bytes, (bytes, bytearray)) or not isinstance(publisher, str):
        return False
    if not isinstance(ref.cid, str) or not ref.cid.isascii():
        return False
    if not isinstance(ref.size, int) or not 0 <= ref.size < 2**64:
        return False
    if not isinstance(ref.chunk_size, int) or not 0 <= ref.chunk_size < 2**64:
        return False
    if not all(isinstance(h, (bytes, bytearray)) for h in ref.chunk_hashes):
        return False
    payload = signing_payload(bytes(manifest_bytes), ref)
    return verify(publisher, SIGNATURE_KIND, payload, bytes(sig))
