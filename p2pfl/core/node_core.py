"""The whole protocol of one node, sans-IO: decode, authenticate, route, return commands.

`NodeCore.handle(event, now)` takes any event (network, timer, blob, job, aggregation)
and returns the commands the driver must carry out. A peer's bad bytes end here as a log
line (RemoteProtocolError); they never raise out of `handle`.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from p2pfl.core.commands import (
    Aggregated,
    ArchiveChecked,
    BlobFailed,
    BlobReady,
    Command,
    JobDone,
    JobFailed,
    Log,
    Publish,
    SetTimer,
    TimerFired,
)
from p2pfl.core.messages import (
    TOPIC_CAPABILITIES,
    TOPIC_TASKPACKS,
    TOPIC_TASKS,
    Capability,
    Decline,
    FinalPartial,
    GossipPush,
    Progress,
    Roster,
    RoundClose,
    RoundUpdate,
    TaskOffer,
    TaskpackAnnounce,
    TaskpackHave,
    TaskpackSync,
    TaskResult,
    Volunteer,
)
from p2pfl.core.task import TaskMachine, new_task_id
from p2pfl.core.task_state import LocalContext
from p2pfl.core.taskpacks import TaskpackBook
from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.identity import Identity
from p2pfl.net.base import FetchDone, FetchFailed, Message, PeerConnected, PeerDisconnected
from p2pfl.wire import Signed, decode, seal, unseal

# Which messages may arrive where, and whether they must be signed.
_SIGNED = (TaskOffer, Volunteer, Roster, TaskResult, Capability, Decline)
_ON_TOPIC: dict[str | None, tuple[type, ...]] = {
    TOPIC_TASKPACKS: (TaskpackAnnounce, TaskpackHave),
    TOPIC_CAPABILITIES: (Capability,),
    TOPIC_TASKS: (TaskOffer, Volunteer, Decline, Roster, RoundUpdate, RoundClose, TaskResult),
    None: (TaskpackSync, GossipPush, Progress, FinalPartial),
}
_PENDING_PER_TASK = 4096  # messages held for a task whose offer (or roster) is not here yet
# Messages that only make sense once the roster is known (held until then).
_AFTER_ROSTER = (RoundUpdate, RoundClose, GossipPush, Progress, FinalPartial)
_PENDING_TASKS = 256
REPUBLISH_S = 2.0  # our own announcements and offers go out once more after this


@dataclass
class DatasetInfo:
    name: str
    rows: int
    columns: list[str]
    type: str = "tabular"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "columns": self.columns, "rows": self.rows}


class NodeCore:
    def __init__(
        self,
        identity: Identity,
        *,
        policy: Any,
        capabilities: dict[str, Any],
        datasets: dict[str, DatasetInfo],
        min_records: int = 10,
        caps_interval_s: float | None = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.me = identity.peer_id
        self.capabilities = capabilities
        self.datasets = datasets
        self.caps_interval_s = caps_interval_s
        self.rng = rng or random.Random()
        self.book = TaskpackBook(self.me, policy, capabilities)
        self.tasks: dict[str, TaskMachine] = {}
        self.local = LocalContext({d.name: d.rows for d in datasets.values()}, min_records)
        self.connected: dict[str, tuple[str, ...]] = {}
        self.peer_caps: dict[str, Capability] = {}
        self._pending: dict[str, list[tuple[str, Any, str, Signed | None]]] = defaultdict(list)
        self.bad_messages = 0
        self.full_mesh = False  # set by the driver: connected to the whole network
        self._republish: dict[str, Publish] = {}  # records to publish once more (see _again_soon)

    # --- lifecycle -------------------------------------------------------------------

    def start(self, now: float) -> list[Command]:
        return self._publish_capability(now) if self.caps_interval_s else []

    def _publish_capability(self, now: float) -> list[Command]:
        assert self.caps_interval_s is not None
        caps = self.capabilities
        record = Capability(
            peer=self.me,
            cpus=int(caps.get("cpus", 1)),
            memory_bytes=int(caps.get("memory_bytes", 0)),
            disk_free_bytes=int(caps.get("disk_free_bytes", 0)),
            gpu=bool(caps.get("gpu", False)),
            python=str(caps.get("python", "")),
            torch=str(caps.get("torch", "")),
            datasets=[d.as_dict() for d in self.datasets.values()],
            issued=now,
            expires=now + 3 * self.caps_interval_s,
        )
        return [
            Publish(TOPIC_CAPABILITIES, seal(self.identity, record)),
            SetTimer(("capabilities",), now + self.caps_interval_s),
        ]

    # --- local requests ------------------------------------------------------------------

    def publish_taskpack(self, ann: TaskpackAnnounce, now: float) -> list[Command]:
        out = self.book.publish_local(ann)
        publish = next(c for c in out if isinstance(c, Publish))
        return out + self._again_soon(f"taskpack:{ann.ref.cid}", publish, now)

    def _again_soon(self, name: str, publish: Publish, now: float) -> list[Command]:
        """Publish our own record once more shortly: a peer that connected just before
        may not have told us its subscriptions yet, and would miss it (receivers drop
        duplicates)."""
        self._republish[name] = publish
        return [SetTimer(("republish", name), now + REPUBLISH_S)]

    def create_task(
        self, cid: str, params: dict[str, Any], federated: dict[str, Any], now: float
    ) -> tuple[str, list[Command]]:
        entry = self.book.verified(cid)
        if entry is None:
            raise LocalProtocolError(f"taskpack {cid} is not verified on this node")
        manifest = entry.manifest
        dp = federated.get("differential_privacy") or {}
        task_id = new_task_id(cid, params, self.me, self.rng)
        offer = TaskOffer(
            task_id=task_id,
            cid=cid,
            name=entry.name,
            version=entry.version,
            type=entry.type,
            publisher=self.me,
            params=params,
            protocol=str(federated.get("protocol", "fedavg")),
            aggregator=str(federated.get("aggregator", "fedavg")),
            rounds=int(federated.get("rounds", 1)) if entry.type == "training" else 1,
            min_nodes=int(federated.get("min_nodes", 1)),
            max_nodes=int(federated.get("max_nodes", 1000)),
            fanout=int(federated.get("fanout", 3)),
            mu=float(federated.get("mu", 0.0)),
            dp=(
                {
                    "epsilon": float(dp["epsilon"]),
                    "delta": float(dp.get("delta", 1e-5)),
                    "max_grad_norm": float(dp.get("max_grad_norm", 1.0)),
                }
                if dp.get("enabled")
                else None
            ),
            inputs=tuple(federated.get("inputs") or [i.name for i in manifest.spec.inputs]),
            created=now,
            volunteer_deadline=now + float(federated.get("volunteer_window_s", 3.0)),
            round_timeout_s=float(federated.get("deadline_s", 60.0)),
        )
        # Our own machine starts now; the offer's echo from gossip is then a duplicate.
        publish = Publish(TOPIC_TASKS, seal(self.identity, offer))
        again = self._again_soon(f"offer:{task_id}", publish, now)
        return task_id, [publish, *again, *self._on_offer(offer, now)]

    # --- events ------------------------------------------------------------------------

    def handle(self, event: Any, now: float) -> list[Command]:
        if isinstance(event, Message):
            return self._on_message(event, now)
        if isinstance(event, TimerFired):
            return self._on_timer(event.key, now)
        if isinstance(event, PeerConnected):
            self.connected[event.peer] = event.addrs
            out = []
            for machine in self.tasks.values():
                machine.connected = set(self.connected)
                machine.full_mesh = self.full_mesh
                out += machine.on_peer_back(now, event.peer)
            out += self.book.on_peer_connected(event.peer)
            if self.caps_interval_s:
                # A new peer missed our last record: re-publish soon (one timer, so a burst
                # of connections costs one message), once the gossip mesh includes it.
                out.append(SetTimer(("capabilities",), now + 1.0))
            return out
        if isinstance(event, PeerDisconnected):
            self.connected.pop(event.peer, None)
            out: list[Command] = []
            for machine in list(self.tasks.values()):
                machine.connected = set(self.connected)
                machine.full_mesh = self.full_mesh
                out += machine.on_peer_lost(now, event.peer)
            return out
        if isinstance(event, BlobReady | BlobFailed):
            ok = isinstance(event, BlobReady)
            reason = "" if ok else event.reason  # type: ignore[union-attr]
            out = (
                self.book.on_blob_ready(event.cid)
                if ok
                else self.book.on_blob_failed(event.cid, reason)
            )
            for machine in list(self.tasks.values()):
                out += machine.on_blob(now, event.cid, ok, reason)
            return out
        if isinstance(event, ArchiveChecked):
            out = self.book.on_archive_checked(event.cid, event.refusal, event.detail)
            entry = self.book.entries.get(event.cid)
            for machine in list(self.tasks.values()):
                if machine.offer.cid == event.cid and entry is not None:
                    out += machine.on_taskpack(now, entry.status, entry.reason)
            return out
        if isinstance(event, JobDone | JobFailed):
            machine = self.tasks.get(event.token[0])
            if machine is None:
                return []
            if isinstance(event, JobDone):
                return machine.on_job_done(now, event.token, event.result)
            return machine.on_job_failed(now, event.token, event.reason)
        if isinstance(event, Aggregated):
            machine = self.tasks.get(event.token[0])
            return (
                machine.on_aggregated(now, event.token, event.ref, event.reason) if machine else []
            )
        if isinstance(event, FetchDone | FetchFailed):
            raise LocalProtocolError("blob fetch events belong to the driver's fetcher")
        raise LocalProtocolError(f"unexpected event {type(event).__name__}")

    def _on_timer(self, key: tuple, now: float) -> list[Command]:
        if key[0] == "capabilities":
            self._expire_capabilities(now)
            return self._publish_capability(now)
        if key[0] == "republish":
            publish = self._republish.pop(key[1], None)
            return [publish] if publish is not None else []
        machine = self.tasks.get(key[1]) if len(key) > 1 else None
        return machine.on_timer(now, key) if machine else []

    def _expire_capabilities(self, now: float) -> None:
        for peer in [p for p, c in self.peer_caps.items() if c.expires < now]:
            del self.peer_caps[peer]

    # --- messages ----------------------------------------------------------------------

    def _on_message(self, event: Message, now: float) -> list[Command]:
        try:
            msg, signer, envelope = self._open(event)
        except RemoteProtocolError as exc:
            self.bad_messages += 1
            return [Log("warning", f"dropped message from {event.sender}: {exc}")]
        try:
            return self._dispatch(event.sender, msg, signer, envelope, now)
        except RemoteProtocolError as exc:
            self.bad_messages += 1
            return [Log("warning", f"dropped {type(msg).__name__} from {event.sender}: {exc}")]

    def _open(self, event: Message) -> tuple[Any, str, Signed | None]:
        """Decode, check the envelope's signature and the message's place."""
        msg, envelope = _decode_and_unseal(event.data)
        signer = envelope.signer if envelope is not None else event.sender
        if envelope is None and isinstance(msg, _SIGNED):
            raise RemoteProtocolError(f"{type(msg).__name__} must be signed")
        allowed = _ON_TOPIC.get(event.topic)
        if allowed is None or not isinstance(msg, allowed):
            raise RemoteProtocolError(
                f"{type(msg).__name__} is not allowed on {event.topic or 'direct'}"
            )
        # Whoever a record speaks for must be who signed or sent it.
        claimed = getattr(msg, "peer", None) or getattr(msg, "publisher", None)
        if isinstance(msg, Roster):
            claimed = msg.coordinator
        if isinstance(msg, TaskResult):
            claimed = signer
        if isinstance(msg, TaskpackAnnounce):
            claimed = None  # relayed by anyone; its own signature is checked by the book
        if claimed is not None and claimed != signer:
            raise RemoteProtocolError(
                f"{type(msg).__name__} claims {claimed} but comes from {signer}"
            )
        return msg, signer, envelope

    def _dispatch(
        self, sender: str, msg: Any, signer: str, envelope: Signed | None, now: float
    ) -> list[Command]:
        if isinstance(msg, TaskpackAnnounce):
            return self.book.on_announce(sender, msg)
        if isinstance(msg, TaskpackHave):
            return self.book.on_have(sender, msg)
        if isinstance(msg, TaskpackSync):
            return self.book.on_sync(sender, msg)
        if isinstance(msg, Capability):
            if msg.expires > now:
                self.peer_caps[msg.peer] = msg
            return []
        if isinstance(msg, TaskOffer):
            return self._on_offer(msg, now)
        machine = self.tasks.get(msg.task_id)
        if machine is None:
            pending = self._pending[msg.task_id]
            if len(self._pending) <= _PENDING_TASKS and len(pending) < _PENDING_PER_TASK:
                pending.append((sender, msg, signer, envelope))
            else:
                self._pending.pop(msg.task_id, None)
            return []
        return self._to_machine(machine, msg, signer, envelope, now)

    def _to_machine(
        self, machine: TaskMachine, msg: Any, signer: str, envelope: Signed | None, now: float
    ) -> list[Command]:
        if isinstance(msg, Volunteer):
            assert envelope is not None  # Volunteer is in _SIGNED: _open guarantees it
            return machine.on_volunteer(now, msg, envelope)
        if isinstance(msg, Decline):
            return machine.on_decline(now, msg)
        if machine.roster is None and isinstance(msg, _AFTER_ROSTER):
            if len(machine.early) < _PENDING_PER_TASK:
                machine.early.append((msg, signer))
            return []
        if isinstance(msg, Roster):
            vols = list(_roster_volunteers(msg.task_id, msg.volunteers))
            out = machine.on_roster(now, msg, signer, vols)
            if machine.roster is not None and machine.early:
                early, machine.early = machine.early, []
                for held, held_signer in early:
                    out += self._to_machine(machine, held, held_signer, None, now)
            return out
        if isinstance(msg, RoundUpdate):
            return machine.on_update(now, msg)
        if isinstance(msg, RoundClose):
            return machine.on_close(now, msg)
        if isinstance(msg, GossipPush):
            return machine.on_push(now, msg)
        if isinstance(msg, Progress):
            return machine.on_progress(now, msg)
        if isinstance(msg, FinalPartial):
            return machine.on_partial(now, msg)
        if isinstance(msg, TaskResult):
            return machine.on_result(now, msg, signer)
        return []

    def _on_offer(self, offer: TaskOffer, now: float) -> list[Command]:
        if offer.task_id in self.tasks:
            return []
        if (
            not 1 <= offer.min_nodes <= offer.max_nodes
            or offer.rounds < 1
            or offer.rounds > 100_000
        ):
            raise RemoteProtocolError(f"offer {offer.task_id}: inconsistent node counts or rounds")
        machine = TaskMachine(offer, self.identity, self.local, created_at=now)
        machine.connected = set(self.connected)
        machine.full_mesh = self.full_mesh
        self.tasks[offer.task_id] = machine
        entry = self.book.entries.get(offer.cid)
        out = machine.start(now, entry.status if entry else None, entry.reason if entry else "")
        for _sender, msg, signer, envelope in self._pending.pop(offer.task_id, []):
            out += self._to_machine(machine, msg, signer, envelope, now)
        return out

    # --- views --------------------------------------------------------------------------

    def peers_view(self) -> list[dict[str, Any]]:
        out = []
        for peer, addrs in sorted(self.connected.items()):
            cap = self.peer_caps.get(peer)
            out.append(
                {
                    "peer_id": peer,
                    "addrs": list(addrs),
                    "capabilities": _cap_dict(cap) if cap else None,
                }
            )
        return out


@functools.lru_cache(maxsize=4096)
def _decode_and_unseal(data: bytes) -> tuple[Any, Signed | None]:
    """Decode (and, for an envelope, verify and open) a message's bytes.

    A pure function of the bytes, so it is memoised: gossip hands the same bytes to every
    node, and a thousand simulated nodes then share one decoded, immutable message.
    Errors (RemoteProtocolError) are not cached: they propagate each time."""
    msg = decode(data)
    if isinstance(msg, Signed):
        return unseal(msg), msg
    return msg, None


@functools.lru_cache(maxsize=64)
def _roster_volunteers(task_id: str, volunteers: tuple[bytes, ...]) -> tuple[str, ...]:
    """The peers whose own signed volunteer records a roster carries (each checked).

    Memoised like `_decode_and_unseal`: every node checks the same roster."""
    peers = []
    for raw in volunteers:
        signed = decode(raw, expected=Signed)
        vol = unseal(signed, expected=Volunteer)
        if vol.peer != signed.signer or vol.task_id != task_id:
            raise RemoteProtocolError("roster carries a volunteer record for someone else")
        peers.append(vol.peer)
    return tuple(peers)


def _cap_dict(cap: Capability) -> dict[str, Any]:
    return {
        "cpus": cap.cpus,
        "memory_bytes": cap.memory_bytes,
        "disk_free_bytes": cap.disk_free_bytes,
        "gpu": cap.gpu,
        "python": cap.python,
        "torch": cap.torch,
        "datasets": cap.datasets,
        "expires": cap.expires,
    }
