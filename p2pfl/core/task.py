"""One task as seen by one node: offer -> volunteer -> reveal -> roster -> rounds -> result.

A `TaskMachine` takes events (messages, job outcomes, blobs, timers, peers lost) with the
current time and returns commands; it never performs I/O. One instance exists per task a
node has heard of, whatever its part: publisher, participant, coordinator, reducer or a
mere observer. `handle` routes every event through one table (core/phase.py); the rounds
(`FedAvgRounds` or `PushSumRounds`) and the final step (`FinalStep`) are parts with their
own state, composed here.

Roles are checked by rule, by every node (core/election.py): a roster must follow the
rank rule; a round close, a failure and a result count only from the participant whose
duty it is in this node's view (the first live one in rank order); one from a lower-ranked
participant is held until this node's own deadlines have passed the ones above it.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from p2pfl.core.aggregation import aggregation
from p2pfl.core.call import (
    MAX_SKIPPED,
    CallView,
    call_order,
    call_roster_problem,
    call_view,
    check_part,
    committee_seed,
    signed_total,
    split_records,
    uses_call,
    with_participants,
)
from p2pfl.core.commands import (
    Aggregated,
    Audit,
    CancelTimer,
    ChargePrivacy,
    Command,
    Emit,
    EventKind,
    FetchBlob,
    JobDone,
    JobFailed,
    Log,
    Persist,
    Publish,
    RunJob,
    Send,
    SetTimer,
    SliceWorked,
    TaskEnded,
    TaskEvent,
    TimerFired,
)
from p2pfl.core.election import (
    beacon as make_beacon,
    commitment,
    first_live,
    ranked,
    roster_problem,
)
from p2pfl.core.fedavg_rounds import FedAvgRounds
from p2pfl.core.final import FinalStep
from p2pfl.core.flowrec import flow_id_of
from p2pfl.core.messages import (
    NONCE_BYTES,
    TOPIC_TASKS,
    CallPart,
    Cancel,
    Decline,
    FinalPartial,
    GossipPush,
    Progress,
    Reveal,
    Roster,
    RoundClose,
    RoundUpdate,
    TaskOffer,
    TaskResult,
    UpdateAsk,
    Volunteer,
)
from p2pfl.core.phase import (
    ACCEPTS,
    ACTIVE,
    TERMINAL,
    AggregatedKey,
    BlobOutcome,
    EventKey,
    PeerBack,
    PeerLost,
    Phase,
    PolicyRevoked,
    TaskpackState,
)
from p2pfl.core.pushsum_rounds import PushSumRounds
from p2pfl.core.round_messages import (
    GroupDone,
    SketchProof,
    SliceAsk,
    SliceDone,
    SliceOffer,
    SliceSketch,
    StageAsk,
)
from p2pfl.core.snapshot import make_snapshot
from p2pfl.core.tokens import JobStep, JobToken, TaskTimer, TimerKind
from p2pfl.core.versions import my_cid, roster_rollout_problem, volunteer_problem
from p2pfl.core.view import NodeState, result_dict, withdrew_summary
from p2pfl.errors import RemoteProtocolError
from p2pfl.identity import Identity
from p2pfl.limits import EARLY_BYTES_PER_TASK
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed, encode, seal

GRACE_S = 2.0  # per rank position, before the next in line takes over a silent duty
EXPIRE_AFTER_S = 60.0  # an offer without a roster is forgotten this long after its deadline
MAX_HELD = 64  # messages held for later per task (early round messages, premature duties)


class Incoming:
    """A wire message for this task, with who signed (or sent) it."""

    __slots__ = ("carried", "envelope", "msg", "samples", "signer", "size")

    def __init__(
        self,
        msg: Any,
        signer: str,
        envelope: Signed | None = None,
        carried: dict[str, bytes] | None = None,
        samples: dict[str, int] | None = None,
        size: int = 0,
    ) -> None:
        self.msg, self.signer, self.envelope = msg, signer, envelope
        self.size = size  # bytes on the wire (what holding it costs)
        # Rosters: peer -> revealed nonce, and peer -> signed sample count, of each
        # volunteer record + reveal the roster carries.
        self.carried = carried or {}
        self.samples = samples or {}


class LocalContext:
    """What the owning node knows that the task needs (datasets, k)."""

    def __init__(
        self, datasets: dict[str, int], min_records: int = 10, labels: dict[str, str] | None = None
    ) -> None:
        self.datasets = datasets  # name -> record count
        self.min_records = min_records
        self.labels = dict(labels or {})  # site labels (region=eu): hierarchical groups
        # Derived datasets an earlier flow step wrote here (p2pfl/data/derived.py), kept in
        # step by the driver: (flow id, name) -> (records, the site datasets it came from).
        self.derived: dict[tuple[str, str], tuple[int, tuple[str, ...]]] = {}

    def records(self, offer: TaskOffer, name: str) -> int | None:
        """Records of input `name` for `offer` (None: not here). A flow step reads its
        flow's derived dataset of that name first, else the site's dataset."""
        if offer.flow is not None:
            hit = self.derived.get((flow_id_of(offer.flow), name))
            if hit is not None:
                return hit[0]
        return self.datasets.get(name)

    def policy_datasets(self, offer: TaskOffer) -> tuple[str, ...]:
        """The site datasets an offer uses, as the site policy judges it: a derived input
        stands for the datasets it was derived from (their rules apply to it)."""
        out: list[str] = []
        for name in offer.inputs:
            hit = self.derived.get((flow_id_of(offer.flow), name)) if offer.flow else None
            for source in hit[1] if hit is not None and hit[1] else (name,):
                if source not in out:
                    out.append(source)
        return tuple(out)


class TaskMachine:
    def __init__(
        self,
        offer: TaskOffer,
        me: Identity,
        local: LocalContext,
        created_at: float,
        rng: random.Random,
    ) -> None:
        self.offer = offer
        self.me = me
        self.cid = my_cid(offer, me.peer_id)  # the archive we run (a rollout's: our arm's)
        self.local = local
        self.created_at = created_at
        self.rng = rng
        self.phase = Phase.PENDING
        self.reason = ""
        # Volunteering: every valid signed record, its commitment and later its reveal.
        self.volunteers: dict[str, Signed] = {}
        self.samples: dict[str, int] = {}  # the signed sample counts (cap every update)
        self.commits: dict[str, bytes] = {}
        self.nonces: dict[str, bytes] = {}
        self._ranked: Sequence[str] = ()
        self._ranked_for = -1  # len(self.nonces) the ranking was computed for
        self.declines: dict[str, str] = {}
        self.my_nonce = b""
        self.revealed = False  # volunteering is over for us: nonces may be published
        self.reveal_sent = False
        self.roster: Roster | None = None
        self.offer_envelope: Signed | None = None  # as signed by the publisher (snapshots)
        self.roster_envelope: Signed | None = None
        self.roster_publish: Publish | None = None
        self.reveal_publish: Publish | None = None
        self.dead: set[str] = set()  # unreachable, or silent past a duty's deadline
        self.withdrawn: dict[str, str] = {}  # participant -> its reason
        self.nodes: dict[str, NodeState] = {}
        self.round = 0
        self.global_ref: BlobRef | None = None
        self.last_metrics: dict[str, Any] = {}
        self.rounds: FedAvgRounds | PushSumRounds | None = None
        self.final = FinalStep(self)
        self.result: TaskResult | None = None
        self.result_signer = ""
        self.result_envelopes: dict[str, Signed] = {}  # signer -> its signed TaskResult
        self.early: list[Incoming] = []  # round messages that came before the roster
        self.early_bytes = 0
        self.held_rosters: dict[int, Incoming] = {}  # takeover rosters before their time
        self.takeover_epoch = 0  # how many rank positions this node has skipped so far
        self.refused: Counter[str] = Counter()  # events a phase could not take, per kind
        self.connected: set[str] = set()
        self.full_mesh = False  # the driver knows we are connected to the whole network
        self.ended = False
        self.decision: Any = None  # the site policy's Decision on this offer, once made
        self.volunteered_at: float | None = None  # when our volunteer record went out
        self.model_ready = False  # an evaluating step holds the model its offer names
        # A large task sets up through its publisher's call (core/call.py).
        self.large = uses_call(offer.max_nodes)
        self._live: Sequence[str] = ()
        self._participating = False
        self._participating_in: Roster | None = None
        self._live_key: tuple[int, frozenset[str], frozenset[str]] | None = None
        self.call: CallView | None = None
        self.call_parts: dict[int, CallPart] = {}
        self.call_envelopes: dict[int, Signed] = {}  # as signed (snapshots carry them)
        self.call_sent = False
        self.early_reveals: dict[str, bytes] = {}  # committee reveals before the call
        self.waiting_rosters: list[Incoming] = []  # compact rosters before the call

    # --- identity of the task ----------------------------------------------------------

    @property
    def task_id(self) -> str:
        return self.offer.task_id

    @property
    def my_id(self) -> str:
        return self.me.peer_id

    @property
    def is_training(self) -> bool:
        """Whether the task carries a model through rounds. A preprocessing step does: its
        "model" is the statistics of its transform, averaged like weights so that every
        site applies the same one (docs/flows.md)."""
        return self.offer.type in ("training", "preprocessing")

    @property
    def participants(self) -> tuple[str, ...]:
        return self.roster.participants if self.roster else ()

    @property
    def participating(self) -> bool:
        # Asked on most events; a scan of a 10,000-name roster each time was N^2 overall.
        roster = self.roster
        if roster is None:
            return False
        if self._participating_in is not roster:
            self._participating = self.my_id in roster.participants
            self._participating_in = roster
        return self._participating

    def live(self) -> Sequence[str]:
        """Roster members still expected to contribute, in rank order. Memoised on who is
        gone: at scale it is asked on every message, and it is O(roster) (while nobody is
        gone it is the roster itself, shared by every node of a simulation)."""
        key = (id(self.roster), frozenset(self.dead), frozenset(self.withdrawn))
        if key != self._live_key:
            gone = (
                (self.dead | set(self.withdrawn)) & set(self.participants)
                if (self.dead or self.withdrawn)
                else set()
            )
            self._live = (
                [p for p in self.participants if p not in gone] if gone else self.participants
            )
            self._live_key = key
        return self._live  # read-only for callers

    def to_participants(
        self, msg: Any, *, gossip_too: bool = False, attach: BlobRef | None = None
    ) -> list[Command]:
        """`msg` for every live participant, us included. Sent directly when we hold a
        connection to each of them: one frame to each, in about a hundredth of a second
        over 8 hosts, where gossip took 0.05-0.3 s and relays each copy from every mesh
        peer. Otherwise by gossip, which also reaches those we are not connected to.
        `attach`: a blob each of them fetches on reading `msg` (see Send).
        `gossip_too`: by gossip as well, for a message that followers of the task read
        and that nothing asks for again if a direct copy is lost (closes). Updates go
        directly only: followers learn a round from its close and the publisher from
        Progress, and a participant missing one asks its author (UpdateAsk)."""
        me = self.my_id
        gone = self.dead | set(self.withdrawn)
        others = [p for p in self.participants if p != me and p not in gone]
        publish = Publish(TOPIC_TASKS, msg)
        if not all(p in self.connected for p in others):
            return [publish]
        direct: list[Command] = [Send(me, msg), *(Send(p, msg, attach) for p in others)]
        return [*direct, publish] if gossip_too else direct

    def acting(self) -> str | None:
        """Whose duty it is now (closing, failing, reducing): the first live participant."""
        return first_live(self.participants, self.dead | set(self.withdrawn))

    def may_end(self, signer: str, result: TaskResult) -> bool:
        """`signer` may publish `result` for everyone now: the acting participant (or one
        ranked above it), or the publisher failing a task with no participant left (all
        withdrew or are lost, here too), which nobody else has the duty to end."""
        return self.may_act(signer) or (
            result.status == "failed" and self.publisher_may_fail(signer)
        )

    def publisher_may_fail(self, peer: str) -> bool:
        """`peer` is the publisher and no participant is left: its one duty after the roster."""
        return peer == self.offer.publisher and self.roster is not None and self.acting() is None

    def may_act(self, peer: str) -> bool:
        """`peer` may do the duty now: it is the acting participant or ranks above it (it
        may be alive after all: a partition healed)."""
        acting = self.acting()
        if acting is None or peer not in self.participants:
            return False
        order = self.participants
        return order.index(peer) <= order.index(acting)

    def node(self, peer: str) -> NodeState:
        return self.nodes.setdefault(peer, NodeState())

    def event(self, kind: EventKind, now: float, message: str = "", **extra: Any) -> Emit:
        return Emit(TaskEvent(kind, self.task_id, now, message, **extra))

    def timer(self, kind: TimerKind, rnd: int = 0, cid: str = "") -> TaskTimer:
        return TaskTimer(self.task_id, kind, rnd, cid)

    def job(self, step: JobStep, job: dict[str, Any], rnd: int = 0) -> RunJob:
        return RunJob(self.task_id, job, JobToken(self.task_id, step, rnd))

    # --- the one entry point -------------------------------------------------------------

    def handle(self, event: Any, now: float) -> list[Command]:
        key = _key_of(event)
        if key not in ACCEPTS[self.phase]:
            return self._refuse(key, f"not taken in phase {self.phase.value}")
        handler = HANDLERS[key]
        try:
            return handler(self, now, event)
        except Exception as exc:  # a bug: this task stops here, the node goes on
            self.phase = Phase.ERRORED
            self.reason = f"internal error handling {_key_name(key)}: {type(exc).__name__}: {exc}"
            return [
                Log("error", f"task {self.task_id[:12]} errored: {self.reason}"),
                self.event(EventKind.STATE, now, f"errored: {self.reason}", peer=self.my_id),
                *self.end("errored", self.reason),
            ]

    def _refuse(self, key: EventKey, why: str) -> list[Command]:
        name = _key_name(key)
        self.refused[name] += 1
        return [Log("debug", f"task {self.task_id[:12]}: {name} refused: {why}")]

    def end(self, status: str, reason: str = "") -> list[Command]:
        """The task is over for this node: once. Its snapshot is no longer needed."""
        if self.ended:
            return []
        self.ended = True
        return [TaskEnded(self.task_id, status, reason), Persist(self.task_id, None)]

    # --- offer and volunteering -------------------------------------------------------

    def start(self, now: float, taskpack: TaskpackState) -> list[Command]:
        """The offer arrived (or was made here). Decide whether we can take part."""
        deadline = self.offer.volunteer_deadline
        out: list[Command] = [
            SetTimer(self.timer(TimerKind.VOLUNTEER), deadline),
            SetTimer(self.timer(TimerKind.EXPIRE), deadline + EXPIRE_AFTER_S),
            self.event(EventKind.STATE, now, f"offered {self.offer.name}@{self.offer.version}"),
        ]
        if self.my_id == self.offer.publisher:
            # The publisher fails a task that nobody coordinates in time.
            watch = deadline + 4 * GRACE_S
            out.append(SetTimer(self.timer(TimerKind.PUBLISHER_WATCH), watch))
        return out + self.on_taskpack(now, taskpack)

    def on_taskpack(self, now: float, event: TaskpackState) -> list[Command]:
        status = event.status
        if self.phase != Phase.PENDING or status is None or status in ("fetching", "checking"):
            return []
        if status != "verified":
            return self.decline(now, f"taskpack {event.reason or status}")
        missing = [
            name for name in self.offer.inputs if self.local.records(self.offer, name) is None
        ]
        if missing:
            return self.decline(now, f"no local dataset named {', '.join(missing)}")
        if now > self.offer.volunteer_deadline:
            return self.decline(now, "offer expired before the taskpack was verified")
        out: list[Command] = []
        decision = event.decision
        if decision is not None:
            # The site's policy decides before any code runs, and the audit log says so.
            self.decision = decision
            out.append(
                Audit(
                    "offer",
                    {
                        "task": self.task_id,
                        "requester": self.offer.publisher,
                        "taskpack": f"{self.offer.name}@{self.offer.version}",
                        "datasets": list(self.offer.inputs),
                        "decision": "allowed" if decision.allowed else "declined",
                        "rule": decision.rule,
                        "reason": decision.reason,
                    },
                )
            )
            if not decision.allowed:
                return out + self.decline(now, decision.reason)
        self.phase = Phase.VALIDATING
        return out + [self.job(JobStep.VALIDATE, {"kind": "validate"})]

    @property
    def k(self) -> int:
        """Fewest records behind any number this node releases (its own k and the policy's)."""
        k = self.local.min_records
        return max(k, int(self.decision.k)) if self.decision is not None else k

    @property
    def withhold_metrics(self) -> bool:
        """Per-round loss and local metrics stay home (the policy asks, e.g. under DP)."""
        return self.decision is not None and self.decision.metrics == "withhold"

    def shareable(self, metrics: Any) -> dict[str, Any]:
        """The metrics that may leave this node: all of them, or, when the policy withholds
        metrics, only the privacy accounting (epsilon is computed from the task's public
        DP parameters, not from the data's values)."""
        if not isinstance(metrics, dict):
            return {}
        if not self.withhold_metrics:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if k in _ACCOUNTING}

    def decline(self, now: float, reason: str) -> list[Command]:
        self.phase = Phase.DECLINED
        self.reason = reason
        self.declines[self.my_id] = reason
        signed = seal(self.me, Decline(self.task_id, self.my_id, reason[:2000]))
        if not self.large:
            say: list[Command] = [Publish(TOPIC_TASKS, signed)]
        else:  # a large task's setup goes through its publisher only (core/call.py)
            say = [Send(self.offer.publisher, signed)] if self.my_id != self.offer.publisher else []
        out: list[Command] = [
            *say,
            Log("info", f"task {self.task_id[:12]}: declined: {reason}"),
            self.event(EventKind.STATE, now, f"declined: {reason}", peer=self.my_id),
        ]
        # Our worker is no longer needed; we keep following the task.
        out += [TaskEnded(self.task_id, "declined", reason)]
        return out + self._maybe_all_declined(now)

    def on_validated(self, now: float, event: JobDone | JobFailed) -> list[Command]:
        if isinstance(event, JobFailed):
            return self.decline(now, f"validate_inputs refused: {event.reason}")
        samples = sum(self.local.records(self.offer, name) or 0 for name in self.offer.inputs)
        # Released aggregates, and a preprocessing step's shared statistics, need k records.
        if self.offer.type in ("analysis", "preprocessing") and samples < self.k:
            return self.decline(now, f"fewer than {self.k} records (k policy)")
        if now >= self.offer.volunteer_deadline:
            # The others have revealed by now and refuse a record made after it: say so,
            # instead of waiting on a roster that cannot include us.
            return self.decline(now, "too late: the volunteer window closed during checks")
        self.phase = Phase.VOLUNTEERED
        self.volunteered_at = now
        self.my_nonce = self.rng.randbytes(NONCE_BYTES)
        named = self.cid if self.offer.rollout else ""
        group_by = aggregation(self.offer).get("group_by")
        group = self.local.labels.get(group_by, "") if isinstance(group_by, str) else ""
        record = Volunteer(
            self.task_id, self.my_id, samples, commitment(self.my_nonce), named, group
        )
        signed = seal(self.me, record)
        out: list[Command] = [Log("info", f"task {self.task_id[:12]}: volunteered")]
        if not self.large:
            out.append(Publish(TOPIC_TASKS, signed))
        elif self.my_id != self.offer.publisher:
            out.append(Send(self.offer.publisher, signed))  # core/call.py
        if self.large and self.call is not None:
            return out + self.decline(now, "too late: the call was out before our checks ended")
        dp = self.offer.dp
        if isinstance(dp, dict) and self.decision is not None:
            # Volunteering commits our data to the task's DP budget (not refunded if the
            # roster leaves us out: the conservative side).
            out.append(ChargePrivacy(self.task_id, self.offer.inputs, float(dp["epsilon"])))
        out += self._take_volunteer(now, record, signed)
        if self.large:
            return out
        if self.revealed or now >= self.offer.volunteer_deadline:
            out += self._reveal(now)
        return out

    def on_volunteer(self, now: float, event: Incoming) -> list[Command]:
        vol: Volunteer = event.msg
        if vol.peer in self.volunteers or self.roster is not None or event.envelope is None:
            return []
        if self.large:
            return self._collect(now, vol, event.envelope)
        if self.revealed and vol.peer != self.my_id:
            # Too late: nonces are out, and a record made after seeing them could grind.
            return self._refuse(Volunteer, f"{vol.peer[-8:]} volunteered after the reveals")
        wrong = volunteer_problem(self.offer, vol.peer, vol.cid)
        if wrong is not None:  # another version than the rollout rule gives it
            return self._refuse(Volunteer, wrong)
        return self._take_volunteer(now, vol, event.envelope)

    def _take_volunteer(self, now: float, vol: Volunteer, signed: Signed) -> list[Command]:
        self.volunteers[vol.peer] = signed
        self.samples[vol.peer] = vol.num_samples
        self.commits[vol.peer] = vol.commit
        self.nodes.setdefault(vol.peer, NodeState("volunteered"))
        out: list[Command] = [self.event(EventKind.NODE, now, "volunteered", peer=vol.peer)]
        if self.large:
            if self.my_id == self.offer.publisher and self._everyone_answered():
                out += self._publish_call(now)
            return out
        if self._everyone_answered():
            out += self._reveal(now)
        return out + self._maybe_roster(now)

    # --- a large task's call (core/call.py) ----------------------------------------------

    def _collect(self, now: float, vol: Volunteer, signed: Signed) -> list[Command]:
        """The publisher of a large task keeps the records sent to it, for its call."""
        if self.my_id != self.offer.publisher:
            return self._refuse(Volunteer, "a large task's records go to its publisher")
        if self.call_sent or self.offer.volunteer_deadline <= now:
            return self._refuse(Volunteer, f"{vol.peer[-8:]} volunteered after the call")
        if len(self.volunteers) >= self.offer.max_nodes:
            return self._refuse(Volunteer, "the call is full (max_nodes)")
        wrong = volunteer_problem(self.offer, vol.peer, vol.cid)
        if wrong is not None:
            return self._refuse(Volunteer, wrong)
        return self._take_volunteer(now, vol, signed)

    def _publish_call(self, now: float) -> list[Command]:
        """Volunteering is over: publish every record we hold, in peer order, in parts."""
        if self.call_sent or not self.volunteers:
            return []
        self.call_sent = True
        records = [encode(self.volunteers[p]) for p in sorted(self.volunteers)]
        parts = split_records(records)
        out: list[Command] = [
            Log("info", f"task {self.task_id[:12]}: call of {len(records)} volunteers")
        ]
        for i, chunk in enumerate(parts):
            part = CallPart(self.task_id, self.my_id, i, len(parts), chunk)
            envelope = seal(self.me, part)
            out.append(Publish(TOPIC_TASKS, envelope))
            out += self.on_call_part(now, Incoming(part, self.my_id, envelope))
        return out

    def on_call_part(self, now: float, event: Incoming) -> list[Command]:
        part: CallPart = event.msg
        if not self.large:
            return self._refuse(CallPart, "a call for a task that sets up all-to-all")
        wrong = check_part(part, self.offer.publisher, event.signer)
        if wrong is not None or event.envelope is None:
            return self._refuse(CallPart, wrong or "unsigned call part")
        if self.call is not None or self.roster is not None:
            return []
        if self.call_parts and part.parts != next(iter(self.call_parts.values())).parts:
            return self._refuse(CallPart, "call parts disagree on their number")
        if part.part in self.call_parts:
            if self.call_parts[part.part] != part:
                return [Log("warning", f"task {self.task_id[:12]}: the publisher sent two calls")]
            return []
        held = sum(len(p.records) for p in self.call_parts.values()) + len(part.records)
        if held > self.offer.max_nodes:  # what a publisher can make us hold: its offer's size
            return self._refuse(CallPart, f"call parts carry over max_nodes ({held}) records")
        self.call_parts[part.part] = part
        self.call_envelopes[part.part] = event.envelope
        if len(self.call_parts) < part.parts:
            return []
        chunks = tuple(self.call_parts[i].records for i in range(part.parts))
        try:
            view = call_view(self.task_id, chunks, self.offer.max_nodes)
        except (RemoteProtocolError, ValueError) as exc:
            return [Log("warning", f"task {self.task_id[:12]}: call refused: {exc}")]
        if self.offer.rollout:
            for peer in view.peers:
                wrong = volunteer_problem(self.offer, peer, view.cids.get(peer, ""))
                if wrong is not None:
                    return [Log("warning", f"task {self.task_id[:12]}: call refused: {wrong}")]
        return self._take_call(now, view)

    def _take_call(self, now: float, view: CallView) -> list[Command]:
        self.call = view
        self.revealed = True  # volunteering is over
        # Shared with every node of a simulation: never written after this point.
        self.samples = view.samples  # type: ignore[assignment]
        out: list[Command] = [
            SetTimer(self.timer(TimerKind.REVEAL), now + GRACE_S),
            self.event(EventKind.STATE, now, f"call: {len(view.peers)} volunteers"),
        ]
        if self.phase == Phase.VOLUNTEERED and self.my_id not in view.commits:
            return out + self.decline(now, "left out of the call: it does not carry our record")
        if self.phase == Phase.VOLUNTEERED and self.my_id in view.committee:
            out += self._reveal(now)
        early, self.early_reveals = self.early_reveals, {}
        for peer, nonce in early.items():
            out += self._take_committee_reveal(now, peer, nonce)
        waiting, self.waiting_rosters = self.waiting_rosters, []
        for incoming in waiting:
            out += self.handle(incoming, now)
        return out + self._maybe_roster(now)

    def _take_committee_reveal(self, now: float, peer: str, nonce: bytes) -> list[Command]:
        call = self.call
        assert call is not None
        if peer in self.nonces:
            return []
        if peer not in call.committee:
            return self._refuse(Reveal, f"{peer[-8:]} is not on the committee")
        if call.commits[peer] != commitment(nonce):
            return self._refuse(Reveal, f"{peer[-8:]}: reveal without a matching record")
        return self._take_reveal(now, peer, nonce)

    def on_decline(self, now: float, event: Incoming) -> list[Command]:
        decline: Decline = event.msg
        if decline.peer in self.participants:
            return self._on_withdraw(now, decline.peer, decline.reason)
        if decline.peer in self.declines:
            return []
        self.declines[decline.peer] = decline.reason
        self.volunteers.pop(decline.peer, None)
        self.nonces.pop(decline.peer, None)  # nonces stay a subset of the volunteers
        self.commits.pop(decline.peer, None)
        out: list[Command] = [
            self.event(EventKind.NODE, now, f"declined: {decline.reason}", peer=decline.peer)
        ]
        if self.large:
            if self.my_id == self.offer.publisher and self._everyone_answered():
                out += self._publish_call(now)
        elif self._everyone_answered():
            out += self._reveal(now)
        return out + self._maybe_all_declined(now) + self._maybe_roster(now)

    def _everyone_answered(self) -> bool:
        """True when waiting for the deadline is moot: every peer we are connected to has
        answered and nobody we do not know answered (then no volunteer can still come);
        for a large task's publisher also once its call is full (max_nodes records: it
        alone decides the call). Not "max_nodes records seen" in the all-to-all setup:
        nodes see the records in different orders, and revealing at different sets of
        volunteers gave them different beacons, hence different rosters (a split task)."""
        if self.large and len(self.volunteers) >= self.offer.max_nodes:
            return True
        if not self.full_mesh:
            return False
        answered = set(self.volunteers) | set(self.declines)
        return answered >= self.connected and answered <= self.connected | {self.my_id}

    def _maybe_all_declined(self, now: float) -> list[Command]:
        """The publisher fails the task at once when every peer that could take part said
        no (with their reasons), instead of waiting for the volunteer deadline."""
        if self.my_id != self.offer.publisher or self.roster is not None or self.volunteers:
            return []
        if not self._everyone_answered() or not self.declines:
            return []
        return self.fail(now, _declined_summary(self.declines))

    # --- reveals and the roster --------------------------------------------------------

    def _reveal(self, now: float) -> list[Command]:
        """Volunteering is over for us: publish our ranking nonce (once we have one). In a
        large task only the committee does, once the call is in."""
        if self.large and (self.call is None or self.my_id not in self.call.committee):
            return []
        out: list[Command] = []
        if not self.revealed:
            self.revealed = True
            deadline = max(now, self.offer.volunteer_deadline) + GRACE_S
            out.append(SetTimer(self.timer(TimerKind.REVEAL), deadline))
        if self.phase == Phase.VOLUNTEERED and self.my_nonce and not self.reveal_sent:
            self.reveal_sent = True
            signed = seal(self.me, Reveal(self.task_id, self.my_id, self.my_nonce))
            self.reveal_publish = Publish(TOPIC_TASKS, signed)
            out.append(self.reveal_publish)
            out.append(SetTimer(self.timer(TimerKind.REPUBLISH_REVEAL), now + GRACE_S / 2))
            out += self._take_reveal(now, self.my_id, self.my_nonce)
        return out

    def on_reveal(self, now: float, event: Incoming) -> list[Command]:
        reveal: Reveal = event.msg
        if reveal.peer in self.nonces or event.envelope is None or self.roster is not None:
            return []  # a duplicate (we republish reveals once) or too late to matter
        if self.large:
            if self.call is None:  # gossip may bring it before the last call part
                if len(self.early_reveals) < 2 * MAX_HELD:
                    self.early_reveals[reveal.peer] = reveal.nonce
                return []
            return self._take_committee_reveal(now, reveal.peer, reveal.nonce)
        if self.commits.get(reveal.peer) != commitment(reveal.nonce):
            return self._refuse(Reveal, f"{reveal.peer[-8:]}: reveal without a matching record")
        return self._take_reveal(now, reveal.peer, reveal.nonce)

    def _take_reveal(self, now: float, peer: str, nonce: bytes) -> list[Command]:
        self.nonces[peer] = nonce
        return self._maybe_roster(now)

    def _eligible(self) -> dict[str, bytes]:
        """Volunteers with a record and a matching reveal: peer -> nonce (a reveal is only
        taken for a record we hold, and a decline drops both)."""
        return self.nonces

    def _ranking(self) -> Sequence[str]:
        """Every eligible volunteer, best-ranked first under the beacon of their nonces
        (a large task: every volunteer of the call, under the committee's beacon).
        Memoised per set of reveals: at scale it is asked once per message."""
        key = len(self.nonces)
        if self._ranked_for != key:
            if self.large:
                if self.call is None or not self.nonces:
                    return ()
                seed = committee_seed(self.call, self.nonces)
                self._ranked = call_order(self.task_id, self.call, seed)[0]
            else:
                self._ranked = ranked(self.task_id, self.nonces, make_beacon(self.nonces))
            self._ranked_for = key
        return self._ranked

    def _maybe_roster(self, now: float, deadline_passed: bool = False) -> list[Command]:
        """Publish the roster if we are the best-ranked live volunteer and the time is right:
        every volunteer we know has revealed (or the reveal deadline passed)."""
        if self.roster is not None or self.phase != Phase.VOLUNTEERED or not self.revealed:
            return []
        if self.large:
            return self._maybe_compact_roster(now, deadline_passed)
        if not deadline_passed and len(self.nonces) < len(self.volunteers):
            return []  # reveals still to come (O(1): this runs on every record at scale)
        everyone = self._ranking()
        order = [p for p in everyone if p not in self.dead]
        if not order or order[0] != self.my_id or len(order) < self.offer.min_nodes:
            return []
        chosen = tuple(order[: self.offer.max_nodes])
        roster = Roster(
            task_id=self.task_id,
            coordinator=self.my_id,
            epoch=everyone.index(self.my_id),
            participants=chosen,
            volunteers=tuple(encode(self.volunteers[p]) for p in everyone),
            nonces=tuple(self.nonces[p] for p in everyone),
        )
        self.roster_envelope = seal(self.me, roster)
        self.roster_publish = Publish(TOPIC_TASKS, self.roster_envelope)
        out: list[Command] = [
            self.roster_publish,
            # Once more shortly: a participant that missed it would sit out the task.
            SetTimer(self.timer(TimerKind.REPUBLISH_ROSTER), now + GRACE_S / 2),
            Log("info", f"task {self.task_id[:12]}: coordinating {len(chosen)} participants"),
        ]
        signed = {p: self.samples[p] for p in everyone if p in self.samples}
        return out + self._accept_roster(now, roster, signed)

    def _maybe_compact_roster(self, now: float, deadline_passed: bool) -> list[Command]:
        """A large task: the roster names the call and carries the committee's nonces."""
        call = self.call
        if call is None or not self.nonces:
            return []
        if not deadline_passed and len(self.nonces) < len(call.committee):
            return []
        everyone = self._ranking()
        first = next((p for p in everyone if p not in self.dead), None)
        if first != self.my_id:
            return []
        place = call_order(self.task_id, call, committee_seed(call, self.nonces))[1]
        gone = sorted((p for p in self.dead if p in place), key=place.__getitem__)
        skipped = tuple(sorted(gone[:MAX_SKIPPED]))
        roster = Roster(
            task_id=self.task_id,
            coordinator=self.my_id,
            epoch=place[self.my_id],
            participants=(),
            volunteers=(),
            nonces=(),
            call=call.digest,
            committee=tuple(self.nonces.get(p, b"") for p in call.committee),
            skipped=skipped,
        )
        problem, participants = call_roster_problem(
            self.task_id, roster, call, (), self.offer.min_nodes, self.offer.max_nodes
        )
        if problem is not None:
            return [Log("info", f"task {self.task_id[:12]}: no roster yet: {problem}")]
        self.roster_envelope = seal(self.me, roster)
        self.roster_publish = Publish(TOPIC_TASKS, self.roster_envelope)
        out: list[Command] = [
            self.roster_publish,
            SetTimer(self.timer(TimerKind.REPUBLISH_ROSTER), now + GRACE_S / 2),
            Log("info", f"task {self.task_id[:12]}: coordinating {len(participants)} participants"),
        ]
        full = with_participants(roster, participants)
        return out + self._accept_roster(now, full, {})

    def _on_compact_roster(self, now: float, event: Incoming) -> list[Command]:
        roster: Roster = event.msg
        if not roster.call or roster.participants or roster.volunteers:
            return self._refuse(Roster, "a large task's roster names its call and nothing else")
        if self.call is None:
            if len(self.waiting_rosters) < MAX_HELD:
                self.waiting_rosters.append(event)
            return []
        # Our own reveal is not held against a roster: it may have been lost on its way
        # (nobody else then holds it either). Had it reached the others, they refuse a
        # roster that drops it, so a coordinator still cannot pick its beacon.
        held = [p for p in self.nonces if p not in self.dead and p != self.my_id]
        problem, participants = call_roster_problem(
            self.task_id, roster, self.call, held, self.offer.min_nodes, self.offer.max_nodes
        )
        mine = self.phase == Phase.VOLUNTEERED and self.my_id in self.call.commits
        full = with_participants(roster, participants) if problem is None else roster
        return self._judged_roster(now, event, full, problem, mine)

    def on_roster(self, now: float, event: Incoming, carried: dict[str, bytes]) -> list[Command]:
        """`carried`: peer -> nonce of every volunteer record + reveal the roster carries
        (signatures and commitments already checked by the node core)."""
        roster: Roster = event.msg
        if event.signer != roster.coordinator:
            return self._refuse(Roster, f"signed by {event.signer[-8:]}, not its coordinator")
        if self.roster is not None and roster.epoch >= self.roster.epoch:
            return []  # the one we have is at least as good
        if self.large:
            return self._on_compact_roster(now, event)
        held = [p for p in self._eligible() if p not in self.dead]
        if self.my_id in held and self.my_id not in carried and self._volunteered_late():
            # Our record went out so near the deadline that honest peers may have revealed
            # before it reached them: being left out is then no sign of a cheat.
            held.remove(self.my_id)
        problem = roster_problem(
            self.task_id,
            roster.coordinator,
            roster.epoch,
            roster.participants,
            carried,
            held,
            self.offer.min_nodes,
            self.offer.max_nodes,
        ) or roster_rollout_problem(self.offer, roster.participants, roster.volunteers)
        # Our own valid record left out: we object (see _judged_roster).
        mine = self.my_id in self._eligible() and self.my_id not in roster.participants
        return self._judged_roster(now, event, roster, problem, mine)

    def _judged_roster(
        self, now: float, event: Incoming, roster: Roster, problem: str | None, mine: bool
    ) -> list[Command]:
        """A checked roster (either setup): refused with its problem, held until its
        takeover time, or accepted. `mine`: we object to a refused one, treating its
        coordinator as gone, so that the next in rank takes over."""
        if problem is not None:
            out: list[Command] = [
                Log(
                    "warning",
                    f"task {self.task_id[:12]}: invalid roster from {event.signer}: {problem}",
                )
            ]
            if mine:
                self.dead.add(roster.coordinator)
                out.append(
                    self.event(
                        EventKind.STATE,
                        now,
                        f"rejected the roster of {roster.coordinator}: {problem}",
                        peer=self.my_id,
                    )
                )
                out += self._maybe_roster(now, deadline_passed=True)
            return out
        if roster.epoch > self.takeover_epoch and not self._better_ranked_gone(roster):
            # A takeover before its time (by our clock): hold it until the ranks above
            # its coordinator have had their grace periods.
            if len(self.held_rosters) < MAX_HELD:
                self.held_rosters[roster.epoch] = event
            return []
        if self.roster is not None and (self.round > 1 or self.phase not in _FRESH):
            return []  # too late to switch: the task already went on
        self.roster_envelope = event.envelope
        return self._accept_roster(now, roster, event.samples)

    def _volunteered_late(self) -> bool:
        """Whether our record may have reached the others after their reveals (within one
        grace period of the volunteer deadline): they refuse such records, so a roster
        leaving us out is a valid one."""
        at = self.volunteered_at
        return at is not None and at > self.offer.volunteer_deadline - GRACE_S

    def _better_ranked_gone(self, roster: Roster) -> bool:
        """Every volunteer ranked above the roster's coordinator is gone in our view."""
        order = self._ranking()
        if roster.coordinator not in order:
            return False
        return all(p in self.dead for p in order[: order.index(roster.coordinator)])

    def _accept_roster(self, now: float, roster: Roster, samples: dict[str, int]) -> list[Command]:
        first = self.roster is None
        self.roster = roster
        # Every participant's signed sample count, from the records the roster carries
        # (we may have missed some Volunteer messages): each caps that peer's updates.
        # (A large task's come from its call, which every node holds.)
        if samples:
            self.samples.update(samples)
        self.held_rosters.clear()
        if not self.large:
            self.nodes = {
                p: self.nodes.get(p, NodeState("volunteered")) for p in roster.participants
            }
        out: list[Command] = [
            CancelTimer(self.timer(TimerKind.VOLUNTEER)),
            CancelTimer(self.timer(TimerKind.REVEAL)),
            CancelTimer(self.timer(TimerKind.ROSTER_TAKEOVER)),
            CancelTimer(self.timer(TimerKind.PUBLISHER_WATCH)),
            CancelTimer(self.timer(TimerKind.EXPIRE)),
            self.event(
                EventKind.ROSTER,
                now,
                f"roster: {len(roster.participants)} participants, coordinator {roster.coordinator}",
                peer=roster.coordinator,
            ),
        ]
        if self.participating and self.phase == Phase.VOLUNTEERED:
            out += self._begin(now) + self.snapshot()
        elif not self.participating and self.phase in (Phase.VOLUNTEERED, Phase.VALIDATING):
            self.phase = Phase.OBSERVING
            out += [TaskEnded(self.task_id, "observing", "not on the roster")]
        if first and self.early:
            held, self.early, self.early_bytes = self.early, [], 0
            for incoming in held:
                out += self.handle(incoming, now)
        return out

    def _begin(self, now: float) -> list[Command]:
        self.round = 1
        if self.is_training:
            self.rounds = (
                PushSumRounds(self) if self.offer.protocol == "gossip" else FedAvgRounds(self)
            )
            self.phase = Phase.INIT
            return [self.job(JobStep.INIT, {"kind": "init"})]
        # analysis (and other one-shot types): a single execution, then the final step
        self.phase = Phase.TRAINING
        out: list[Command] = [
            SetTimer(self.timer(TimerKind.ROUND, 1), now + self.offer.round_timeout_s)
        ]
        if self.offer.model is not None:
            # A flow step that evaluates an earlier step's model: fetch it first (from
            # this task's roster and publisher; the earlier step's roster serves it).
            providers = tuple(
                p for p in (*self.participants, self.offer.publisher) if p != self.my_id
            )
            return out + [FetchBlob(self.offer.model, providers)]
        return out + [self.job(JobStep.TRAIN, {"kind": "train", "round": 1, "weights": None}, 1)]

    # --- persistence -------------------------------------------------------------------

    def snapshot(self) -> list[Command]:
        """What a restarted node needs to rejoin (see core/snapshot.py); [] if we are not
        a participant or lack the signed records."""
        if not self.participating or self.offer_envelope is None or self.roster_envelope is None:
            return []
        mass = float(getattr(self.rounds, "mass", 0.0))
        if self.large:
            call = tuple(self.call_envelopes[i] for i in sorted(self.call_envelopes))
            build = functools.partial(
                make_snapshot,
                self.offer_envelope,
                self.roster_envelope,
                self.round,
                self.global_ref,
                mass,
                call,
            )
            return [Persist(self.task_id, None, build)]
        data = make_snapshot(
            self.offer_envelope, self.roster_envelope, self.round, self.global_ref, mass
        )
        return [Persist(self.task_id, data)]

    def resume(
        self, now: float, roster: Roster, samples: dict[str, int], rnd: int, model: Any, mass: float
    ) -> list[Command]:
        """Rejoin after a restart: the roster stands; train the next round from the last
        model we hold (a close that overtakes us brings us back in step)."""
        self.roster = roster
        self.samples.update(samples)
        self.revealed = True
        if not self.large:
            self.nodes = {p: NodeState("volunteered") for p in roster.participants}
        out: list[Command] = [
            self.event(EventKind.STATE, now, f"resumed at round {rnd + 1}", peer=self.my_id)
        ]
        if not self.participating:
            self.phase = Phase.OBSERVING
            return out
        self.phase = Phase.VOLUNTEERED
        if model is None or not self.is_training:
            return out + self._begin(now)
        self.rounds = PushSumRounds(self) if self.offer.protocol == "gossip" else FedAvgRounds(self)
        self.global_ref = model
        if isinstance(self.rounds, PushSumRounds):
            self.rounds.mass = mass
        if rnd >= self.offer.rounds:
            return out + self.final.finalize(now)
        return out + self.rounds.train(now, rnd + 1)

    def resume_call(self, parts: list[tuple[CallPart, Signed]], roster: Roster) -> Roster:
        """A large task's snapshot: re-check its call and derive the roster's participants
        (RemoteProtocolError if the file does not hold together)."""
        for part, envelope in parts:
            if check_part(part, self.offer.publisher, envelope.signer) is not None:
                raise RemoteProtocolError("snapshot call part not signed by the publisher")
            self.call_parts[part.part] = part
            self.call_envelopes[part.part] = envelope
        n = len(self.call_parts)
        if n == 0 or sorted(self.call_parts) != list(range(n)):
            raise RemoteProtocolError("snapshot call is incomplete")
        chunks = tuple(self.call_parts[i].records for i in range(n))
        view = call_view(self.task_id, chunks, self.offer.max_nodes)
        problem, participants = call_roster_problem(
            self.task_id, roster, view, (), self.offer.min_nodes, self.offer.max_nodes
        )
        if problem is not None:
            raise RemoteProtocolError(f"snapshot roster: {problem}")
        self.call = view
        self.samples = view.samples  # type: ignore[assignment]
        return with_participants(roster, participants)

    # --- timers ------------------------------------------------------------------------

    def on_timer(self, now: float, event: TimerFired) -> list[Command]:
        key = event.key
        assert isinstance(key, TaskTimer)
        if self.result is not None:
            return []
        kind = key.kind
        if kind is TimerKind.VOLUNTEER:
            if self.large:
                return self._publish_call(now) if self.my_id == self.offer.publisher else []
            return self._reveal(now)
        if kind is TimerKind.REVEAL:
            out = self._maybe_roster(now, deadline_passed=True)
            if self.roster is None:
                out.append(SetTimer(self.timer(TimerKind.ROSTER_TAKEOVER), now + GRACE_S))
            return out
        if kind is TimerKind.ROSTER_TAKEOVER:
            return self._roster_takeover(now)
        if kind is TimerKind.PUBLISHER_WATCH:
            return self._publisher_watch(now)
        if kind is TimerKind.EXPIRE:
            return self._expire(now)
        if kind is TimerKind.REPUBLISH_REVEAL:
            again = self.roster is None and self.reveal_publish is not None
            return [self.reveal_publish] if again and self.reveal_publish is not None else []
        if kind is TimerKind.REPUBLISH_ROSTER:
            mine = self.roster is not None and self.roster.coordinator == self.my_id
            return [self.roster_publish] if mine and self.roster_publish is not None else []
        if kind is TimerKind.REDUCE:
            return self.final.on_deadline(now)
        if kind is TimerKind.PARTIAL:
            return self.final.resend(now)
        if self.rounds is not None:
            return self.rounds.on_timer(now, key)
        if kind is TimerKind.ROUND:  # analysis: the execution's deadline
            return self.final.on_deadline(now)
        return []

    def _roster_takeover(self, now: float) -> list[Command]:
        """The best-ranked live volunteer stayed silent: treat it as gone; the next in rank
        (perhaps us) publishes the roster. Every node does this in step."""
        if self.roster is not None:
            return []
        order = self._ranking()
        live = [p for p in order if p not in self.dead]
        if live and live[0] != self.my_id:
            self.dead.add(live[0])
        self.takeover_epoch += 1
        out = self._maybe_roster(now, deadline_passed=True)
        for epoch in sorted(self.held_rosters):
            if self.roster is None and epoch <= self.takeover_epoch:
                held = self.held_rosters.pop(epoch)
                out += self.handle(held, now)
        if self.roster is None and len(live) > 1:
            out.append(SetTimer(self.timer(TimerKind.ROSTER_TAKEOVER), now + GRACE_S))
        return out

    def _publisher_watch(self, now: float) -> list[Command]:
        if self.roster is not None:
            return []
        n = len(self.call.peers) if self.call is not None else len(self._eligible())
        if n < self.offer.min_nodes:
            why = f"only {n} volunteer{'s' if n != 1 else ''} by the deadline; min_nodes is {self.offer.min_nodes}"
            if self.declines:
                why += f"; {_declined_summary(self.declines)}"
        else:
            why = f"no valid roster from the {n} volunteers by the deadline"
        # Keep watching: a takeover may still come, and then the failure stands aside.
        return self.fail(now, why)

    def _expire(self, now: float) -> list[Command]:
        if self.roster is not None or self.result is not None:
            return []
        self.phase = Phase.EXPIRED
        self.reason = "the offer got no roster"
        return self.end("expired", self.reason)

    # --- peers ---------------------------------------------------------------------------

    def on_peer_lost(self, now: float, event: PeerLost) -> list[Command]:
        peer = event.peer
        if self.roster is None:
            if peer in self.volunteers or (self.call is not None and peer in self.call.commits):
                self.dead.add(peer)
            return []
        if peer not in self.participants or peer in self.dead:
            return []
        self.dead.add(peer)
        self.node(peer).state = "lost"
        out: list[Command] = [self.event(EventKind.NODE, now, "lost (peer unreachable)", peer=peer)]
        return out + self.on_view_changed(now)

    def on_peer_back(self, now: float, event: PeerBack) -> list[Command]:
        """A participant we had lost is reachable again (a partition healed, a restart):
        it is expected in the next rounds again; the next close brings it back in step."""
        peer = event.peer
        if self.result is not None:
            return self._result_to(peer)
        if peer not in self.dead or peer not in self.participants:
            return []
        self.dead.discard(peer)
        self.node(peer).state = "rejoined"
        return [self.event(EventKind.NODE, now, "reachable again", peer=peer)]

    def _result_to(self, peer: str) -> list[Command]:
        """A participant or the publisher reconnects after the task ended (it may have been
        down when the result went out, e.g. a flow's starter): one node sends it the signed
        result, the reducer (or, if that is the peer itself, the next in roster order)."""
        envelope = self.result_envelope
        if envelope is None or self.result is None:
            return []
        if peer not in self.participants and peer != self.offer.publisher:
            return []
        order = [self.result.reducer, *self.participants]
        sender = next((p for p in order if p != peer), None)
        return [Send(peer, envelope)] if sender == self.my_id else []

    def on_view_changed(self, now: float) -> list[Command]:
        """Who is live changed: a held duty message may now count, a round may be complete."""
        out: list[Command] = []
        if self.rounds is not None and self.phase in ACTIVE:
            out += self.rounds.on_view_changed(now)
        out += self.final.on_view_changed(now)
        if self.result is None and self.publisher_may_fail(self.my_id):
            # Every participant withdrew (say all at once, before hearing each other) or is
            # lost: no one has the duty to fail the task, so its publisher does, with why.
            lost = len(set(self.participants) - set(self.withdrawn))
            why = "no participant is left" + (f"; {lost} lost" if lost else "")
            if self.withdrawn:
                why += f"; {withdrew_summary(self.withdrawn)}"
            out += self.fail(now, why)
        return out

    def _on_withdraw(self, now: float, peer: str, reason: str) -> list[Command]:
        if peer in self.withdrawn:
            return []
        self.withdrawn[peer] = reason
        self.node(peer).state = "withdrawn"
        out: list[Command] = [
            self.event(EventKind.NODE, now, f"withdrew: {reason}", peer=peer, round=self.round)
        ]
        return out + self.on_view_changed(now)

    # --- local outcomes ------------------------------------------------------------------

    def withdraw(self, now: float, reason: str) -> list[Command]:
        """A local failure: this node leaves the task, with its reason; others go on."""
        if self.phase in TERMINAL or self.phase is Phase.WITHDRAWN:
            return []
        self.phase = Phase.WITHDRAWN
        self.reason = reason
        self.withdrawn[self.my_id] = reason
        self.node(self.my_id).state = "withdrawn"
        out: list[Command] = [
            Log("warning", f"task {self.task_id[:12]}: withdrawing: {reason}"),
            Publish(TOPIC_TASKS, seal(self.me, Decline(self.task_id, self.my_id, reason[:2000]))),
            self.event(EventKind.STATE, now, f"withdrew: {reason}", peer=self.my_id),
            TaskEnded(self.task_id, "withdrawn", reason),
            Persist(self.task_id, None),
        ]
        # If it was our duty to close or reduce, the next in rank now has it.
        return out + self.on_view_changed(now)

    def fail(self, now: float, reason: str) -> list[Command]:
        """The task cannot go on. Only the acting participant (or, before any roster, the
        publisher) may say so for everyone; anyone else withdraws with the reason."""
        if self.result is not None:
            return []
        if self.roster is None:
            allowed = self.my_id == self.offer.publisher
        else:
            allowed = self.acting() == self.my_id or self.publisher_may_fail(self.my_id)
        if not allowed:
            return self.withdraw(now, reason)
        result = TaskResult(
            task_id=self.task_id,
            status="failed",
            reason=reason[:4000],
            reducer=self.my_id,
            **self.members(self.participants),
            rounds=self.round,
            metrics={},
            model=None,
            created=now,
        )
        envelope = seal(self.me, result)
        self.result_envelopes[self.my_id] = envelope
        out: list[Command] = [
            Log("warning", f"task {self.task_id[:12]} failed: {reason}"),
            Publish(TOPIC_TASKS, envelope),
        ]
        return out + self.final.take_result(now, result, self.my_id)

    def on_policy_revoked(self, now: float, event: PolicyRevoked) -> list[Command]:
        if self.participating:
            return self.withdraw(now, event.reason)
        if self.phase in (Phase.VALIDATING, Phase.VOLUNTEERED):
            return self.decline(now, event.reason)
        return []

    def on_result(self, now: float, event: Incoming) -> list[Command]:
        if event.envelope is not None and len(self.result_envelopes) < MAX_HELD:
            # Kept as signed, so a flow can re-check the result off the wire (p2pfl/flow).
            self.result_envelopes.setdefault(event.signer, event.envelope)
        return self.final.on_result(now, event.msg, event.signer)

    @property
    def result_envelope(self) -> Signed | None:
        """The signed result this node took (None: no result, or not kept)."""
        if self.result is None:
            return None
        return self.result_envelopes.get(self.result_signer)

    def on_cancel(self, now: float, event: Incoming) -> list[Command]:
        """The publisher ended the task: for everyone, at once."""
        cancel: Cancel = event.msg
        if event.signer != self.offer.publisher or self.result is not None:
            return self._refuse(Cancel, f"cancel signed by {event.signer[-8:]}, not the publisher")
        result = TaskResult(
            task_id=self.task_id,
            status="failed",
            reason=f"cancelled by the publisher: {cancel.reason}"[:4000],
            reducer=self.offer.publisher,
            **self.members(self.participants),
            rounds=self.round,
            metrics={},
            model=None,
            created=now,
        )
        return self.final.take_result(now, result, self.offer.publisher)

    # --- dispatch helpers ---------------------------------------------------------------

    def _before_roster(self, now: float, event: Incoming) -> list[Command] | None:
        """Round messages can arrive before the roster (a fast peer): hold them."""
        if self.roster is not None:
            return None
        if (
            self.early_bytes + event.size <= EARLY_BYTES_PER_TASK
            and len(self.early) < MAX_HELD * 16
        ):
            self.early.append(event)
            self.early_bytes += event.size
        return []

    def on_round_message(self, now: float, event: Incoming) -> list[Command]:
        held = self._before_roster(now, event)
        if held is not None:
            return held
        msg = event.msg
        if isinstance(msg, Progress):
            return self._on_progress(now, msg)
        if isinstance(msg, FinalPartial):
            return self.final.on_partial(now, msg)
        if self.rounds is None:
            return self._observe_round(now, msg)
        if isinstance(msg, RoundUpdate) and isinstance(self.rounds, FedAvgRounds):
            return self.rounds.on_update(now, msg)
        if isinstance(msg, RoundClose) and isinstance(self.rounds, FedAvgRounds):
            return self.rounds.on_close(now, msg)
        if isinstance(msg, UpdateAsk) and isinstance(self.rounds, FedAvgRounds):
            return self.rounds.on_update_ask(now, msg)
        if isinstance(self.rounds, FedAvgRounds) and isinstance(
            msg,
            SliceOffer | SliceAsk | SliceDone | GroupDone | SliceSketch | SketchProof | StageAsk,
        ):
            return self.rounds.on_stage_message(now, msg, event.envelope)
        if isinstance(msg, GossipPush) and isinstance(self.rounds, PushSumRounds):
            return self.rounds.on_push(now, msg)
        return self._refuse(type(msg), f"not part of the {self.offer.protocol} protocol")

    def _observe_round(self, now: float, msg: Any) -> list[Command]:
        """A follower's view of a round (we do not take part)."""
        if isinstance(msg, RoundUpdate) and msg.peer in self.participants:
            state = self.node(msg.peer)
            state.round = msg.round
            state.absorb(msg.metrics)
            state.state = "updated" if msg.status == "ok" else msg.status
            return [
                self.event(
                    EventKind.ROUND,
                    now,
                    f"round {msg.round}: update from {msg.peer[-8:]} ({msg.status})",
                    peer=msg.peer,
                    round=msg.round,
                )
            ]
        if isinstance(msg, RoundClose) and self.may_act(msg.peer):
            self.round = max(self.round, msg.round)
            return [
                self.event(
                    EventKind.CLOSED,
                    now,
                    f"round {msg.round}/{self.offer.rounds} closed with {len(msg.included)} updates",
                    round=msg.round,
                )
            ]
        return []

    def _on_progress(self, now: float, progress: Progress) -> list[Command]:
        if progress.peer not in self.participants:
            return []
        state = self.node(progress.peer)
        state.state, state.round = str(progress.state)[:32], progress.round
        state.absorb(progress.metrics)
        metrics = progress.metrics if isinstance(progress.metrics, dict) else {}
        return [
            self.event(
                EventKind.NODE,
                now,
                f"round {progress.round}/{self.offer.rounds} {state.state}",
                peer=progress.peer,
                round=progress.round,
                metrics=metrics,
            )
        ]

    def on_job(self, now: float, event: JobDone | JobFailed) -> list[Command]:
        step = event.token.step
        if step is JobStep.VALIDATE:
            return self.on_validated(now, event)
        if step in (JobStep.FINALIZE, JobStep.REDUCE) or not self.is_training:
            return self.final.on_job(now, event)
        assert self.rounds is not None
        return self.rounds.on_job(now, event)

    def on_blob(self, now: float, event: BlobOutcome) -> list[Command]:
        model = self.offer.model
        if (
            model is not None
            and not self.is_training
            and event.cid == model.cid
            and self.phase is Phase.TRAINING
            and self.round == 1
            and not self.model_ready
        ):
            if not event.ok:
                return self.withdraw(
                    now, f"cannot fetch the model {model.cid[:16]}: {event.reason}"
                )
            self.model_ready = True
            return [self.job(JobStep.TRAIN, {"kind": "train", "round": 1, "weights": model}, 1)]
        out = self.final.on_blob(now, event) if self.final.gathering else []
        if self.rounds is not None:
            out += self.rounds.on_blob(now, event)
        return out

    def on_slice_worked(self, now: float, event: SliceWorked) -> list[Command]:
        if isinstance(self.rounds, FedAvgRounds):
            return self.rounds.on_slice_worked(now, event)
        return []

    def on_aggregated(self, now: float, event: Aggregated) -> list[Command]:
        if event.token.final:
            return self.final.on_merged(now, event)
        if self.rounds is None:
            return []
        return self.rounds.on_aggregated(now, event)

    # --- blob access ----------------------------------------------------------------------

    def holds_blob(self, cid: str) -> bool:
        """`cid` is one of this task's blobs (an update, share, model or the result's)."""
        if self.global_ref is not None and self.global_ref.cid == cid:
            return True
        if self.result is not None and self.result.model is not None:
            if self.result.model.cid == cid:
                return True
        rounds = self.rounds
        if rounds is not None and (
            cid in rounds.owner or any(cid in blobs for blobs in rounds.round_blobs.values())
        ):
            return True
        return any(p.model is not None and p.model.cid == cid for p in self.final.partials.values())

    def may_fetch(self, peer: str, cid: str) -> bool:
        """Roster members may fetch the task's blobs; the publisher also its result model."""
        if peer in self.participants:
            return True
        model = self.result.model if self.result is not None else None
        return model is not None and model.cid == cid and peer == self.offer.publisher

    # --- views ---------------------------------------------------------------------------

    def status(self) -> str:
        if self.result is not None:
            return self.result.status
        if self.phase in (Phase.FAILED, Phase.ERRORED, Phase.EXPIRED):
            return "failed"
        return "running" if self.roster is not None else "pending"

    def summary(self) -> dict[str, Any]:
        result = self.result
        return {
            "task_id": self.task_id,
            "cid": self.offer.cid,
            "name": self.offer.name,
            "version": self.offer.version,
            "range": self.offer.range,
            "rollout": self.offer.rollout,  # [[version, cid, model schema, share]] or None
            "type": self.offer.type,
            "status": self.status(),
            "reason": result.reason if result else self.reason,
            "publisher": self.offer.publisher,
            "coordinator": self.roster.coordinator if self.roster else None,
            "reducer": result.reducer if result else self.acting(),
            "participants": list(self.participants),
            "round": self.round,
            "rounds": self.offer.rounds,
            "protocol": self.offer.protocol,
            "aggregator": self.offer.aggregator,
            "phase": self.phase.value,
            "nodes": {p: s.as_dict() for p, s in sorted(self.nodes.items())},
            "created": self.offer.created,
            "refused": dict(self.refused),
        }

    def result_dict(self) -> dict[str, Any] | None:
        if self.result is None:
            return None
        out = result_dict(self.result, self.result_signer, self.offer)
        if self.result.absent or (self.large and not self.result.participants):
            out["participants"] = sorted(self.contributors(self.result))
        return out

    def members(self, contributors: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """A result's `participants` (or, a large task, `absent`) field: a 10,000-name
        list would not fit one gossip message; the absentees usually do."""
        if not self.large:
            return {"participants": tuple(contributors)}
        included = set(contributors)
        absent = tuple(p for p in self.participants if p not in included)
        if len(absent) > MAX_SKIPPED and len(contributors) <= MAX_SKIPPED:
            return {"participants": tuple(contributors)}
        return {"participants": (), "absent": absent}

    def signed_total(self) -> float:
        """Every participant's signed sample count together (shared by every node of a
        simulation in a large task: it is O(roster))."""
        if self.call is not None:
            return signed_total(self.call, self.participants)
        return float(sum(self.samples.get(p, 0) for p in self.participants))

    def contributors(self, result: TaskResult) -> set[str]:
        if result.participants or not self.large:
            return set(result.participants)
        return set(self.participants) - set(result.absent)


_ACCOUNTING = frozenset({"epsilon", "delta"})
_FRESH = frozenset({Phase.VOLUNTEERED, Phase.INIT, Phase.TRAINING, Phase.OBSERVING})


def _declined_summary(declines: dict[str, str]) -> str:
    """`3 of 3 nodes declined: cannot load src/task.py (2 nodes); no dataset (1 node)`."""
    reasons = Counter(declines.values())
    n = len(declines)
    parts = [f"{why} ({k} node{'s' if k != 1 else ''})" for why, k in sorted(reasons.items())]
    if len(reasons) == 1:
        parts = [next(iter(reasons))]
    return f"{n} of {n} node{'s' if n != 1 else ''} declined: " + "; ".join(parts)


def _key_of(event: Any) -> EventKey:
    if isinstance(event, Incoming):
        return type(event.msg)
    if isinstance(event, TimerFired):
        assert isinstance(event.key, TaskTimer)
        return event.key.kind
    if isinstance(event, JobDone | JobFailed):
        return event.token.step
    if isinstance(event, Aggregated):
        return AggregatedKey
    return type(event)


def _key_name(key: EventKey) -> str:
    if isinstance(key, TimerKind):
        return f"timer:{key.value}"
    if isinstance(key, JobStep):
        return f"job:{key.value}"
    return key.__name__


Handler = Callable[[TaskMachine, float, Any], list[Command]]

# The handler of each event kind (ACCEPTS in core/phase.py says in which phases).
HANDLERS: dict[EventKey, Handler] = {
    Volunteer: TaskMachine.on_volunteer,
    Reveal: TaskMachine.on_reveal,
    Decline: TaskMachine.on_decline,
    Roster: lambda m, now, e: m.on_roster(now, e, e.carried),
    CallPart: TaskMachine.on_call_part,
    RoundUpdate: TaskMachine.on_round_message,
    RoundClose: TaskMachine.on_round_message,
    UpdateAsk: TaskMachine.on_round_message,
    GossipPush: TaskMachine.on_round_message,
    SliceDone: TaskMachine.on_round_message,
    StageAsk: TaskMachine.on_round_message,
    SliceOffer: TaskMachine.on_round_message,
    SliceAsk: TaskMachine.on_round_message,
    GroupDone: TaskMachine.on_round_message,
    SliceSketch: TaskMachine.on_round_message,
    SketchProof: TaskMachine.on_round_message,
    SliceWorked: TaskMachine.on_slice_worked,
    Progress: TaskMachine.on_round_message,
    FinalPartial: TaskMachine.on_round_message,
    TaskResult: TaskMachine.on_result,
    Cancel: TaskMachine.on_cancel,
    PeerLost: TaskMachine.on_peer_lost,
    PeerBack: TaskMachine.on_peer_back,
    TaskpackState: TaskMachine.on_taskpack,
    PolicyRevoked: TaskMachine.on_policy_revoked,
    BlobOutcome: TaskMachine.on_blob,
    AggregatedKey: TaskMachine.on_aggregated,
    **{kind: TaskMachine.on_timer for kind in TimerKind},
    **{step: TaskMachine.on_job for step in JobStep},
}
