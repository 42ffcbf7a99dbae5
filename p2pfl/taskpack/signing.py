"""Publisher signatures over a taskpack: the canonical manifest bytes plus the archive's CID.

The signed payload is ``sha256(manifest_bytes) || cid`` (ASCII), signed as a record of kind
``"taskpack"`` (identity.py adds the domain separation). The digest has a fixed length, so
the split between the two parts is unambiguous; signing the CID binds the manifest to one
exact archive, and signing the manifest lets a node judge the task before fetching it.
"""

from __future__ import annotations

import hashlib

from p2pfl.identity import Identity, verify

__all__ = ["SIGNATURE_KIND", "sign_taskpack", "signing_payload", "verify_taskpack"]

SIGNATURE_KIND = "taskpack"


def signing_payload(manifest_bytes: bytes, cid: str) -> bytes:
    """The exact bytes signed: 32-byte sha256 of the manifest, then the CID in ASCII."""
    return hashlib.sha256(manifest_bytes).digest() + cid.encode("ascii")


def sign_taskpack(identity: Identity, manifest_bytes: bytes, cid: str) -> bytes:
    """The publisher's 64-byte Ed25519 signature of (manifest_bytes, cid).

    Pass ``Manifest.canonical_bytes()`` as `manifest_bytes`: that is what nodes receive.
    """
    return identity.sign(SIGNATURE_KIND, signing_payload(manifest_bytes, cid))


def verify_taskpack(publisher: str, manifest_bytes: bytes, cid: str, sig: bytes) -> bool:
    """True when `sig` is `publisher`'s (a peer id) signature of (manifest_bytes, cid).

    Never raises on a peer's bad input: malformed ids, CIDs or signatures give False.
    """
    if not isinstance(cid, str) or not cid.isascii() or not isinstance(sig, (bytes, bytearray)):
        return False
    if not isinstance(manifest_bytes, (bytes, bytearray)) or not isinstance(publisher, str):
        return False
    return verify(
        publisher, SIGNATURE_KIND, signing_payload(bytes(manifest_bytes), cid), bytes(sig)
    )
