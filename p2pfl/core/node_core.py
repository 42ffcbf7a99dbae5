"""The whole protocol of one node, sans-IO: decode, authenticate, route, return commands.

`NodeCore.handle(event, now)` takes any event (network, timer, blob, job, aggregation)
and returns the commands the driver must carry out. A peer's bad bytes end here as a log
line (RemoteProtocolError); they never raise out of `handle`.
"""

from __future__ import annotations

import collections
import functools
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pfl.core.commands import (
    Aggregated,
    ArchiveChecked,
    BlobFailed,
    BlobReady,
    ChargePrivacy,
    Command,
    JobDone,
    JobFailed,
    Log,
    Publish,
    SetTimer,
    SliceWorked,
    TimerFired,
)
from p2pfl.core.election import commitment
from p2pfl.core.messages import (
    NONCE_BYTES,
    TOPIC_CAPABILITIES,
    TOPIC_TASKPACKS,
    TOPIC_TASKS,
    CallPart,
    Cancel,
    Capability,
    Decline,
    FinalPartial,
    GossipPush,
    Progress,
    Reveal,
    Roster,
    RoundClose,
    RoundUpdate,
    TaskOffer,
    TaskpackAnnounce,
    TaskpackHave,
    TaskpackSync,
    TaskResult,
    UpdateAsk,
    Volunteer,
    check_task_id,
)
from p2pfl.core.offer import build_offer, offer_problem
from p2pfl.core.phase import (
    ACCEPTS,
    BlobOutcome,
    PeerBack,
    PeerLost,
    Phase,
    PolicyRevoked,
    TaskpackState,
)
from p2pfl.core.round_messages import (
    GroupDone,
    SketchProof,
    SliceAsk,
    SliceDone,
    SliceOffer,
    SliceSketch,
    StageAsk,
)
from p2pfl.core.snapshot import open_snapshot
from p2pfl.core.task import Incoming, LocalContext, TaskMachine
from p2pfl.core.taskpacks import TaskpackBook
from p2pfl.core.tokens import NodeTimer, NodeTimerKind, TaskTimer
from p2pfl.core.versions import Arm, manifest_problem, schema_problem
from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.identity import Identity
from p2pfl.limits import (
    DECODE_CACHE_MAX_MESSAGE,
    LOG_EVERY_S,
    MAX_OFFER_BYTES,
    PENDING_BYTES,
)
from p2pfl.net.base import FetchDone, FetchFailed, Message, PeerConnected, PeerDisconnected
from p2pfl.wire import Signed, decode, seal, unseal

if TYPE_CHECKING:
    from p2pfl.policy import SitePolicy

