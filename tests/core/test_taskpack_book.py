"""TaskpackBook against forged and oversized announcements, sans-IO (no network, no store).

Issue 9: a forged copy (bad signature) of a genuine announcement made the node reject the
genuine one for good; a genuine signature over a forged blob reference made it download
1 GiB before rejecting. Each test drives the book with announcements and reads commands.
"""

from __future__ import annotations

import dataclasses

from p2pfl.core.commands import AddProviders, CheckArchive, FetchBlob
from p2pfl.core.messages import TaskpackAnnounce
from p2pfl.core.taskpacks import TaskpackBook
from p2pfl.identity import Identity
from p2pfl.limits import MAX_TASKPACK_BYTES
from p2pfl.store.blobref import BlobRef, make_blob_ref
from p2pfl.store.cid import cid_of
from p2pfl.taskpack.manifest import load_manifest
from p2pfl.taskpack.signing import sign_taskpack
from p2pfl.taskpack.trust import TrustPolicy
from tests.taskpack.helpers import manifest_yaml

ME = Identity.from_seed(b"\x10" * 32).peer_id
GOOD = Identity.from_seed(b"\x11" * 32)  # trusted publisher
EVIL = Identity.from_seed(b"\x12" * 32)  # untrusted, signs validly with its own key
RELAY = Identity.from_seed(b"\x13" * 32).peer_id
CAPS = {"python": "3.11.7", "gpu": False}
MANIFEST = load_manifest(manifest_yaml()).canonical_bytes()
ARCHIVE = bytes(range(256)) * 20  # the bytes never move here: only the ref matters


def _book(*trusted: Identity) -> TaskpackBook:
    return TaskpackBook(ME, TrustPolicy(frozenset(i.peer_id for i in trusted)), dict(CAPS))


def _ann(
    signer: Identity, ref: BlobRef | None = None, manifest: bytes = MANIFEST
) -> TaskpackAnnounce:
    ref = ref or make_blob_ref(ARCHIVE, chunk_size=1024)
    return TaskpackAnnounce(manifest, ref, signer.peer_id, sign_taskpack(signer, manifest, ref))


def _fetches(out: list) -> list[FetchBlob]:
    return [c for c in out if isinstance(c, FetchBlob)]


def test_forged_copy_first_does_not_shadow_the_genuine_announcement() -> None:
    book = _book(GOOD)
    genuine = _ann(GOOD)
    forged = dataclasses.replace(genuine, sig=bytes(64))  # same cid and publisher, bad sig
    out = book.on_announce(RELAY, forged)
    assert not _fetches(out)
    assert genuine.ref.cid not in book.entries and not book.by_key  # nothing recorded
    assert book.refusals[-1]["reason"] == "bad-signature"
    out = book.on_announce(RELAY, genuine)  # later, the real one
    (fetch,) = _fetches(out)
    assert fetch.ref == genuine.ref and set(fetch.providers) == {GOOD.peer_id, RELAY}
    assert book.entries[genuine.ref.cid].status == "fetching"
    # The archive arrives and checks out: verified, whatever came first.
    (check,) = [c for c in book.on_blob_ready(genuine.ref.cid) if isinstance(c, CheckArchive)]
    assert check.manifest == genuine.manifest
    book.on_archive_checked(genuine.ref.cid, None, "")
    assert book.verified(genuine.ref.cid) is not None


def test_forged_copy_after_the_genuine_one_adds_no_provider() -> None:
    book = _book(GOOD)
    genuine = _ann(GOOD)
    book.on_announce(GOOD.peer_id, genuine)
    forged = dataclasses.replace(genuine, sig=bytes([genuine.sig[0] ^ 1]) + genuine.sig[1:])
    assert book.on_announce(RELAY, forged) == []
    assert book.on_announce(RELAY, genuine) == [AddProviders(genuine.ref.cid, (RELAY,))]


def test_genuine_signature_with_forged_ref_is_refused_before_any_fetch() -> None:
    book = _book(GOOD)
    genuine = _ann(GOOD)
    gib, chunk = 2**30, 4 * 2**20
    huge = BlobRef(genuine.ref.cid, gib, chunk, (b"\x07" * 32,) * (gib // chunk))
    for ref in (
        huge,
        dataclasses.replace(genuine.ref, chunk_hashes=(b"\x07" * 32,) * genuine.ref.n_chunks),
    ):
        out = book.on_announce(RELAY, dataclasses.replace(genuine, ref=ref))
        assert not _fetches(out)
        assert book.refusals[-1]["reason"] == "bad-signature"
    assert not book.by_key
    assert _fetches(book.on_announce(RELAY, genuine))  # the real ref still goes through


def test_oversize_taskpack_is_refused_before_any_fetch_with_a_reason() -> None:
    book = _book(GOOD)
    chunk = 4 * 2**20
    size = MAX_TASKPACK_BYTES + chunk
    ref = BlobRef(cid_of(b"big"), size, chunk, (b"\x01" * 32,) * (size // chunk))
    out = book.on_announce(GOOD.peer_id, _ann(GOOD, ref))
    assert not _fetches(out)
    entry = book.entries[ref.cid]
    assert (entry.status, entry.reason) == ("rejected", "too-large")
    assert str(MAX_TASKPACK_BYTES) in entry.detail


def test_rejection_for_one_publisher_does_not_block_another() -> None:
    book = _book(GOOD)
    same_archive = make_blob_ref(ARCHIVE, chunk_size=1024)
    out = book.on_announce(EVIL.peer_id, _ann(EVIL, same_archive))
    assert not _fetches(out)
    assert book.entries[same_archive.cid].reason == "untrusted-publisher"
    out = book.on_announce(RELAY, _ann(GOOD, same_archive))
    assert _fetches(out)
    assert book.entries[same_archive.cid].status == "fetching"  # the entry that counts
    publishers = {(e["publisher"], e["status"]) for e in book.listing()}
    assert publishers == {(EVIL.peer_id, "rejected"), (GOOD.peer_id, "fetching")}


def test_two_trusted_publishers_of_one_archive_share_one_fetch_and_check() -> None:
    other = Identity.from_seed(b"\x14" * 32)
    book = _book(GOOD, other)
    ref = make_blob_ref(ARCHIVE, chunk_size=1024)
    assert _fetches(book.on_announce(GOOD.peer_id, _ann(GOOD, ref)))
    out = book.on_announce(other.peer_id, _ann(other, ref))
    assert not _fetches(out) and out == [AddProviders(ref.cid, (other.peer_id,))]
    checks = [c for c in book.on_blob_ready(ref.cid) if isinstance(c, CheckArchive)]
    assert len(checks) == 1  # same manifest: one check answers both
    book.on_archive_checked(ref.cid, None, "")
    assert {e["status"] for e in book.listing()} == {"verified"}


def test_rejected_entries_are_bounded_and_slim() -> None:
    from p2pfl.core import taskpacks

    book = _book(GOOD)
    for i in range(taskpacks._MAX_REJECTED + 50):
        ref = make_blob_ref(i.to_bytes(4, "big") * 300, chunk_size=1024)
        book.on_announce(EVIL.peer_id, _ann(EVIL, ref))
    assert len(book.by_key) == taskpacks._MAX_REJECTED
    assert all(e.announce.manifest == b"" for e in book.by_key.values())
    assert len(book.refusals) <= taskpacks._MAX_REFUSALS
