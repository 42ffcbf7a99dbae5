"""Taskpack dissemination: signed manifests spread on gossip, archives move by content id.

State per taskpack (by archive cid)::

    (announce) --checks fail--> rejected(reason)
        |
        +--checks pass--> fetching --blob verified--> checking --archive ok--> verified
                              |                           |
                              +--no provider left-------->+--mismatch--> rejected(reason)

Checks before fetching (in this order): signature, publisher trusted, manifest valid,
requirements met by this node. After fetching: every chunk was verified against the
signed chunk hashes as it arrived; then the whole archive's cid and the manifest inside it
are compared with the signed ones. Nothing of a taskpack runs before `verified`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pfl.core.commands import (
    AddProviders,
    CheckArchive,
    Command,
    FetchBlob,
    Log,
    Publish,
    Send,
)
from p2pfl.core.messages import TOPIC_TASKPACKS, TaskpackAnnounce, TaskpackHave, TaskpackSync
from p2pfl.errors import RemoteProtocolError

FETCHING, CHECKING, VERIFIED, REJECTED = "fetching", "checking", "verified", "rejected"
# A one-chunk archive is fetched from the publisher in one round trip; announcing that we
# hold it would cost every node a gossip message for no gain.
_SWARM_MIN_CHUNKS = 2
_SYNC_MAX = 64  # announcements sent to a newly connected peer
# While downloading, a node announces the chunks it holds about this many times (every
# n_chunks / _HAVE_STEPS new chunks), so the others fetch from it rather than all from
# the publisher's one uplink, at a cost of a few small gossip messages per node.
_HAVE_STEPS = 10


@dataclass
class TaskpackEntry:
    cid: str
    announce: TaskpackAnnounce
    name: str = "?"
    version: str = "?"
    type: str = "?"
    status: str = FETCHING
    reason: str = ""
    detail: str = ""
    manifest: Any = None  # p2pfl.taskpack.manifest.Manifest once parsed
    providers: set[str] = field(default_factory=set)  # peers known to hold all of it
    have_announced: int = 0  # chunks held when we last announced a partial TaskpackHave

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "cid": self.cid,
            "publisher": self.announce.publisher,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
            "type": self.type,
        }


class TaskpackBook:
    """This node's view of every taskpack it has heard of."""

    def __init__(self, me: str, policy: Any, capabilities: dict[str, Any]) -> None:
        self.me = me
        self.policy = policy
        self.capabilities = capabilities
        self.entries: dict[str, TaskpackEntry] = {}
        self.refusals: list[dict[str, Any]] = []  # every refusal, with its reason

    # --- queries ---------------------------------------------------------------------

    def verified(self, cid: str) -> TaskpackEntry | None:
        entry = self.entries.get(cid)
        return entry if entry is not None and entry.status == VERIFIED else None

    def find(self, ref: str) -> TaskpackEntry | None:
        """By cid, or by name / name@version / name@range like ^1 (the newest verified)."""
        if ref in self.entries:
            return self.entries[ref]
        name, _, version = ref.partition("@")
        matches = [
            e
            for e in self.entries.values()
            if e.name == name and e.status == VERIFIED and _version_matches(e.version, version)
        ]
        if not matches:
            return None
        return max(matches, key=lambda e: _version_key(e.version))

    def listing(self) -> list[dict[str, Any]]:
        return [
            e.summary()
            for e in sorted(self.entries.values(), key=lambda e: (e.name, e.version, e.cid))
        ]

    # --- events ----------------------------------------------------------------------

    def publish_local(self, ann: TaskpackAnnounce) -> list[Command]:
        """Our own taskpack: already packed, signed and stored by the driver."""
        entry = self._new_entry(ann)
        entry.status = VERIFIED
        self.entries[ann.ref.cid] = entry
        return [
            Publish(TOPIC_TASKPACKS, ann),
            Log("info", f"published taskpack {entry.name}@{entry.version} {ann.ref.cid}"),
        ]

    def on_announce(self, sender: str, ann: TaskpackAnnounce) -> list[Command]:
        cid = ann.ref.cid
        known = self.entries.get(cid)
        if known is not None:
            # Already known: the sender holds it (it relays or re-announces); use as provider.
            if known.status == FETCHING and sender != self.me and sender not in known.providers:
                known.providers.add(sender)
                return [AddProviders(cid, (sender,))]
            return []
        entry = self._new_entry(ann)
        self.entries[cid] = entry
        refusal = self._check_announcement(ann)
        if refusal is not None:
            return self._reject(entry, *refusal)
        entry.providers = {ann.publisher} | ({sender} if sender != self.me else set())
        entry.providers.discard(self.me)
        return [
            FetchBlob(ann.ref, tuple(sorted(entry.providers))),
            Log("info", f"fetching taskpack {entry.name}@{entry.version} {cid}"),
        ]

    def on_have(self, sender: str, have: TaskpackHave) -> list[Command]:
        """`sender` serves all of a taskpack's archive, or (a bitmap) the chunks it holds
        so far: the fetch may ask it for them."""
        entry = self.entries.get(have.cid)
        if entry is None or sender == self.me or sender in entry.providers:
            return []
        if have.chunks:
            n = len(entry.announce.ref.chunk_hashes)
            _check_bitmap(have.chunks, n)
            if entry.status != FETCHING:
                return []
            return [AddProviders(have.cid, (sender,), have.chunks)]
        entry.providers.add(sender)
        return [AddProviders(have.cid, (sender,))] if entry.status == FETCHING else []

    def on_fetch_progress(self, cid: str, n_have: int, bitmap: bytes) -> list[Command]:
        """The archive's download holds `n_have` verified chunks (`bitmap`, see
        TaskpackHave): announce them when enough are new since the last announcement."""
        entry = self.entries.get(cid)
        if entry is None or entry.status != FETCHING:
            return []
        n = len(entry.announce.ref.chunk_hashes)
        step = max(1, -(-n // _HAVE_STEPS))
        if n < _SWARM_MIN_CHUNKS or n_have >= n:
            return []  # the whole archive is announced once verified (on_blob_ready)
        if entry.have_announced and n_have - entry.have_announced < step:
            return []  # the first chunk is announced at once: others can start on it
        entry.have_announced = n_have
        return [Publish(TOPIC_TASKPACKS, TaskpackHave(cid, bitmap))]

    def on_peer_connected(self, peer: str) -> list[Command]:
        anns = tuple(e.announce for e in self.entries.values() if e.status == VERIFIED)[-_SYNC_MAX:]
        return [Send(peer, TaskpackSync(anns))] if anns else []

    def on_sync(self, sender: str, sync: TaskpackSync) -> list[Command]:
        out: list[Command] = []
        for ann in sync.announcements[:_SYNC_MAX]:
            out += self.on_announce(sender, ann)
        return out

    def on_blob_ready(self, cid: str) -> list[Command]:
        entry = self.entries.get(cid)
        if entry is None or entry.status != FETCHING:
            return []
        entry.status = CHECKING
        out: list[Command] = [CheckArchive(cid, entry.announce.manifest)]
        if len(entry.announce.ref.chunk_hashes) >= _SWARM_MIN_CHUNKS:
            # Every chunk and the whole cid are verified: serve it now, while the archive
            # check runs (a peer verifies whatever it gets from us anyway).
            out.append(Publish(TOPIC_TASKPACKS, TaskpackHave(cid)))
        return out

    def on_blob_failed(self, cid: str, reason: str) -> list[Command]:
        entry = self.entries.get(cid)
        if entry is None or entry.status != FETCHING:
            return []
        code = "hash-mismatch" if "mismatch" in reason else "fetch-failed"
        return self._reject(entry, code, reason)

    def on_archive_checked(self, cid: str, refusal: str | None, detail: str) -> list[Command]:
        entry = self.entries.get(cid)
        if entry is None or entry.status != CHECKING:
            return []
        if refusal is not None:
            return self._reject(entry, refusal, detail)
        entry.status = VERIFIED
        return [Log("info", f"taskpack {entry.name}@{entry.version} verified {cid}")]

    # --- internals -------------------------------------------------------------------

    def _new_entry(self, ann: TaskpackAnnounce) -> TaskpackEntry:
        entry = TaskpackEntry(cid=ann.ref.cid, announce=ann)
        try:
            from p2pfl.taskpack.manifest import load_manifest

            manifest = load_manifest(ann.manifest)
        except Exception:  # reported by _check_announcement with the full reason
            return entry
        entry.manifest = manifest
        entry.name = manifest.metadata.name
        entry.version = manifest.metadata.version
        entry.type = manifest.spec.type
        return entry

    def _check_announcement(self, ann: TaskpackAnnounce) -> tuple[str, str] | None:
        from p2pfl.taskpack.trust import check_announcement

        refusal = check_announcement(
            ann.publisher,
            ann.manifest,
            ann.ref.cid,
            ann.sig,
            self.policy,
            self.capabilities,
            None,  # inputs are checked per task offer, not per taskpack
        )
        if refusal is None:
            return None
        return refusal.reason, refusal.detail

    def _reject(self, entry: TaskpackEntry, reason: str, detail: str) -> list[Command]:
        entry.status = REJECTED
        entry.reason = reason
        entry.detail = detail
        self.refusals.append(
            {"cid": entry.cid, "name": entry.name, "reason": reason, "detail": detail}
        )
        return [
            Log(
                "warning",
                f"rejected taskpack {entry.name}@{entry.version} {entry.cid} from "
                f"{entry.announce.publisher}: {reason} ({detail})",
            )
        ]


def _check_bitmap(bitmap: bytes, n: int) -> None:
    """RemoteProtocolError unless `bitmap` is a chunk bitmap of `n` chunks (see
    TaskpackHave); the same rule as p2pfl.store.blobs.decode_bitmap, without the set."""
    if len(bitmap) != (n + 7) // 8:
        raise RemoteProtocolError(f"chunk bitmap of {len(bitmap)} bytes for {n} chunks")
    if n % 8 and bitmap[-1] & (0xFF >> (n % 8)):
        raise RemoteProtocolError("chunk bitmap has bits set past the last chunk")


def _version_key(version: str) -> tuple:
    try:
        import semver

        v = semver.Version.parse(version)
        return (1, v.major, v.minor, v.patch, v.prerelease is None, str(v.prerelease or ""))
    except Exception:
        return (0, version)


def _version_matches(version: str, wanted: str) -> bool:
    """No version: any; an exact version; or a semver range (^1, ~1.2, >=1.0,<2)."""
    if not wanted or version == wanted:
        return True
    from p2pfl.policy.ranges import parse_range, version_in

    try:
        return version_in(version, parse_range(wanted))
    except ValueError:
        return False