# Which messages may arrive where, and whether they must be signed.
_SIGNED = (
    TaskOffer,
    Volunteer,
    Reveal,
    Roster,
    CallPart,
    TaskResult,
    Capability,
    Decline,
    Cancel,
    SliceSketch,
)
_ON_TOPIC: dict[str | None, tuple[type, ...]] = {
    TOPIC_TASKPACKS: (TaskpackAnnounce, TaskpackHave),
    TOPIC_CAPABILITIES: (Capability,),
    TOPIC_TASKS: (
        TaskOffer,
        Volunteer,
        Reveal,
        Decline,
        Roster,
        CallPart,
        RoundUpdate,
        RoundClose,
        SliceDone,
        SliceSketch,
        SketchProof,
        GroupDone,
        TaskResult,
        Cancel,
    ),
    # A result also comes directly: to a peer that reconnects after the task ended.
    # A large task's volunteer records go to its publisher only (core/call.py).
    None: (
        TaskpackSync,
        GossipPush,
        Progress,
        FinalPartial,
        TaskResult,
        Volunteer,
        Decline,
        # A round's messages, sent directly when every participant is a connection away
        # (TaskMachine.to_participants): updates and closes, reduce-scatter's stages.
        RoundUpdate,
        RoundClose,
        UpdateAsk,
        SliceDone,
        SliceSketch,
        StageAsk,
        SliceOffer,
        SliceAsk,
    ),
}
_PENDING_TASKS = 256
MAX_TASKS_PER_PUBLISHER = 16  # unfinished tasks one publisher may have on this node
# Phases in which a task holds a dataset (the policy's concurrent_tasks limit).
_BUSY = frozenset(
    {
        Phase.VALIDATING,
        Phase.VOLUNTEERED,
        Phase.INIT,
        Phase.TRAINING,
        Phase.AGGREGATING,
        Phase.EVALUATING,
        Phase.FINALIZING,
        Phase.REDUCING,
    }
)
_FORGOTTEN_MAX = 4096  # expired task ids remembered, so a replayed offer stays dead
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
        site: SitePolicy | None = None,
        privacy_spent: dict[str, float] | None = None,
    ) -> None:
        self.identity = identity
        self.me = identity.peer_id
        self.capabilities = capabilities
        self.datasets = datasets
        self.caps_interval_s = caps_interval_s
        # Nonces come from here: a real node passes random.SystemRandom (the OS CSPRNG).
        self.rng = rng or random.SystemRandom()
        self.book = TaskpackBook(self.me, policy, capabilities)
        self.tasks: dict[str, TaskMachine] = {}
        self._forgotten: dict[str, None] = {}  # expired offers (insertion-ordered, bounded)
        self.local = LocalContext(
            {d.name: d.rows for d in datasets.values()},
            min_records,
            labels=capabilities.get("labels"),
        )
        self.connected: dict[str, tuple[str, ...]] = {}
        self.peer_caps: dict[str, Capability] = {}
        self._pending: dict[str, list[tuple[str, Incoming]]] = defaultdict(list)
        self.bad_messages = 0
        self.bad_by_peer: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}  # peer -> when we last logged its bad input
        self._pending_bytes = 0
        self.full_mesh = False  # set by the driver: connected to the whole network
        self._republish: dict[str, Publish] = {}  # records to publish once more (see _again_soon)
        # The site's policy (None: a simulation, where the researcher chose every node's
        # code and data) and the lifetime DP spend per dataset (the node loads its ledger;
        # ChargePrivacy commands keep this copy current, so decisions see every commitment).
        self.site = site
        self.privacy_spent: dict[str, float] = dict(privacy_spent or {})
        # Runs and records used per requester and taskpack (the node's UsageLedger; None: no
        # usage caps are counted), judged at the time of the last event (`_now`).
        self.usage: Any = None
        self._now = 0.0

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
            datasets=[self._advertised(d) for d in self.datasets.values()],
            issued=now,
            expires=now + 3 * self.caps_interval_s,
        )
        return [
            Publish(TOPIC_CAPABILITIES, seal(self.identity, record)),
            SetTimer(NodeTimer(NodeTimerKind.CAPABILITIES), now + self.caps_interval_s),
        ]

    def _advertised(self, info: DatasetInfo) -> dict[str, Any]:
        """A dataset as the capability record shows it: the row count exact, coarse
        (tens) or hidden, as the policy says (below k it never shows)."""
        out = info.as_dict()
        if self.site is not None:
            out["rows"] = self.site.advertised_rows(info.name, info.rows)
        return out

    def set_site(self, site: SitePolicy, now: float) -> list[Command]:
        """A new site policy: decisions from now on follow it, and every task this node
        takes part in is checked again; one the new policy refuses is left (withdrawn,
        with the rule), so nothing more of its data leaves."""
        self.site = site
        out: list[Command] = []
        for machine in list(self.tasks.values()):
            entry = self.book.entries.get(machine.cid)
            if machine.decision is None or entry is None or entry.manifest is None:
                continue
            if machine.result is not None or machine.phase not in _BUSY:
                continue
            # This task's own charge is not "spent elsewhere": take it out before deciding.
            spent = dict(self.privacy_spent)
            dp = machine.offer.dp
            if isinstance(dp, dict) and machine.phase is not Phase.VALIDATING:
                for name in machine.offer.inputs:
                    spent[name] = max(0.0, spent.get(name, 0.0) - float(dp["epsilon"]))
            decision = self._decide(machine.offer, entry, spent)
            if not decision.allowed:
                why = f"the site policy changed: {decision.reason}"
                out += self._run(machine, PolicyRevoked(why), now)
        return out

    def _state_of(self, machine: TaskMachine, entry: Any) -> TaskpackState:
        """The taskpack's status for a task, with the site policy's decision once it is
        verified here (made before any of its code runs)."""
        if entry is None:
            return TaskpackState(None)
        if entry.status == "verified" and entry.manifest is not None:
            # What the offer says of the archive we would run (name, version, model schema)
            # is checked against its signed manifest before anything else.
            wrong = manifest_problem(machine.offer, self.me, entry.manifest)
            if wrong is not None:
                return TaskpackState("mismatch", f"does not match the offer: {wrong}")
        decision = None
        if entry.status == "verified" and self.site is not None and entry.manifest is not None:
            decision = self._decide(machine.offer, entry)
        return TaskpackState(entry.status, entry.reason, decision)

    def _decide(self, offer: TaskOffer, entry: Any, spent: dict[str, float] | None = None) -> Any:
        from p2pfl.policy import OfferFacts

        assert self.site is not None
        spec = entry.manifest.spec
        dp = offer.dp if isinstance(offer.dp, dict) else None
        facts = OfferFacts(
            requester=offer.publisher,
            datasets=self.local.policy_datasets(offer),
            taskpack_publisher=entry.announce.publisher,
            taskpack_name=entry.name,
            taskpack_version=entry.version,
            type=offer.type,
            rounds=offer.rounds,
            protocol=offer.protocol,
            aggregator=offer.aggregator,
            dp_epsilon=float(dp["epsilon"]) if dp else None,
            dp_delta=float(dp["delta"]) if dp else None,
            manifest_dp_required=bool(spec.federated.differential_privacy.enabled),
            manifest_type=spec.type,
            manifest_aggregator=spec.federated.aggregator,
            manifest_protocol=spec.federated.protocol,
            params=dict(offer.params) if isinstance(offer.params, dict) else {},
            records=self._records_asked(offer),
        )
        running: dict[str, int] = defaultdict(int)
        for other in self.tasks.values():
            if other.offer.task_id != offer.task_id and other.phase in _BUSY:
                for name in other.offer.inputs:
                    running[name] += 1
        spent = self.privacy_spent if spent is None else spent
        usage = None
        if self.usage is not None:
            usage = self.usage.counts(self._now, exclude_task=offer.task_id)
        return self.site.decide(facts, spent=spent, running=running, usage=usage)

    def _records_asked(self, offer: TaskOffer) -> dict[str, int]:
        """Records the offer would process per dataset: a test run's N at most."""
        run = offer.run if isinstance(offer.run, dict) else {}
        # Only a batched (inference) task runs on at most N records; any other type reads
        # all its rows whatever its offer says, and is counted so.
        cap = run.get("test_run") if offer.type == "inference" else None
        out = {}
        for name in offer.inputs:
            rows = int(self.local.datasets.get(name, 0))
            out[name] = min(rows, int(cap)) if isinstance(cap, int) else rows
        return out

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
        return [SetTimer(NodeTimer(NodeTimerKind.REPUBLISH, name), now + REPUBLISH_S)]

    def create_task(
        self,
        cid: str,
        params: dict[str, Any],
        federated: dict[str, Any],
        inputs: tuple[str, ...],
        now: float,
        volunteer_window_s: float = 3.0,
        range: str = "",
        rollout: tuple[Arm, ...] = (),
        flow: Any = None,  # a flow's step: (FlowRecord, step index, model BlobRef | None)
        run: dict[str, Any] | None = None,
    ) -> tuple[str, list[Command]]:
        """Offer a task on a taskpack verified here (ours or another publisher's): the
        offer is signed by us, the requester. `range`: the version range asked for (the
        cid is its resolution); `rollout`: the arms of a partial rollout, the first being
        `cid` (core/versions.py; build them with `rollout_arms`)."""
        entry = self.book.verified(cid)
        if entry is None:
            raise LocalProtocolError(f"taskpack {cid} is not verified on this node")
        offer = build_offer(
            cid=cid,
            name=entry.name,
            version=entry.version,
            type=entry.type,
            publisher=self.me,
            params=params,
            federated=federated,
            inputs=inputs,
            now=now,
            nonce=self.rng.randbytes(NONCE_BYTES),
            volunteer_window_s=volunteer_window_s,
            range=range,
            rollout=rollout,
            **({"flow": flow[0], "step": flow[1], "model": flow[2]} if flow else {}),
            run=run,
        )
        # Refused here with the reason receivers would give (a training rollout that
        # mixes model schemas is refused by the nodes of the other schema).
        schemas = (schema_problem(offer, arm) for arm in rollout)
        problem = offer_problem(offer) or next((p for p in schemas if p), None)
        if problem is not None:
            raise LocalProtocolError(f"cannot offer {entry.name}: {problem}")
        # Our own machine starts now; the offer's echo from gossip is then a duplicate.
        envelope = seal(self.identity, offer)
        publish = Publish(TOPIC_TASKS, envelope)
        again = self._again_soon(f"offer:{offer.task_id}", publish, now)
        return offer.task_id, [publish, *again, *self._on_offer(offer, now, envelope)]

    def cancel(self, task_id: str, reason: str, now: float) -> list[Command]:
        """End a task we published, for every participant."""
        machine = self.tasks.get(task_id)
        if machine is None:
            raise KeyError(task_id)
        if machine.offer.publisher != self.me:
            raise LocalProtocolError(
                f"task {task_id} was published by {machine.offer.publisher}; only its publisher can cancel it"
            )
        if machine.result is not None:
            raise LocalProtocolError(f"task {task_id} already ended ({machine.result.status})")
        envelope = seal(self.identity, Cancel(task_id, self.me, reason[:2000]))
        incoming = Incoming(unseal(envelope), self.me, envelope)
        return [Publish(TOPIC_TASKS, envelope), *self._run(machine, incoming, now)]

    def withdraw(self, task_id: str, now: float) -> list[Command]:
        """Take this node out of a task (the others go on without it)."""
        machine = self.tasks.get(task_id)
        if machine is None:
            raise KeyError(task_id)
        if machine.result is not None:
            raise LocalProtocolError(f"task {task_id} already ended ({machine.result.status})")
        if not machine.participating:
            raise LocalProtocolError(f"this node does not take part in task {task_id}")
        return machine.withdraw(now, "withdrawn by this node's operator")

    def resume(self, data: bytes, now: float) -> list[Command]:
        """Rejoin a task from its snapshot after a restart (signatures re-checked);
        RemoteProtocolError for a damaged file."""
        snap, offer_env, offer, roster_env, roster = open_snapshot(data)
        if offer.task_id in self.tasks:
            return []
        _nonces, samples = _roster_carried(offer.task_id, roster.volunteers, roster.nonces)
        machine = TaskMachine(offer, self.identity, self.local, now, self.rng)
        if roster.call:
            parts = []
            for raw in snap.call:
                env = decode(raw, expected=Signed)
                parts.append((unseal(env, expected=CallPart), env))
            roster = machine.resume_call(parts, roster)
        machine.offer_envelope, machine.roster_envelope = offer_env, roster_env
        machine.connected = set(self.connected)
        self.tasks[offer.task_id] = machine
        return machine.resume(now, roster, samples, snap.round, snap.model, snap.mass)

    def may_serve(self, peer: str, cid: str) -> bool:
        """Whether a blob we hold may go to `peer` (asked by the network before it serves
        any byte). Taskpack archives go to anyone: they are signed, public code. A task's
        updates, shares, models and partials go only to that task's roster members (its
        result's model also to the task's publisher). A blob no task claims goes to nobody."""
        if cid in self.book.entries:
            return True
        # An earlier step's result model goes to the roster of a later step that evaluates
        # it, when both tasks have the same requester (who may fetch that result anyway).
        owners = {
            m.offer.publisher
            for m in self.tasks.values()
            if m.result is not None and m.result.model is not None and m.result.model.cid == cid
        }
        for machine in self.tasks.values():
            model = machine.offer.model
            if (
                model is not None
                and model.cid == cid
                and machine.offer.publisher in owners
                and peer in machine.participants
            ):
                return True
        for machine in self.tasks.values():
            if machine.holds_blob(cid):
                return machine.may_fetch(peer, cid)
        return False

    def policy_decision(self, task_id: str) -> dict[str, Any] | None:
        """The site policy's decision for a task this node has seen (None: not seen, or
        not decided yet: its taskpack is not verified here)."""
        machine = self.tasks.get(task_id)
        if machine is None or machine.decision is None:
            return None
        return {"task_id": task_id, **machine.decision.as_dict()}

    # --- events ------------------------------------------------------------------------

    def handle(self, event: Any, now: float) -> list[Command]:
        self._now = now
        if isinstance(event, Message):
            return self._on_message(event, now)
        if isinstance(event, TimerFired):
            return self._on_timer(event, now)
        if isinstance(event, PeerConnected):
            self.connected[event.peer] = event.addrs
            out = self._to_all(PeerBack(event.peer), now)
            out += self.book.on_peer_connected(event.peer)
            if self.caps_interval_s:
                # A new peer missed our last record: re-publish soon (one timer, so a burst
                # of connections costs one message), once the gossip mesh includes it.
                out.append(SetTimer(NodeTimer(NodeTimerKind.CAPABILITIES), now + 1.0))
            return out
        if isinstance(event, PeerDisconnected):
            self.connected.pop(event.peer, None)
            return self._to_all(PeerLost(event.peer), now)
        if isinstance(event, BlobReady | BlobFailed):
            ok = isinstance(event, BlobReady)
            reason = event.reason if isinstance(event, BlobFailed) else ""
            out = (
                self.book.on_blob_ready(event.cid)
                if ok
                else self.book.on_blob_failed(event.cid, reason)
            )
            return out + self._to_all(BlobOutcome(event.cid, ok, reason), now)
        if isinstance(event, ArchiveChecked):
            out = self.book.on_archive_checked(event.cid, event.refusal, event.detail)
            entry = self.book.entries.get(event.cid)
            if entry is not None:
                for machine in list(self.tasks.values()):
                    if machine.cid == event.cid and machine.phase is Phase.PENDING:
                        out += self._run(machine, self._state_of(machine, entry), now)
            return out
        if isinstance(event, JobDone | JobFailed | Aggregated | SliceWorked):
            owner = self.tasks.get(event.token.task_id)
            return self._run(owner, event, now) if owner is not None else []
        if isinstance(event, FetchDone | FetchFailed):
            raise LocalProtocolError("blob fetch events belong to the driver's fetcher")
        raise LocalProtocolError(f"unexpected event {type(event).__name__}")

    def _run(self, machine: TaskMachine, event: Any, now: float) -> list[Command]:
        """One event into one machine; a machine whose offer expired is forgotten."""
        machine.full_mesh = self.full_mesh
        if isinstance(event, PeerBack | PeerLost):
            machine.connected = set(self.connected)  # only connections change it
        out = machine.handle(event, now)
        for cmd in out:
            if type(cmd) is ChargePrivacy:
                for name in cmd.datasets:
                    self.privacy_spent[name] = self.privacy_spent.get(name, 0.0) + cmd.epsilon
        if machine.phase is Phase.EXPIRED:
            self.tasks.pop(machine.task_id, None)
            self._forgotten[machine.task_id] = None
            while len(self._forgotten) > _FORGOTTEN_MAX:
                self._forgotten.pop(next(iter(self._forgotten)))
        return out

    def _to_all(self, event: Any, now: float) -> list[Command]:
        """A node-wide event to every task that takes it in its phase (a blob outcome is
        for the tasks that fetch; a lost peer for everyone still following)."""
        out: list[Command] = []
        key = type(event)
        for machine in list(self.tasks.values()):
            if key in ACCEPTS[machine.phase]:
                out += self._run(machine, event, now)
        return out

    def _on_timer(self, event: TimerFired, now: float) -> list[Command]:
        key = event.key
        if isinstance(key, NodeTimer):
            if key.kind is NodeTimerKind.CAPABILITIES:
                self._expire_capabilities(now)
                return self._publish_capability(now) if self.caps_interval_s else []
            publish = self._republish.pop(key.name, None)
            return [publish] if publish is not None else []
        assert isinstance(key, TaskTimer)
        target = self.tasks.get(key.task_id)
        return self._run(target, event, now) if target is not None else []

    def _expire_capabilities(self, now: float) -> None:
        for peer in [p for p, c in self.peer_caps.items() if c.expires < now]:
            del self.peer_caps[peer]

    # --- messages ----------------------------------------------------------------------

    def _on_message(self, event: Message, now: float) -> list[Command]:
        try:
            msg, signer, envelope = self._open(event)
        except RemoteProtocolError as exc:
            return self._dropped(event.sender, f"dropped message from {event.sender}: {exc}", now)
        try:
            return self._dispatch(event.sender, msg, signer, envelope, now, len(event.data))
        except RemoteProtocolError as exc:
            what = f"dropped {type(msg).__name__} from {event.sender}: {exc}"
            return self._dropped(event.sender, what, now)

    def _dropped(self, peer: str, text: str, now: float) -> list[Command]:
        """Count a peer's bad message; log at most one line per peer every LOG_EVERY_S (a
        flood of junk must not become a flood of log lines)."""
        self.bad_messages += 1
        self.bad_by_peer[peer] = self.bad_by_peer.get(peer, 0) + 1
        last = self._logged_at.get(peer)
        if last is not None and now - last < LOG_EVERY_S:
            return []
        self._logged_at[peer] = now
        while len(self._logged_at) > _FORGOTTEN_MAX:
            self._logged_at.pop(next(iter(self._logged_at)))
        return [Log("warning", f"{text} ({self.bad_by_peer[peer]} bad from this peer so far)")]

    def _open(self, event: Message) -> tuple[Any, str, Signed | None]:
        """Decode, check the envelope's signature and the message's place."""
        data = event.data
        if len(data) <= DECODE_CACHE_MAX_MESSAGE:
            msg, envelope = _decode_and_unseal(data)
        else:
            msg, envelope = _decode_large(data)
        if isinstance(msg, TaskOffer) and len(data) > MAX_OFFER_BYTES:
            raise RemoteProtocolError(f"offer of {len(data)} bytes, over {MAX_OFFER_BYTES}")
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
        self,
        sender: str,
        msg: Any,
        signer: str,
        envelope: Signed | None,
        now: float,
        size: int = 0,
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
            return self._on_offer(msg, now, envelope)
        check_task_id(msg.task_id)
        incoming = Incoming(msg, signer, envelope, size=size)
        if isinstance(msg, Roster):
            incoming.carried, incoming.samples = _roster_carried(
                msg.task_id, msg.volunteers, msg.nonces
            )
        machine = self.tasks.get(msg.task_id)
        if machine is None:
            if msg.task_id in self._forgotten:
                return []
            # Held (bounded in bytes) until the offer arrives: gossip may reorder them.
            if self._pending_bytes + size > PENDING_BYTES or (
                msg.task_id not in self._pending and len(self._pending) >= _PENDING_TASKS
            ):
                return self._dropped(
                    sender, f"no room to hold a message for unknown task {msg.task_id[:12]}", now
                )
            self._pending[msg.task_id].append((sender, incoming))
            self._pending_bytes += size
            return []
        return self._run(machine, incoming, now)

    def _on_offer(self, offer: TaskOffer, now: float, envelope: Signed | None) -> list[Command]:
        if offer.task_id in self.tasks or offer.task_id in self._forgotten:
            return []
        problem = offer_problem(offer)
        if problem is not None:
            raise RemoteProtocolError(f"offer {offer.task_id[:12]}: {problem}")
        mine = sum(
            1
            for m in self.tasks.values()
            if m.offer.publisher == offer.publisher and m.result is None
        )
        if offer.publisher != self.me and mine >= MAX_TASKS_PER_PUBLISHER:
            raise RemoteProtocolError(
                f"offer {offer.task_id[:12]}: {offer.publisher} already has {mine} unfinished tasks here"
            )
        machine = TaskMachine(offer, self.identity, self.local, now, self.rng)
        machine.offer_envelope = envelope
        machine.connected = set(self.connected)
        machine.full_mesh = self.full_mesh
        self.tasks[offer.task_id] = machine
        out = machine.start(now, self._state_of(machine, self.book.entries.get(machine.cid)))
        for _sender, incoming in self._pending.pop(offer.task_id, []):
            self._pending_bytes -= incoming.size
            out += self._run(machine, incoming, now)
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


