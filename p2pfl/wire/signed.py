"""Signed envelopes: a message plus its sender's Ed25519 signature over the exact bytes.

The signature covers the canonical encoding of the inner message under the domain
"p2pfl/v1/<kind>", so a signature made for one message type can never pass for another,
and the envelope can be stored and re-checked later, off the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pfl.errors import RemoteProtocolError
from p2pfl.identity import Identity, verify
from p2pfl.wire.codec import decode, encode, message, type_name


@message("signed")
@dataclass(frozen=True, slots=True)
class Signed:
    signer: str  # peer id of the signer (its public key is inside it)
    kind: str  # wire type name of the inner message
    body: bytes  # encode(inner message)
    sig: bytes  # identity.sign(kind, body)


def seal(identity: Identity, msg: Any) -> Signed:
    """Encode `msg` and sign it with `identity`."""
    kind = type_name(msg)
    body = encode(msg)
    return Signed(signer=identity.peer_id, kind=kind, body=body, sig=identity.sign(kind, body))


def unseal(signed: Signed, expected: type | tuple[type, ...] | None = None) -> Any:
    """Check the signature, then decode the body; RemoteProtocolError if anything is off.

    The caller still decides whether it trusts `signed.signer`; this only proves that the
    signer made this message.
    """
    if not verify(signed.signer, signed.kind, signed.body, signed.sig):
        raise RemoteProtocolError(f"bad signature from {signed.signer[:64]}")
    msg = decode(signed.body, expected)
    if type_name(msg) != signed.kind:
        raise RemoteProtocolError(
            f"signed kind {signed.kind[:64]!r} does not match body type {type_name(msg)!r}"
        )
    return msg
