"""Should this node run a taskpack? The authentication pipeline, pure and clock-free.

Two checkpoints, each returning ``None`` (go on) or the first ``Refusal``:

1. ``check_announcement`` -- before fetching anything, from the gossiped announcement:
   signature (over the manifest and the whole BlobRef: cid, size, chunk hashes), then a
   self-consistent ref within the size cap, then trust, then manifest validity, then
   requirements, then inputs. The cheap, peer-independent signature check goes first so a
   forged announcement can never make a node do more work or reveal what it trusts.
2. ``check_archive`` -- after fetching: the archive's bytes hash to the CID, the archive is
   safe to unpack, and its ``manifest.yaml`` is the manifest that was signed.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from p2pfl.errors import RemoteProtocolError, ValidationError
from p2pfl.limits import blob_too_big
from p2pfl.store.blobref import BlobRef, validate_ref
from p2pfl.store.cid import cid_of
from p2pfl.taskpack.manifest import MANIFEST_FILE, Manifest, load_manifest
from p2pfl.taskpack.pack import read_member, scan
from p2pfl.taskpack.signing import verify_taskpack

__all__ = [
    "REASONS",
    "Reason",
    "Refusal",
    "TrustPolicy",
    "authenticate",
    "check_announcement",
    "check_archive",
    "check_inputs",
    "check_requirements",
]

Reason = Literal[
    "untrusted-publisher",
    "bad-signature",
    "bad-ref",
    "too-large",
    "invalid-manifest",
    "requirements-unmet",
    "inputs-missing",
    "hash-mismatch",
    "manifest-mismatch",
    "bad-archive",
]
REASONS: tuple[str, ...] = Reason.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Refusal:
    """Why a node will not run a taskpack. `reason` is machine-readable, `detail` for people."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class TrustPolicy:
    """Which publishers' code this node runs: the listed peer ids, or anyone (`trust_any`)."""

    trusted: frozenset[str] = frozenset()
    trust_any: bool = False

    def allows(self, publisher: str) -> bool:
        return self.trust_any or publisher in self.trusted


def check_requirements(manifest: Manifest, capabilities: Mapping[str, Any]) -> Refusal | None:
    """Manifest requirements vs this node's capabilities.

    `capabilities` keys: ``python`` (e.g. "3.11.7"; default: this interpreter),
    ``gpu`` (bool; default False), ``memory_bytes`` and ``disk_free_bytes`` (unchecked when
    absent or <= 0: unknown is not insufficient), optional ``frameworks`` (names this node can run;
    unchecked when absent; "none" always passes).
    """
    req = manifest.spec.requirements
    unmet: list[str] = []
    python = str(capabilities.get("python") or platform.python_version())
    if req.python:
        try:
            ok = SpecifierSet(req.python).contains(Version(python), prereleases=True)
        except (InvalidSpecifier, InvalidVersion):
            ok = False
        if not ok:
            unmet.append(f"python {req.python} wanted, this node has {python}")
    if req.gpu == "required" and not capabilities.get("gpu", False):
        unmet.append("a GPU is required, this node has none")
    memory = capabilities.get("memory_bytes")
    if req.memory_bytes and isinstance(memory, int) and 0 < memory < req.memory_bytes:
        unmet.append(f"memory {req.memory_bytes} bytes wanted, this node has {memory}")
    disk = capabilities.get("disk_free_bytes")
    if req.storage_bytes and isinstance(disk, int) and 0 < disk < req.storage_bytes:
        unmet.append(f"storage {req.storage_bytes} bytes wanted, this node has {disk} free")
    frameworks = capabilities.get("frameworks")
    framework = manifest.spec.framework
    if frameworks is not None and framework != "none" and framework not in frameworks:
        unmet.append(f"framework {framework!r} is not available on this node")
    return Refusal("requirements-unmet", "; ".join(unmet)) if unmet else None


def check_inputs(manifest: Manifest, dataset_names: Iterable[str] | None) -> Refusal | None:
    """Every input the manifest names must be a dataset registered on this node.

    ``dataset_names=None`` skips the check (e.g. a taskpack seen before any task offer).
    """
    if dataset_names is None:
        return None
    have = set(dataset_names)
    missing = [i.name for i in manifest.spec.inputs if i.name not in have]
    if missing:
        return Refusal("inputs-missing", f"no dataset named {', '.join(map(repr, missing))}")
    return None


