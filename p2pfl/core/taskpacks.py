"""Taskpack dissemination: signed manifests spread on gossip, archives move by content id.

State per announcement, keyed by (archive cid, publisher)::

    (announce) --checks fail--> rejected(reason)
        |
        +--checks pass--> fetching --blob verified--> checking --archive ok--> verified
                              |                           |
                              +--no provider left-------->+--mismatch--> rejected(reason)

Checks before fetching (in this order, p2pfl.taskpack.trust): signature over the manifest
and the whole BlobRef (cid, size, chunk hashes), a self-consistent ref, the size cap
(p2pfl.limits.MAX_TASKPACK_BYTES), publisher trusted, manifest valid, requirements met by
this node. After fetching: every chunk was verified against the signed chunk hashes as it
arrived; then the whole archive's cid and the manifest inside it are compared with the
signed ones. Nothing of a taskpack runs before `verified`.

First-come must not win (shared/THREATS.md): an announcement whose signature does not
verify is never recorded (only counted in `refusals`), so a forged copy cannot shadow the
genuine one arriving later; and entries are keyed by (cid, publisher), so a refusal for one
publisher never blocks the same archive announced by another. Queries by cid (`entries`,
`verified`, `find`) see the entry that counts for that cid: verified first, then one in
progress, then a rejected one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
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
# Rejected entries kept for `p2pfl taskpacks` (slimmed: no manifest, no chunk hashes);
# refusals kept for the operator. Both are bounded: any peer can sign announcements.
_MAX_REJECTED = 1024
_MAX_REFUSALS = 1024
# Which entry answers a query by cid: the most advanced one.
_RANK = {"verified": 0, "checking": 1, "fetching": 2, "rejected": 3}


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
        from p2pfl.core.versions import model_schema

        return {
            "name": self.name,
            "version": self.version,
            "model_schema": model_schema(self.manifest) if self.manifest is not None else None,
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
        # (cid, publisher) -> entry: every announcement whose signature verified.
        self.by_key: dict[tuple[str, str], TaskpackEntry] = {}
        # cid -> the entry that counts for that cid (see the module docstring); derived.
        self.entries: dict[str, TaskpackEntry] = {}
        self.refusals: deque[dict[str, Any]] = deque(maxlen=_MAX_REFUSALS)
        self._rejected: deque[tuple[str, str]] = deque()  # keys of rejected entries, oldest first
        self._checking: dict[str, bytes] = {}  # cid -> canonical manifest being checked

    # --- queries ---------------------------------------------------------------------

    def verified(self, cid: str) -> TaskpackEntry | None:
        entry = self.entries.get(cid)
        return entry if entry is not None and entry.status == VERIFIED else None

    def find(self, ref: str) -> TaskpackEntry | None:
        """By cid, or by name / name@version / name@range like ^1 (the newest verified)."""
        from p2pfl.core.versions import newest, resolve

        if ref in self.entries:
            return self.entries[ref]
        name, _, wanted = ref.partition("@")
        held = [e for e in self.entries.values() if e.name == name and e.status == VERIFIED]
        # One rule (core/versions.py resolve: semver order, npm ranges). A bare name takes
        # the newest release, or the newest prerelease when there is no release.
        best = resolve(wanted or "*", [e.version for e in held])
        if best is None and not wanted:
            best = newest(e.version for e in held)
        matches = sorted((e for e in held if e.version == best), key=lambda e: e.cid)
        return matches[0] if matches else None

    def listing(self) -> list[dict[str, Any]]:
        return [
            e.summary()
            for e in sorted(
                self.by_key.values(), key=lambda e: (e.name, e.version, e.cid, e.announce.publisher)
            )
        ]

    # --- events ----------------------------------------------------------------------

    def publish_local(self, ann: TaskpackAnnounce) -> list[Command]:
        """Our own taskpack: already packed, signed and stored by the driver."""
        entry = self._new_entry(ann)
        entry.status = VERIFIED
        self._put(entry)
        return [
            Publish(TOPIC_TASKPACKS, ann),
            Log("info", f"published taskpack {entry.name}@{entry.version} {ann.ref.cid}"),
        ]

    def on_announce(self, sender: str, ann: TaskpackAnnounce) -> list[Command]:
        cid = ann.ref.cid
        known = self.by_key.get((cid, ann.publisher))
        if known is not None:
            # Known: a relay or re-announcement. Only the very announcement we verified
            # makes its sender a provider (a forged copy gets nothing from us).
            if (
                known.status == FETCHING
                and ann == known.announce
                and sender != self.me
                and sender not in known.providers
            ):
                known.providers.add(sender)
                return [AddProviders(cid, (sender,))]
            return []
        refusal = self._check_announcement(ann)
        if refusal is not None and refusal[0] == "bad-signature":
            return self._refuse_unsigned(sender, ann, *refusal)
        entry = self._new_entry(ann)
        if refusal is not None:
            self._put(entry)
            return self._reject(entry, *refusal)
        entry.providers = {ann.publisher} | ({sender} if sender != self.me else set())
        entry.providers.discard(self.me)
        return self._start(entry)

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
        anns = tuple(e.announce for e in self.by_key.values() if e.status == VERIFIED)[-_SYNC_MAX:]
        return [Send(peer, TaskpackSync(anns))] if anns else []

    def on_sync(self, sender: str, sync: TaskpackSync) -> list[Command]:
        out: list[Command] = []
        for ann in sync.announcements[:_SYNC_MAX]:
            out += self.on_announce(sender, ann)
        return out

    def on_blob_ready(self, cid: str) -> list[Command]:
        waiting = self._of(cid, FETCHING)
        if not waiting:
            return []
        for entry in waiting:
            entry.status = CHECKING
        self._refresh(cid)
        out = self._next_check(cid)
        if len(waiting[0].announce.ref.chunk_hashes) >= _SWARM_MIN_CHUNKS:
            # Every chunk and the whole cid are verified: serve it now, while the archive
            # check runs (a peer verifies whatever it gets from us anyway).
            out.append(Publish(TOPIC_TASKPACKS, TaskpackHave(cid)))
        return out

    def on_blob_failed(self, cid: str, reason: str) -> list[Command]:
        code = "hash-mismatch" if "mismatch" in reason else "fetch-failed"
        out: list[Command] = []
        for entry in self._of(cid, FETCHING):
            out += self._reject(entry, code, reason)
        return out

    def on_archive_checked(self, cid: str, refusal: str | None, detail: str) -> list[Command]:
        checked = self._checking.pop(cid, None)
        out: list[Command] = []
        for entry in self._of(cid, CHECKING):
            if checked is not None and _canonical(entry) != checked:
                continue  # another publisher's manifest for the same archive: checked next
            if refusal is not None:
                out += self._reject(entry, refusal, detail)
            else:
                entry.status = VERIFIED
                out.append(Log("info", f"taskpack {entry.name}@{entry.version} verified {cid}"))
        self._refresh(cid)
        return out + self._next_check(cid)

    # --- internals -------------------------------------------------------------------

    def _start(self, entry: TaskpackEntry) -> list[Command]:
        """A new announcement passed every check: fetch its archive, or join the fetch,
        check or verdict another publisher's announcement of the same archive has."""
        cid, ann = entry.cid, entry.announce
        self._put(entry)
        verified = self._of(cid, VERIFIED)
        if verified:
            # The archive is here and was checked against the manifest inside it.
            if _canonical(verified[0]) == _canonical(entry):
                entry.status = VERIFIED
                self._refresh(cid)
                return [Log("info", f"taskpack {entry.name}@{entry.version} verified {cid}")]
            return self._reject(
                entry, "manifest-mismatch", "the archive holds another publisher's manifest"
            )
        if self._of(cid, CHECKING):
            entry.status = CHECKING  # checked after the one in progress
            self._refresh(cid)
            return []
        providers = tuple(sorted(entry.providers))
        if len(self._of(cid, FETCHING)) > 1:  # a fetch of this archive is running
            return [AddProviders(cid, providers)] if providers else []
        return [
            FetchBlob(ann.ref, providers),
            Log("info", f"fetching taskpack {entry.name}@{entry.version} {cid}"),
        ]

    def _next_check(self, cid: str) -> list[Command]:
        """One CheckArchive per cid at a time (the driver answers by cid only)."""
        if cid in self._checking:
            return []
        pending = self._of(cid, CHECKING)
        if not pending:
            return []
        self._checking[cid] = _canonical(pending[0])
        return [CheckArchive(cid, pending[0].announce.manifest)]

    def _of(self, cid: str, status: str) -> list[TaskpackEntry]:
        return [e for (c, _p), e in self.by_key.items() if c == cid and e.status == status]

    def _put(self, entry: TaskpackEntry) -> None:
        self.by_key[(entry.cid, entry.announce.publisher)] = entry
        self._refresh(entry.cid)

    def _refresh(self, cid: str) -> None:
        """Recompute which entry answers for `cid` (stable: the first one of a rank)."""
        best = None
        for (c, _p), e in self.by_key.items():
            if c == cid and (best is None or _RANK[e.status] < _RANK[best.status]):
                best = e
        if best is None:
            self.entries.pop(cid, None)
        else:
            self.entries[cid] = best

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
            ann.ref,
            ann.sig,
            self.policy,
            self.capabilities,
            None,  # inputs are checked per task offer, not per taskpack
        )
        if refusal is None:
            return None
        return refusal.reason, refusal.detail

    def _refuse_unsigned(
        self, sender: str, ann: TaskpackAnnounce, reason: str, detail: str
    ) -> list[Command]:
        """A signature that does not verify: counted, logged, never recorded as an entry
        (it must not shadow the genuine announcement, which may come later)."""
        self.refusals.append(
            {"cid": ann.ref.cid[:128], "name": "?", "reason": reason, "detail": detail}
        )
        return [
            Log(
                "warning",
                f"ignored announcement of {ann.ref.cid[:80]} relayed by {sender[:64]}: "
                f"{reason} ({detail})",
            )
        ]

    def _reject(self, entry: TaskpackEntry, reason: str, detail: str) -> list[Command]:
        entry.status = REJECTED
        entry.reason = reason
        entry.detail = detail
        # Keep what `p2pfl taskpacks` shows, not the manifest and chunk hashes: any peer
        # can sign announcements, so rejected entries must stay small (and few).
        entry.announce = replace(
            entry.announce, manifest=b"", ref=replace(entry.announce.ref, chunk_hashes=())
        )
        entry.manifest = None
        entry.providers = set()
        key = (entry.cid, entry.announce.publisher)
        self._rejected.append(key)
        while len(self._rejected) > _MAX_REJECTED:
            old = self._rejected.popleft()
            gone = self.by_key.get(old)
            if gone is not None and gone.status == REJECTED:
                del self.by_key[old]
                self._refresh(old[0])
        self._refresh(entry.cid)
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


def _canonical(entry: TaskpackEntry) -> bytes:
    """The entry's manifest as the archive check compares it (canonical bytes)."""
    if entry.manifest is not None:
        return bytes(entry.manifest.canonical_bytes())
    return bytes(entry.announce.manifest)


def _check_bitmap(bitmap: bytes, n: int) -> None:
    """RemoteProtocolError unless `bitmap` is a chunk bitmap of `n` chunks (see
    TaskpackHave); the same rule as p2pfl.store.blobs.decode_bitmap, without the set."""
    if len(bitmap) != (n + 7) // 8:
        raise RemoteProtocolError(f"chunk bitmap of {len(bitmap)} bytes for {n} chunks")
    if n % 8 and bitmap[-1] & (0xFF >> (n % 8)):
        raise RemoteProtocolError("chunk bitmap has bits set past the last chunk")


def _version_matches(version: str, wanted: str) -> bool:
    """No range: any; an exact version; or a semver range (^1, ~1.2, >=1.0,<2)."""
    from p2pfl.core.versions import satisfies

    return not wanted or version == wanted or satisfies(version, wanted)