# Large rosters and call parts memoised (a 1,000-node roster is ~300 KB, held by every
# node; a 10,000-node call is ~9 parts of ~380 KB): at most 64 of them, ~25 MB.
_LARGE_KEEP = 64
_large: collections.OrderedDict[bytes, tuple[Any, Signed | None]] = collections.OrderedDict()


def _decode_large(data: bytes) -> tuple[Any, Signed | None]:
    """A large message is decoded every time (a flood of big messages must not pin them
    in a cache), except rosters: every node of a big task holds the same one, so the last
    few are shared (bounded: at most _LARGE_KEEP of them)."""
    hit = _large.get(data)
    if hit is not None:
        _large.move_to_end(data)
        return hit
    decoded = _decode_and_unseal.__wrapped__(data)
    if isinstance(decoded[0], Roster | CallPart):
        _large[data] = decoded
        while len(_large) > _LARGE_KEEP:
            _large.popitem(last=False)
    return decoded


@functools.lru_cache(maxsize=64)
def _roster_carried(
    task_id: str, volunteers: tuple[bytes, ...], nonces: tuple[bytes, ...]
) -> tuple[dict[str, bytes], dict[str, int]]:
    """(peer -> revealed nonce, peer -> signed sample count) of every volunteer whose own
    signed record a roster carries, each signature checked and each nonce checked against
    the commitment in its record.

    Memoised like `_decode_and_unseal`: every node checks the same roster."""
    carried: dict[str, bytes] = {}
    samples: dict[str, int] = {}
    for raw, nonce in zip(volunteers, nonces, strict=True):
        signed = decode(raw, expected=Signed)
        vol = unseal(signed, expected=Volunteer)
        if vol.peer != signed.signer or vol.task_id != task_id:
            raise RemoteProtocolError("roster carries a volunteer record for someone else")
        if vol.peer in carried:
            raise RemoteProtocolError(f"roster carries {vol.peer} twice")
        if commitment(nonce) != vol.commit:
            raise RemoteProtocolError(
                f"roster carries a nonce of {vol.peer} that its record does not commit to"
            )
        carried[vol.peer] = nonce
        samples[vol.peer] = vol.num_samples
    return carried, samples


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
