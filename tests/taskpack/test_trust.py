from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from p2pfl.identity import Identity
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
    cid: str
    manifest: bytes
    sig: bytes


def publish(tmp_path: Path, doc: dict | None = None, signer: Identity = PUBLISHER) -> Signed:
    root = write_tree(tmp_path / "tp", {"src/task.py": b"# task\n"}, manifest_yaml(doc))
    archive = pack_dir(root)
    cid = cid_of(archive)
    manifest = load_manifest(root).canonical_bytes()
    return Signed(archive, cid, manifest, sign_taskpack(signer, manifest, cid))


def announce(s: Signed, policy: TrustPolicy | None = None, caps=CAPS, datasets=DATASETS):
    policy = policy or TrustPolicy(frozenset({PUBLISHER.peer_id}))
    return check_announcement(PUBLISHER.peer_id, s.manifest, s.cid, s.sig, policy, caps, datasets)


def test_happy_path(tmp_path: Path) -> None:
    s = publish(tmp_path)
    assert verify_taskpack(PUBLISHER.peer_id, s.manifest, s.cid, s.sig)
    assert announce(s) is None
    assert check_archive(s.archive, s.cid, s.manifest) is None
    policy = TrustPolicy(trust_any=True)
    assert (
        authenticate(PUBLISHER.peer_id, s.manifest, s.cid, s.sig, policy, CAPS, DATASETS, s.archive)
        is None
    )


def test_payload_is_unambiguous() -> None:
    # The digest is fixed-length, so no (manifest, cid) pair can collide with another.
    assert len(signing_payload(b"m", "c")) == 33
    assert signing_payload(b"ab", "c") != signing_payload(b"a", "bc")


def test_wrong_signature(tmp_path: Path) -> None:
    s = publish(tmp_path, signer=OTHER)  # signed by someone else, announced as PUBLISHER
    assert announce(s) == Refusal("bad-signature", announce(s).detail)
    assert not verify_taskpack(PUBLISHER.peer_id, s.manifest, s.cid, b"\0" * 64)
    assert not verify_taskpack("not-a-peer-id", s.manifest, s.cid, s.sig)
    assert not verify_taskpack(PUBLISHER.peer_id, s.manifest, "caf\u00e9", s.sig)
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
    sig = sign_taskpack(PUBLISHER, honest.manifest, other.cid)
    assert announce(Signed(other.archive, other.cid, honest.manifest, sig)) is None
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
    cid = cid_of(b"whatever")
    s = Signed(b"", cid, manifest, sign_taskpack(PUBLISHER, manifest, cid))
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
