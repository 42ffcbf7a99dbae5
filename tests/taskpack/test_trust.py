from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from p2pfl.identity import Identity
from p2pfl.limits import MAX_TASKPACK_BYTES
from p2pfl.store.blobref import BlobRef, make_blob_ref
from p2pfl.store.cid import cid_of
from p2pfl.taskpack.manifest import load_manifest
from p2pfl.taskpack.pack import pack_dir
from p2pfl.taskpack.signing import sign_taskpack, signing_payload, verify_taskpack
from p2pfl.taskpack.trust import (
    REASONS,
    Refusal,
    TrustPolicy,
    authenticate,
    check_announcement,
    check_archive,
)

from .helpers import manifest_doc, manifest_yaml, write_tree

PUBLISHER = Identity.from_seed(b"\x01" * 32)
OTHER = Identity.from_seed(b"\x02" * 32)
CAPS = {"python": "3.11.7", "gpu": False, "memory_bytes": 8 * 2**30, "disk_free_bytes": 50 * 2**30}
DATASETS = ["wages", "other"]


@dataclasses.dataclass
class Signed:
    archive: bytes
    ref: BlobRef
    manifest: bytes
    sig: bytes

    @property
    def cid(self) -> str:
        return self.ref.cid


def publish(tmp_path: Path, doc: dict | None = None, signer: Identity = PUBLISHER) -> Signed:
    root = write_tree(tmp_path / "tp", {"src/task.py": b"# task\n"}, manifest_yaml(doc))
    archive = pack_dir(root)
    ref = make_blob_ref(archive)
    manifest = load_manifest(root).canonical_bytes()
    return Signed(archive, ref, manifest, sign_taskpack(signer, manifest, ref))


def announce(s: Signed, policy: TrustPolicy | None = None, caps=CAPS, datasets=DATASETS):
    policy = policy or TrustPolicy(frozenset({PUBLISHER.peer_id}))
    return check_announcement(PUBLISHER.peer_id, s.manifest, s.ref, s.sig, policy, caps, datasets)


def test_happy_path(tmp_path: Path) -> None:
    s = publish(tmp_path)
    assert verify_taskpack(PUBLISHER.peer_id, s.manifest, s.ref, s.sig)
    assert announce(s) is None
    assert check_archive(s.archive, s.cid, s.manifest) is None
    policy = TrustPolicy(trust_any=True)
    assert (
        authenticate(PUBLISHER.peer_id, s.manifest, s.ref, s.sig, policy, CAPS, DATASETS, s.archive)
        is None
    )


def test_payload_is_unambiguous_and_covers_the_whole_ref() -> None:
    # Tag plus two fixed-length digests: no (manifest, ref) pair can collide with another.
    ref = make_blob_ref(b"x" * 5000, chunk_size=1024)
    assert len(signing_payload(b"m", ref)) == len(b"p2pfl-taskpack-v2\0") + 64
    assert signing_payload(b"ab", ref) != signing_payload(b"a", ref)
    for changed in (
        dataclasses.replace(ref, size=ref.size + 1),
        dataclasses.replace(ref, chunk_size=2048),
        dataclasses.replace(ref, chunk_hashes=ref.chunk_hashes[:-1]),
        dataclasses.replace(ref, chunk_hashes=(b"\0" * 32, *ref.chunk_hashes[1:])),
        dataclasses.replace(ref, cid=cid_of(b"other")),
    ):
        assert signing_payload(b"m", changed) != signing_payload(b"m", ref)