def check_announcement(
    publisher: str,
    manifest_bytes: bytes,
    ref: BlobRef,
    sig: bytes,
    policy: TrustPolicy,
    capabilities: Mapping[str, Any],
    dataset_names: Iterable[str] | None,
) -> Refusal | None:
    """Judge a task announcement before fetching its archive (see the module docstring).

    ``dataset_names=None`` skips the inputs check (nothing to match against yet).
    """
    if not verify_taskpack(publisher, manifest_bytes, ref, sig):
        return Refusal(
            "bad-signature",
            f"signature does not match publisher {str(publisher)[:64]!r} for this manifest"
            " and blob reference",
        )
    try:
        validate_ref(ref)
    except RemoteProtocolError as exc:
        return Refusal("bad-ref", str(exc))
    too_big = blob_too_big("taskpack", ref.size)
    if too_big is not None:
        return Refusal("too-large", too_big)
    if not policy.allows(publisher):
        return Refusal("untrusted-publisher", f"{publisher} is not in this node's trust list")
    try:
        manifest = load_manifest(manifest_bytes)
    except ValidationError as exc:
        return Refusal("invalid-manifest", "; ".join(exc.problems))
    return check_requirements(manifest, capabilities) or check_inputs(manifest, dataset_names)


def check_archive(archive: bytes, cid: str, manifest_bytes: bytes) -> Refusal | None:
    """Judge a fetched archive against the signed (cid, manifest_bytes).

    Past the hash check the verdict is a function of (cid, manifest_bytes) alone, so it is
    memoised (the last few): a simulation's thousands of nodes in one process check the
    same archive once, not once each (about 40 ms of YAML and schema work per check)."""
    if cid_of(archive) != cid:
        return Refusal("hash-mismatch", f"archive bytes do not hash to {cid[:80]!r}")
    return _check_contents(archive, cid, bytes(manifest_bytes))


def _check_contents(archive: bytes, cid: str, manifest_bytes: bytes) -> Refusal | None:
    key = (cid, manifest_bytes)
    if key in _VERDICTS:
        return _VERDICTS[key]
    verdict = _judge_contents(archive, manifest_bytes)
    if len(_VERDICTS) >= 8:
        _VERDICTS.pop(next(iter(_VERDICTS)))
    _VERDICTS[key] = verdict
    return verdict


# (cid, signed manifest bytes) -> verdict; Refusal is frozen, None is None.
_VERDICTS: dict[tuple[str, bytes], Refusal | None] = {}


def _judge_contents(archive: bytes, manifest_bytes: bytes) -> Refusal | None:
    try:
        scan(archive)
        inside = read_member(archive, MANIFEST_FILE)
    except RemoteProtocolError as exc:
        return Refusal("bad-archive", str(exc))
    except KeyError:
        return Refusal("manifest-mismatch", f"the archive has no {MANIFEST_FILE}")
    try:
        packed = load_manifest(inside).canonical_bytes()
    except ValidationError as exc:
        return Refusal("invalid-manifest", "archive's manifest: " + "; ".join(exc.problems))
    try:
        signed = load_manifest(manifest_bytes).canonical_bytes()
    except ValidationError as exc:
        return Refusal("invalid-manifest", "; ".join(exc.problems))
    if packed != signed:
        return Refusal("manifest-mismatch", f"the archive's {MANIFEST_FILE} is not the signed one")
    return None


def authenticate(
    publisher: str,
    manifest_bytes: bytes,
    ref: BlobRef,
    sig: bytes,
    policy: TrustPolicy,
    capabilities: Mapping[str, Any],
    dataset_names: Iterable[str] | None,
    archive: bytes | None = None,
) -> Refusal | None:
    """Both checkpoints in order; the archive check runs only when `archive` is given."""
    refusal = check_announcement(
        publisher, manifest_bytes, ref, sig, policy, capabilities, dataset_names
    )
    if refusal is None and archive is not None:
        refusal = check_archive(archive, ref.cid, manifest_bytes)
    return refusal
