"""Signed envelopes: seal/unseal, tampering, wrong kind."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from p2pfl.errors import RemoteProtocolError
from p2pfl.identity import Identity
from p2pfl.wire import Signed, decode, encode, message, seal, unseal


@message("test.signed.note")
@dataclass(frozen=True, slots=True)
class Note:
    text: str


@message("test.signed.other")
@dataclass(frozen=True, slots=True)
class Other:
    text: str


ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)


def test_seal_unseal_round_trip_over_the_wire() -> None:
    env = seal(ALICE, Note("hi"))
    assert env.signer == ALICE.peer_id and env.kind == "test.signed.note"
    back = decode(encode(env), expected=Signed)
    assert unseal(back) == Note("hi")
    assert unseal(back, expected=Note) == Note("hi")
    with pytest.raises(RemoteProtocolError, match="unexpected message type"):
        unseal(back, expected=Other)


def test_tampering_detected() -> None:
    env = seal(ALICE, Note("hi"))
    for bad in (
        replace(env, body=encode(Note("ho"))),
        replace(env, signer=BOB.peer_id),
        replace(env, sig=bytes(64)),
        replace(env, sig=b"short"),
        replace(env, signer="not-a-peer-id"),
        replace(env, kind="test.signed.other"),
    ):
        with pytest.raises(RemoteProtocolError, match="bad signature"):
            unseal(bad)


def test_kind_must_match_body() -> None:
    # A validly signed envelope whose declared kind lies about the body.
    body = encode(Other("x"))
    env = Signed(ALICE.peer_id, "test.signed.note", body, ALICE.sign("test.signed.note", body))
    with pytest.raises(RemoteProtocolError, match="does not match"):
        unseal(env)