def test_genuine_signature_with_forged_ref_is_bad_signature(tmp_path: Path) -> None:
    """The 1 GiB download of issue 9: a real signature, a forged size and chunk list."""
    s = publish(tmp_path)
    gib = 2**30
    forged = BlobRef(s.cid, gib, 4 * 2**20, tuple(b"\x07" * 32 for _ in range(gib // (4 * 2**20))))
    refusal = announce(dataclasses.replace(s, ref=forged))
    assert refusal is not None and refusal.reason == "bad-signature"
    hashes = dataclasses.replace(s.ref, chunk_hashes=(b"\x07" * 32,) * s.ref.n_chunks)
    assert announce(dataclasses.replace(s, ref=hashes)).reason == "bad-signature"


def test_version_1_signature_is_refused(tmp_path: Path) -> None:
    s = publish(tmp_path)
    # Version 1 signed sha256(manifest) || cid only (the reference could be forged).
    v1 = PUBLISHER.sign("taskpack", hashlib.sha256(s.manifest).digest() + s.cid.encode())
    assert announce(dataclasses.replace(s, sig=v1)).reason == "bad-signature"


def test_oversize_taskpack_refused_before_fetch() -> None:
    manifest = load_manifest(manifest_yaml()).canonical_bytes()
    chunk = 4 * 2**20
    size = MAX_TASKPACK_BYTES + 1
    n = -(-size // chunk)
    ref = BlobRef(cid_of(b"big"), size, chunk, (b"\x01" * 32,) * n)
    s = Signed(b"", ref, manifest, sign_taskpack(PUBLISHER, manifest, ref))
    refusal = announce(s)
    assert refusal is not None and refusal.reason == "too-large"
    assert str(MAX_TASKPACK_BYTES) in refusal.detail
    fits = BlobRef(
        ref.cid, MAX_TASKPACK_BYTES, chunk, (b"\x01" * 32,) * (MAX_TASKPACK_BYTES // chunk)
    )
    assert announce(Signed(b"", fits, manifest, sign_taskpack(PUBLISHER, manifest, fits))) is None


def test_inconsistent_ref_is_bad_ref() -> None:
    manifest = load_manifest(manifest_yaml()).canonical_bytes()
    ref = BlobRef(cid_of(b"x"), 10_000, 1024, (b"\x01" * 32,) * 3)  # 10 chunks, 3 hashes
    refusal = announce(Signed(b"", ref, manifest, sign_taskpack(PUBLISHER, manifest, ref)))
    assert refusal is not None and refusal.reason == "bad-ref"


def test_wrong_signature(tmp_path: Path) -> None:
    s = publish(tmp_path, signer=OTHER)  # signed by someone else, announced as PUBLISHER
    assert announce(s) == Refusal("bad-signature", announce(s).detail)
    assert not verify_taskpack(PUBLISHER.peer_id, s.manifest, s.ref, b"\0" * 64)
    assert not verify_taskpack("not-a-peer-id", s.manifest, s.ref, s.sig)
    bad_cid = dataclasses.replace(s.ref, cid="caf\u00e9")
    assert not verify_taskpack(PUBLISHER.peer_id, s.manifest, bad_cid, s.sig)
    assert not verify_taskpack(PUBLISHER.peer_id, s.manifest, s.cid, s.sig)  # not a BlobRef
    assert not verify_taskpack(
        PUBLISHER.peer_id, s.manifest, dataclasses.replace(s.ref, size=-1), s.sig
    )
    good = publish(tmp_path / "g")
    flipped = bytes([good.sig[0] ^ 1]) + good.sig[1:]
    assert announce(dataclasses.replace(good, sig=flipped)).reason == "bad-signature"
    assert announce(dataclasses.replace(good, sig=b"short")).reason == "bad-signature"


def test_signature_checked_before_trust(tmp_path: Path) -> None:
    s = publish(tmp_path, signer=OTHER)
    nobody = TrustPolicy(frozenset())
    assert announce(s, policy=nobody).reason == "bad-signature"


def test_untrusted_publisher(tmp_path: Path) -> None:
    s = publish(tmp_path)
    refusal = announce(s, policy=TrustPolicy(frozenset({OTHER.peer_id})))
    assert refusal is not None and refusal.reason == "untrusted-publisher"
    assert PUBLISHER.peer_id in refusal.detail
    assert announce(s, policy=TrustPolicy(trust_any=True)) is None


def test_changed_manifest_in_announcement_is_bad_signature(tmp_path: Path) -> None:
    s = publish(tmp_path)
    changed = s.manifest.replace(b'"rounds":3', b'"rounds":300')
    assert changed != s.manifest
    assert announce(dataclasses.replace(s, manifest=changed)).reason == "bad-signature"


def test_changed_manifest_in_archive_is_manifest_mismatch(tmp_path: Path) -> None:
    honest = publish(tmp_path / "a")
    # A different archive whose CID is signed together with the *original* manifest.
    other = publish(tmp_path / "b", manifest_doc(spec__federated__rounds=300))
    sig = sign_taskpack(PUBLISHER, honest.manifest, other.ref)
    assert announce(Signed(other.archive, other.ref, honest.manifest, sig)) is None
    refusal = check_archive(other.archive, other.cid, honest.manifest)
    assert refusal is not None and refusal.reason == "manifest-mismatch"


def test_flipped_byte_anywhere_is_hash_mismatch(tmp_path: Path) -> None:
    s = publish(tmp_path)
    step = max(1, len(s.archive) // 97)  # ~100 positions spread over headers, data, padding
    for pos in [*range(0, len(s.archive), step), len(s.archive) - 1]:
        bad = bytearray(s.archive)
        bad[pos] ^= 0x01
        refusal = check_archive(bytes(bad), s.cid, s.manifest)
        assert refusal is not None and refusal.reason == "hash-mismatch", pos
    assert check_archive(s.archive + b"\0", s.cid, s.manifest).reason == "hash-mismatch"
    assert check_archive(s.archive[:-1], s.cid, s.manifest).reason == "hash-mismatch"


def test_memoised_verdicts_still_bind_the_archive_bytes(tmp_path: Path) -> None:
    honest = publish(tmp_path / "a")
    other = publish(tmp_path / "b", manifest_doc(spec__federated__rounds=300))
    for _ in range(2):  # the second time from the memo: the same verdicts
        assert check_archive(honest.archive, honest.cid, honest.manifest) is None
        refusal = check_archive(other.archive, other.cid, honest.manifest)
        assert refusal is not None and refusal.reason == "manifest-mismatch"
    # A remembered good (cid, manifest) does not vouch for other bytes under that cid.
    bad = check_archive(other.archive, honest.cid, honest.manifest)
    assert bad is not None and bad.reason == "hash-mismatch"


def test_archive_without_manifest_or_unsafe(tmp_path: Path) -> None:
    from .helpers import member, raw_tar

    s = publish(tmp_path)
    no_manifest = raw_tar([(member("src/task.py"), b"x")])
    assert check_archive(no_manifest, cid_of(no_manifest), s.manifest).reason == (
        "manifest-mismatch"
    )
    evil = raw_tar([(member("manifest.yaml"), manifest_yaml()), (member("../x"), b"x")])
    assert check_archive(evil, cid_of(evil), s.manifest).reason == "bad-archive"


def test_invalid_manifest(tmp_path: Path) -> None:
    manifest = b'{"apiVersion":"p2pfl/v1","kind":"TaskPackage"}'
    ref = make_blob_ref(b"whatever")
    s = Signed(b"", ref, manifest, sign_taskpack(PUBLISHER, manifest, ref))
    refusal = announce(s)
    assert refusal is not None and refusal.reason == "invalid-manifest"
    assert "metadata: is required" in refusal.detail and "spec: is required" in refusal.detail


@pytest.mark.parametrize(
    ("changes", "caps", "needle"),
    [
        (
            {"spec__requirements__python": ">=3.12"},
            {},
            "python >=3.12 wanted, this node has 3.11.7",
        ),
        ({"spec__requirements__gpu": "required"}, {}, "a GPU is required"),
        ({"spec__requirements__memory": "16Gi"}, {}, "memory 17179869184 bytes wanted"),
        ({"spec__requirements__storage": "1Ti"}, {}, "storage 1099511627776 bytes wanted"),
        ({"spec__framework": "torch"}, {"frameworks": ["numpy"]}, "framework 'torch'"),
    ],
)
def test_requirements_unmet(tmp_path: Path, changes, caps, needle) -> None:
    s = publish(tmp_path, manifest_doc(**changes))
    refusal = announce(s, caps={**CAPS, **caps})
    assert refusal is not None and refusal.reason == "requirements-unmet"
    assert needle in refusal.detail


def test_requirements_met_or_unknown(tmp_path: Path) -> None:
    s = publish(tmp_path, manifest_doc(spec__requirements__gpu="required"))
    assert announce(s, caps={**CAPS, "gpu": True}) is None
    s = publish(tmp_path / "x", manifest_doc(spec__requirements__memory="1Ti"))
    assert announce(s, caps={"python": "3.11.7"}) is None  # memory unknown: not refused


def test_inputs_missing(tmp_path: Path) -> None:
    s = publish(tmp_path)
    refusal = announce(s, datasets=["other"])
    assert refusal == Refusal("inputs-missing", "no dataset named 'wages'")
    assert announce(s, datasets=None) is None  # not checked when no task offer yet


def test_check_order(tmp_path: Path) -> None:
    # Untrusted AND requirements unmet AND inputs missing: trust is reported first.
    s = publish(tmp_path, manifest_doc(spec__requirements__python=">=4"))
    nobody = TrustPolicy(frozenset())
    assert announce(s, policy=nobody, datasets=[]).reason == "untrusted-publisher"
    assert announce(s, datasets=[]).reason == "requirements-unmet"
    assert set(REASONS) >= {
        "untrusted-publisher",
        "bad-signature",
        "invalid-manifest",
        "requirements-unmet",
        "inputs-missing",
        "hash-mismatch",
        "manifest-mismatch",
    }
