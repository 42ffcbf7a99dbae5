"""Content ids and BlobRefs."""

from __future__ import annotations

import hashlib

import pytest
from multiformats import CID, multihash

from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.store import (
    BlobRef,
    check_chunk,
    cid_from_sha256,
    cid_of,
    digest_of_cid,
    is_cid,
    make_blob_ref,
    validate_ref,
)
from p2pfl.wire import decode, encode


def test_cid_of_known_value() -> None:
    # `ipfs add --raw-leaves --cid-version 1 hello` gives this CID for b"hello".
    assert cid_of(b"hello") == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    assert cid_of(memoryview(b"hello")) == cid_of(b"hello")
    assert digest_of_cid(cid_of(b"hello")) == hashlib.sha256(b"hello").digest()


def test_spelt_out_cid_matches_multiformats() -> None:
    from p2pfl.store.cid import cid_from_sha256_multiformats

    for i in range(200):  # digests of every kind of byte, the edge ones included
        digest = hashlib.sha256(i.to_bytes(2, "big")).digest()
        assert cid_from_sha256(digest) == cid_from_sha256_multiformats(digest)
    for digest in (bytes(32), b"\xff" * 32):
        assert cid_from_sha256(digest) == cid_from_sha256_multiformats(digest)
        assert digest_of_cid(cid_from_sha256(digest)) == digest
    with pytest.raises(ValueError, match="32 bytes"):
        cid_from_sha256(b"short")


def test_hand_decoded_digest_matches_multiformats() -> None:
    from p2pfl.store.cid import digest_of_cid_multiformats

    for i in range(300):
        cid = cid_of(i.to_bytes(2, "big"))
        assert digest_of_cid(cid) == digest_of_cid_multiformats(cid)
    # The last base32 character carries 2 padding bits: set, the CID is not canonical.
    cid = cid_of(b"x")
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    for flip in (1, 2, 3):
        other = cid[:-1] + alphabet[alphabet.index(cid[-1]) ^ flip]
        with pytest.raises(RemoteProtocolError, match="non-canonical"):
            digest_of_cid(other)


def test_streaming_variant_matches() -> None:
    h = hashlib.sha256()
    for part in (b"ab", b"cd", b"ef"):
        h.update(part)
    assert cid_from_sha256(h.digest()) == cid_of(b"abcdef")


def test_rejects_other_cids() -> None:
    data = b"x"
    others = [
        str(CID("base32", 1, "dag-pb", multihash.digest(data, "sha2-256"))),  # not raw
        str(CID("base32", 1, "raw", multihash.digest(data, "sha2-512"))),  # not sha2-256
        str(CID("base58btc", 0, "dag-pb", multihash.digest(data, "sha2-256"))),  # v0
        str(CID("base58btc", 1, "raw", multihash.digest(data, "sha2-256"))),  # not base32
        "bafkrei" + "a" * 51,
        "../../etc/passwd",
        "",
    ]
    for s in others:
        assert not is_cid(s), s
        with pytest.raises(RemoteProtocolError):
            digest_of_cid(s)
    assert not is_cid(None)
    assert is_cid(cid_of(data))


def test_blob_ref_and_chunks() -> None:
    data = bytes(i * 7 % 251 for i in range(5120))  # chunks differ from each other
    ref = make_blob_ref(data, chunk_size=2048)
    assert ref.cid == cid_of(data) and ref.size == 5120 and ref.n_chunks == 3
    assert ref.chunk_range(2) == (4096, 1024)
    validate_ref(ref)
    assert check_chunk(ref, 0, data[:2048])
    assert check_chunk(ref, 2, data[4096:])
    assert not check_chunk(ref, 1, data[:2048])
    assert not check_chunk(ref, 3, b"")
    assert not check_chunk(ref, 2, data[4096:] + b"x")
    # BlobRef is a wire record.
    empty = make_blob_ref(b"")
    assert empty.n_chunks == 0 and empty.size == 0
    with pytest.raises(LocalProtocolError):
        make_blob_ref(data, chunk_size=10)
    assert isinstance(ref, BlobRef)


@pytest.mark.parametrize(
    "change",
    [
        {"cid": "nope"},
        {"size": -1},
        {"chunk_size": 0},
        {"chunk_size": 1 << 30},
        {"size": 99999},
        {"chunk_hashes": (b"x",) * 3},
    ],
)
def test_validate_ref_rejects(change: dict) -> None:
    from dataclasses import replace

    ref = make_blob_ref(b"a" * 5000, chunk_size=2048)
    with pytest.raises(RemoteProtocolError):
        validate_ref(replace(ref, **change))


def test_blob_ref_in_a_message() -> None:
    from dataclasses import dataclass

    from p2pfl.wire import message

    @message("test.store.announce")
    @dataclass(frozen=True, slots=True)
    class Announce:
        ref: BlobRef

    msg = Announce(make_blob_ref(b"abc" * 1000, 1024))
    assert decode(encode(msg)) == msg
