"""One task as seen by one node: offer -> volunteer -> roster -> rounds -> reduce -> result.

A `TaskMachine` takes events (messages, job outcomes, blobs, timers, peers lost) with the
current time and returns commands; it never performs I/O. One instance exists per task a
node has heard of, whatever its role: publisher, participant, coordinator, reducer or a
mere observer.

Per-participant phases::

    pending -> validating -> volunteered -> (roster) -> init -> training(r) -> closing(r)
      -> aggregating(r) -> evaluating(r) -> [training(r+1) ... ] -> finalizing -> done
    any phase -> failed / done when a signed result arrives

Round rules (fedavg / fedprox): every participant announces its update; the acting
coordinator (first live roster member) publishes a RoundClose naming exactly which updates
make the round, once all live participants have reported or the round deadline passes.
Everyone averages exactly those, sorted by peer id, so honest nodes hold bit-identical
models. gossip: push-sum with `fanout` pseudo-random targets per round, chosen by a hash
that the receivers can recompute, so each node knows whose shares to wait for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from p2pfl.core.commands import (
    Aggregate,
    CancelTimer,
    Command,
    Emit,
    FetchBlob,
    Log,
    Publish,
    RunJob,
    Send,
    SetTimer,
)
from p2pfl.core.election import first_live, ranked, roster_problem
from p2pfl.core.gossip import sources_of, targets_of
from p2pfl.core.messages import (
    TOPIC_TASKS,
    Decline,
    FinalPartial,
    GossipPush,
    Progress,
    Roster,
    RoundClose,
    RoundUpdate,
    TaskOffer,
    TaskResult,
    Volunteer,
)
from p2pfl.identity import Identity
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed, encode, seal

GRACE_S = 2.0  # per rank position, before the next in line takes over a silent duty
REDUCER_CANDIDATES = 3  # final partials go to this many best-ranked live participants


@dataclass
class NodeState:
    """What the task's followers see of one participant."""

    state: str = "volunteered"
    round: int = 0
    loss: float | None = None
    accuracy: float | None = None
    epsilon: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "round": self.round,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "epsilon": self.epsilon,
        }


@dataclass
class LocalContext:
    """What the owning node knows that the task needs (datasets, policy)."""

    datasets: dict[str, int]  # name -> record count
    min_records: int = 10


@dataclass
class TaskMachine:
    offer: TaskOffer
    me: Identity
    local: LocalContext
    created_at: float
    phase: str = "pending"
    reason: str = ""
    volunteers: dict[str, Signed] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    declines: dict[str, str] = field(default_factory=dict)
    roster: Roster | None = None
    dead: set[str] = field(default_factory=set)
    withdrawn: set[str] = field(default_factory=set)
    round: int = 0
    global_ref: BlobRef | None = None
    mass: float = 0.0  # push-sum weight (gossip)
    updates: dict[int, dict[str, RoundUpdate]] = field(default_factory=dict)
    closes: dict[int, RoundClose] = field(default_factory=dict)
    pushes: dict[int, dict[str, GossipPush]] = field(default_factory=dict)
    my_update: dict[int, tuple[BlobRef, int]] = field(default_factory=dict)
    waiting_blobs: set[str] = field(default_factory=set)
    pending_aggregate: Aggregate | None = None
    partials: dict[str, FinalPartial] = field(default_factory=dict)
    reducing: bool = False
    result: TaskResult | None = None
    result_signer: str = ""
    nodes: dict[str, NodeState] = field(default_factory=dict)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    final_sent: bool = False
    connected: set[str] = field(default_factory=set)  # peers the node is connected to
    # True when the driver knows this node is connected to every node of the network (a
    # small full mesh): only then can the roster be made before the volunteer deadline.
    full_mesh: bool = False

    # --- identity of the task -------------------------------------------------------

    @property
    def task_id(self) -> str:
        return self.offer.task_id

    @property
    def my_id(self) -> str:
        return self.me.peer_id

    @property
    def is_training(self) -> bool:
        return self.offer.type == "training"

    @property
    def participants(self) -> tuple[str, ...]:
        return self.roster.participants if self.roster else ()

    @property
    def participating(self) -> bool:
        return self.my_id in self.participants

    def live(self) -> list[str]:
        """Roster members still expected to contribute, in rank order."""
        return [p for p in self.participants if p not in self.dead and p not in self.withdrawn]

    def acting_coordinator(self) -> str | None:
        return first_live(self.participants, self.dead)

    # --- view for followers -----------------------------------------------------------

    def status(self) -> str:
        if self.result is not None:
            return self.result.status
        if self.phase == "failed":
            return "failed"
        return "running" if self.roster is not None else "pending"

    def summary(self) -> dict[str, Any]:
        result = self.result
        return {
            "task_id": self.task_id,
            "cid": self.offer.cid,
            "name": self.offer.name,
            "version": self.offer.version,
            "type": self.offer.type,
            "status": self.status(),
            "reason": result.reason if result else self.reason,
            "publisher": self.offer.publisher,
            "coordinator": self.roster.coordinator if self.roster else None,
            "reducer": result.reducer if result else first_live(self.participants, self.dead),
            "participants": list(self.participants),
            "round": self.round if self.participating else max(self.closes, default=0),
            "rounds": self.offer.rounds,
            "protocol": self.offer.protocol,
            "aggregator": self.offer.aggregator,
            "phase": self.phase,
            "nodes": {p: s.as_dict() for p, s in sorted(self.nodes.items())},
            "created": self.offer.created,
        }

    def result_dict(self) -> dict[str, Any] | None:
        r = self.result
        if r is None:
            return None
        return {
            "task_id": r.task_id,
            "status": r.status,
            "reason": r.reason,
            "participants": list(r.participants),
            "rounds": r.rounds,
            "metrics": r.metrics,
            "model_cid": r.model.cid if r.model else None,
            "reducer": r.reducer,
            "signer": self.result_signer,
            "signature_ok": True,  # unsealed with a valid signature, or it would not be here
            "name": self.offer.name,
            "version": self.offer.version,
            "cid": self.offer.cid,
            "created": r.created,
        }

    def _event(self, kind: str, now: float, message: str = "", **extra: Any) -> Emit:
        event = {"t": now, "kind": kind, "task_id": self.task_id, "message": message}
        event.update(extra)
        event.setdefault("peer", None)
        event.setdefault("round", None)
        event.setdefault("metrics", {})
        event["task"] = self.summary()
        return Emit(event)

    # --- offer and volunteering -------------------------------------------------------

    def start(
        self, now: float, taskpack_status: str | None, taskpack_reason: str = ""
    ) -> list[Command]:
        """The offer arrived (or was made here). Decide whether we can take part."""
        out: list[Command] = [
            SetTimer(("volunteer", self.task_id), self.offer.volunteer_deadline),
            self._event("state", now, f"offered {self.offer.name}@{self.offer.version}"),
        ]
        if self.my_id == self.offer.publisher:
            # The publisher decides failure when nobody coordinates in time.
            out.append(
                SetTimer(
                    ("publisher-watch", self.task_id), self.offer.volunteer_deadline + 3 * GRACE_S
                )
            )
        return out + self.on_taskpack(now, taskpack_status, taskpack_reason)

    def on_taskpack(self, now: float, status: str | None, reason: str = "") -> list[Command]:
        if self.phase != "pending" or status is None or status in ("fetching", "checking"):
            return []
        if status != "verified":
            return self._decline(now, f"taskpack {reason or status}")
        missing = [name for name in self.offer.inputs if name not in self.local.datasets]
        if missing:
            return self._decline(now, f"no local dataset named {', '.join(missing)}")
        if now > self.offer.volunteer_deadline:
            return self._decline(now, "offer expired before the taskpack was verified")
        self.phase = "validating"
        return [RunJob(self.task_id, {"kind": "validate"}, (self.task_id, "validate"))]

    def _decline(self, now: float, reason: str) -> list[Command]:
        self.phase = "declined"
        self.reason = reason
        return [
            Publish(TOPIC_TASKS, seal(self.me, Decline(self.task_id, self.my_id, reason))),
            Log("info", f"task {self.task_id[:12]}: declined: {reason}"),
            self._event("state", now, f"declined: {reason}", peer=self.my_id),
        ]

    def _volunteer(self, now: float) -> list[Command]:
        self.phase = "volunteered"
        samples = sum(self.local.datasets.get(name, 0) for name in self.offer.inputs)
        if self.offer.type == "analysis" and samples < self.local.min_records:
            return self._decline(now, f"fewer than {self.local.min_records} records (k policy)")
        signed = seal(self.me, Volunteer(self.task_id, self.my_id, samples))
        return [Publish(TOPIC_TASKS, signed), Log("info", f"task {self.task_id[:12]}: volunteered")]

    def on_volunteer(self, now: float, vol: Volunteer, signed: Signed) -> list[Command]:
        if vol.peer in self.volunteers or self.result is not None:
            return []
        self.volunteers[vol.peer] = signed
        self.samples[vol.peer] = vol.num_samples
        self.nodes.setdefault(vol.peer, NodeState("volunteered"))
        out = [self._event("node", now, "volunteered", peer=vol.peer)]
        return out + self._maybe_roster(now, early=True)

    def on_decline(self, now: float, decline: Decline) -> list[Command]:
        self.declines[decline.peer] = decline.reason
        return [self._event("node", now, f"declined: {decline.reason}", peer=decline.peer)] + (
            self._maybe_roster(now, early=True)
        )

    # --- roster ----------------------------------------------------------------------

    def _everyone_answered(self) -> bool:
        """True when every peer we are connected to has answered and nobody we do not
        know answered: then we have the whole network's answers already."""
        if not self.full_mesh:
            return False
        answered = set(self.volunteers) | set(self.declines)
        return answered >= self.connected and answered <= self.connected | {self.my_id}

    def _maybe_roster(self, now: float, early: bool) -> list[Command]:
        """Publish the roster if we are the best-ranked live volunteer and the time is right
        (early: before the volunteer deadline, when waiting longer cannot change the pick)."""
        if self.roster is not None or self.result is not None or self.phase != "volunteered":
            return []
        order = [p for p in ranked(self.task_id, self.volunteers) if p not in self.dead]
        if not order or order[0] != self.my_id:
            return []
        if early and not self._everyone_answered() and len(order) < self.offer.max_nodes:
            return []
        if len(order) < self.offer.min_nodes:
            return []  # the publisher's watch declares the failure, with the reason
        chosen = tuple(order[: self.offer.max_nodes])
        all_order = ranked(self.task_id, self.volunteers)
        roster = Roster(
            task_id=self.task_id,
            coordinator=self.my_id,
            epoch=all_order.index(self.my_id),
            participants=chosen,
            volunteers=tuple(encode(self.volunteers[p]) for p in all_order),
        )
        return [
            Publish(TOPIC_TASKS, seal(self.me, roster)),
            Log("info", f"task {self.task_id[:12]}: coordinating {len(chosen)} participants"),
        ]

    def on_roster(
        self, now: float, roster: Roster, signer: str, volunteer_ids: list[str]
    ) -> list[Command]:
        if signer != roster.coordinator:
            return [
                Log(
                    "warning",
                    f"roster for {self.task_id[:12]} signed by {signer}, not its coordinator",
                )
            ]
        problem = roster_problem(
            self.task_id,
            roster.coordinator,
            roster.epoch,
            roster.participants,
            volunteer_ids,
            self.offer.min_nodes,
            self.offer.max_nodes,
        )
        if problem is not None:
            return [
                Log("warning", f"invalid roster for {self.task_id[:12]} from {signer}: {problem}")
            ]
        if self.roster is not None:
            # A better-ranked coordinator's roster wins while nothing has been decided yet.
            better = roster.epoch < self.roster.epoch
            if not better or self.closes or self.round > 1:
                return []
        self.roster = roster
        self.nodes = {p: self.nodes.get(p, NodeState("volunteered")) for p in roster.participants}
        out: list[Command] = [
            CancelTimer(("volunteer", self.task_id)),
            CancelTimer(("publisher-watch", self.task_id)),
            self._event(
                "roster",
                now,
                f"roster: {len(roster.participants)} participants, coordinator {roster.coordinator}",
                peer=roster.coordinator,
            ),
        ]
        if self.participating and self.phase == "volunteered":
            out += self._begin(now)
        elif not self.participating and self.phase in ("volunteered", "validating"):
            self.phase = "observing"
        return out

    def _begin(self, now: float) -> list[Command]:
        self.round = 1
        if self.is_training:
            self.phase = "init"
            return [RunJob(self.task_id, {"kind": "init"}, (self.task_id, "init"))]
        # analysis (and other one-shot types): a single execution, then the final step
        self.phase = "training"
        return [
            RunJob(
                self.task_id,
                {"kind": "train", "round": 1, "weights": None},
                (self.task_id, "train", 1),
            ),
            SetTimer(("round", self.task_id, 1), now + self.offer.round_timeout_s),
        ]

    # --- timers ----------------------------------------------------------------------

    def on_timer(self, now: float, key: tuple) -> list[Command]:
        kind = key[0]
        if self.result is not None:
            return []
        if kind == "volunteer":
            out = self._maybe_roster(now, early=False)
            if self.roster is None and self.phase == "volunteered":
                out.append(SetTimer(("roster-takeover", self.task_id), now + GRACE_S))
            return out
        if kind == "roster-takeover":
            # The best-ranked live volunteer stayed silent: treat it as gone; the next in
            # rank (perhaps us) publishes the roster. Everyone does this in step.
            if self.roster is not None or self.phase != "volunteered":
                return []
            order = [p for p in ranked(self.task_id, self.volunteers) if p not in self.dead]
            if order and order[0] != self.my_id:
                self.dead.add(order[0])
            out = self._maybe_roster(now, early=False)
            if self.roster is None and len(order) > 1:
                out.append(SetTimer(("roster-takeover", self.task_id), now + GRACE_S))
            return out
        if kind == "publisher-watch":
            if self.roster is None:
                n = len(self.volunteers)
                if n < self.offer.min_nodes:
                    why = f"only {n} volunteer{'s' if n != 1 else ''} by the deadline; min_nodes is {self.offer.min_nodes}"
                else:
                    why = f"no valid roster from the {n} volunteers by the deadline"
                return self._fail(now, why)
            return []
        if kind == "round":
            return self._on_round_deadline(now, key[2])
        if kind == "reduce":
            return self._maybe_reduce(now, deadline_passed=True)
        if kind == "reclose":
            if key[2] == self.round and self.phase == "aggregating":
                return self._fail(now, f"round {key[2]}: an included update stayed unfetchable")
            return []
        return []

    # --- peers -----------------------------------------------------------------------

    def on_peer_lost(self, now: float, peer: str) -> list[Command]:
        if peer not in self.participants or peer in self.dead or self.result is not None:
            if peer in self.volunteers and self.roster is None:
                self.dead.add(peer)
            return []
        self.dead.add(peer)
        self.nodes.setdefault(peer, NodeState()).state = "lost"
        out: list[Command] = [self._event("node", now, "lost (peer unreachable)", peer=peer)]
        if not self.participating:
            return out
        out += self._check_round_complete(now)
        out += self._maybe_reduce(now, deadline_passed=False)
        return out

    # --- rounds (fedavg / fedprox) ----------------------------------------------------

    def on_job_done(self, now: float, token: tuple, result: Any) -> list[Command]:
        step = token[1]
        if step == "validate":
            return self._volunteer(now) if self.phase == "validating" else []
        if step == "init":
            self.global_ref = result
            return self._train(now, 1)
        if step == "train":
            return self._on_trained(now, token[2], result)
        if step == "evaluate":
            return self._on_evaluated(now, token[2], result)
        if step == "finalize":
            return self._send_partial(now, result)
        if step == "reduce":
            return self._publish_result(now, "succeeded", "", result)
        return []

    def on_job_failed(self, now: float, token: tuple, reason: str) -> list[Command]:
        step = token[1]
        log = Log("warning", f"task {self.task_id[:12]}: {step} failed: {reason}")
        if step == "validate":
            return [log] + self._decline(now, f"validate_inputs refused: {reason}")
        if step == "init":
            return [log] + self._fail(now, f"initial weights failed: {reason}")
        if step == "train":
            rnd = token[2]
            status = "withdrawn" if "budget" in reason else "failed"
            self.nodes.setdefault(self.my_id, NodeState()).state = status
            update = RoundUpdate(
                self.task_id, rnd, self.my_id, None, 0, {"error": reason[:200]}, status
            )
            out: list[Command] = [
                log,
                self._event(
                    "node", now, f"round {rnd} {status}: {reason}", peer=self.my_id, round=rnd
                ),
            ]
            if self.offer.type != "training":
                return out + self._send_partial_refused(now, f"execution failed: {reason}")
            if self.offer.protocol == "gossip":
                return out + self._gossip_send(now, rnd, None, 0)
            return out + [Publish(TOPIC_TASKS, update)]
        if step == "evaluate":
            return [log] + self._on_evaluated(now, token[2], {})
        if step == "finalize":
            return [log] + self._send_partial_refused(now, f"postprocess failed: {reason}")
        if step == "reduce":
            return [log] + self._publish_result(now, "failed", f"reduce failed: {reason}", {})
        return [log]

    def _train(self, now: float, rnd: int) -> list[Command]:
        self.round = rnd
        self.phase = "training"
        state = self.nodes.setdefault(self.my_id, NodeState())
        state.state, state.round = "training", rnd
        return [
            RunJob(
                self.task_id,
                {"kind": "train", "round": rnd, "weights": self.global_ref},
                (self.task_id, "train", rnd),
            ),
            SetTimer(("round", self.task_id, rnd), now + self.offer.round_timeout_s),
            Send(self.offer.publisher, Progress(self.task_id, self.my_id, rnd, "training", {}))
            if self.offer.publisher != self.my_id
            else self._event("node", now, f"round {rnd}: training", peer=self.my_id, round=rnd),
        ]

    def _on_trained(self, now: float, rnd: int, result: dict[str, Any]) -> list[Command]:
        if self.offer.type != "training":
            return self._after_analysis(now, result)
        if rnd != self.round or rnd in self.closes and self.offer.protocol != "gossip":
            return []  # a straggler's own late update: the round went on without it
        ref: BlobRef | None = result.get("ref")
        n = int(result.get("num_samples", 0))
        metrics = dict(result.get("metrics") or {})
        if ref is not None:
            self.my_update[rnd] = (ref, n)
        state = self.nodes.setdefault(self.my_id, NodeState())
        state.loss = metrics.get("loss", state.loss)
        state.epsilon = metrics.get("epsilon", state.epsilon)
        state.state = "waiting"
        if self.offer.protocol == "gossip":
            return self._gossip_send(now, rnd, ref, n)
        update = RoundUpdate(
            self.task_id, rnd, self.my_id, ref, n, metrics, "ok" if ref else "failed"
        )
        return [Publish(TOPIC_TASKS, update)]

    def on_update(self, now: float, update: RoundUpdate) -> list[Command]:
        if update.peer not in self.participants:
            return []
        self.updates.setdefault(update.round, {})[update.peer] = update
        if update.status == "withdrawn":
            self.withdrawn.add(update.peer)
        state = self.nodes.setdefault(update.peer, NodeState())
        state.round = update.round
        if isinstance(update.metrics, dict):
            state.loss = update.metrics.get("loss", state.loss)
            state.epsilon = update.metrics.get("epsilon", state.epsilon)
        state.state = "updated" if update.status == "ok" else update.status
        out = [
            self._event(
                "round",
                now,
                f"round {update.round}: update from {update.peer[-8:]} ({update.status})",
                peer=update.peer,
                round=update.round,
                metrics=update.metrics if isinstance(update.metrics, dict) else {},
            )
        ]
        if self.participating:
            out += self._check_round_complete(now)
        return out

    def _is_closer(self) -> bool:
        return self.acting_coordinator() == self.my_id

    def _check_round_complete(self, now: float) -> list[Command]:
        if self.offer.type != "training":
            return self._maybe_reduce(now, deadline_passed=False)
        if self.offer.protocol == "gossip":
            return self._gossip_maybe_merge(now, self.round, deadline_passed=False)
        rnd = self.round
        if not self._is_closer() or rnd in self.closes or rnd < 1:
            return []
        got = self.updates.get(rnd, {})
        waiting = [p for p in self.live() if p not in got]
        if waiting:
            return []
        return self._close(now, rnd)

    def _on_round_deadline(self, now: float, rnd: int) -> list[Command]:
        if self.offer.type != "training":
            return self._maybe_reduce(now, deadline_passed=True)
        if self.offer.protocol == "gossip":
            return self._gossip_maybe_merge(now, rnd, deadline_passed=True)
        if rnd in self.closes or rnd != self.round:
            return []
        # Silent closer: every participant waits its own rank's grace before stepping in.
        live = self.live()
        position = live.index(self.my_id) if self.my_id in live else len(live)
        coordinator = self.acting_coordinator()
        if coordinator != self.my_id and position > 0:
            if coordinator is not None and position == 1:
                self.dead.add(coordinator)  # it let the deadline pass: treat as gone
                return [
                    Log(
                        "warning",
                        f"task {self.task_id[:12]}: coordinator silent, taking over round {rnd}",
                    )
                ] + self._close(now, rnd)
            return [SetTimer(("round", self.task_id, rnd), now + GRACE_S)]
        return self._close(now, rnd)

    def _close(self, now: float, rnd: int) -> list[Command]:
        got = self.updates.get(rnd, {})
        included = tuple(
            sorted(p for p, u in got.items() if u.status == "ok" and u.ref is not None)
        )
        live_count = len([p for p in self.participants if p not in self.dead])
        if live_count < self.offer.min_nodes:
            return self._fail(
                now, f"fewer than min_nodes ({self.offer.min_nodes}) participants remain"
            )
        if not included:
            return self._fail(now, f"round {rnd}: no update arrived")
        late = tuple(sorted(p for p in self.participants if p not in got and p not in self.dead))
        close = RoundClose(self.task_id, rnd, self.my_id, included, tuple(sorted(self.dead)) + late)
        return [Publish(TOPIC_TASKS, close)]

    def on_close(self, now: float, close: RoundClose) -> list[Command]:
        if close.peer not in self.participants:
            return []
        previous = self.closes.get(close.round)
        if previous is not None:
            # Only a re-close of the round we are still assembling replaces the first one.
            redo = (
                close.attempt > previous.attempt
                and close.round == self.round
                and self.phase == "aggregating"
            )
            if not redo:
                return []
        self.closes[close.round] = close
        for peer in close.dead:
            if peer != self.my_id and peer in self.participants and close.peer != peer:
                self.dead.add(peer)
        out: list[Command] = [
            CancelTimer(("round", self.task_id, close.round)),
            CancelTimer(("reclose", self.task_id, close.round)),
            self._event(
                "round",
                now,
                f"round {close.round}/{self.offer.rounds} closed with {len(close.included)} updates",
                round=close.round,
            ),
        ]
        if not self.participating or self.phase in ("done", "failed", "finalizing"):
            return out
        if close.round < self.round:
            return out
        # Straggler or not: this close defines the round for everyone.
        self.round = close.round
        updates = self.updates.get(close.round, {})
        refs, weights = [], []
        for peer in close.included:
            update = updates.get(peer)
            if update is None or update.ref is None:
                # We have not seen that update's announcement: it cannot be averaged.
                return out + self._fail(
                    now, f"round {close.round}: missing announced update of {peer}"
                )
            refs.append(update.ref)
            weights.append(float(update.num_samples))
        agg = Aggregate(
            self.task_id,
            close.round,
            tuple(refs),
            tuple(weights),
            self.offer.aggregator,
            self._aggregator_options(len(refs)),
            (self.task_id, "aggregate", close.round, close.attempt),
        )
        return out + self._fetch_then(
            agg, {u.ref.cid: u.peer for u in (updates[p] for p in close.included)}
        )

    def _aggregator_options(self, n: int) -> dict[str, Any]:
        params = self.offer.params if isinstance(self.offer.params, dict) else {}
        if self.offer.aggregator == "krum":
            f = int(params.get("krum_f", max(0, (n - 3) // 2)))
            return {"f": min(f, max(0, (n - 3) // 2))}
        if self.offer.aggregator == "trimmed_mean":
            return {"beta": float(params.get("trim_beta", 0.1))}
        return {}

    def _fetch_then(self, agg: Aggregate, providers: dict[str, str]) -> list[Command]:
        """Fetch every blob of `agg` we lack, then aggregate (on BlobReady)."""
        self.phase = "aggregating"
        self.pending_aggregate = agg
        self.waiting_blobs = {ref.cid for ref in agg.refs}
        out: list[Command] = []
        for ref in agg.refs:
            provider = providers.get(ref.cid)
            peers = tuple(p for p in (provider,) if p and p != self.my_id)
            out.append(FetchBlob(ref, peers))
        return out

    def on_blob(self, now: float, cid: str, ok: bool, reason: str = "") -> list[Command]:
        if cid not in self.waiting_blobs or self.pending_aggregate is None:
            return []
        if not ok:
            return self._unfetchable(now, cid, reason)
        self.waiting_blobs.discard(cid)
        if self.waiting_blobs:
            return []
        agg, self.pending_aggregate = self.pending_aggregate, None
        return [agg]

    def _unfetchable(self, now: float, cid: str, reason: str) -> list[Command]:
        """An included update cannot be fetched (its author died before anyone copied it).

        fedavg: the acting coordinator re-closes the round without it; everyone else waits
        for that re-close until a deadline. gossip: the share is simply left out."""
        rnd = self.round
        close = self.closes.get(rnd)
        if self.offer.protocol == "gossip" or close is None:
            return self._fail(now, f"could not fetch update {cid[:16]}: {reason}")
        authors = {u.ref.cid: p for p, u in self.updates.get(rnd, {}).items() if u.ref is not None}
        lost = authors.get(cid)
        if lost is not None and lost != self.my_id:
            self.dead.add(lost)
        if not self._is_closer():
            return [
                Log(
                    "warning",
                    f"task {self.task_id[:12]}: update {cid[:16]} of round {rnd} unfetchable ({reason}); waiting for a re-close",
                ),
                SetTimer(("reclose", self.task_id, rnd), now + self.offer.round_timeout_s),
            ]
        included = tuple(p for p in close.included if p not in self.dead)
        if (
            len(included) < 1
            or len([p for p in self.participants if p not in self.dead]) < self.offer.min_nodes
        ):
            return self._fail(now, f"round {rnd}: too few fetchable updates remain")
        redo = RoundClose(
            self.task_id, rnd, self.my_id, included, tuple(sorted(self.dead)), close.attempt + 1
        )
        return [
            Log("warning", f"task {self.task_id[:12]}: re-closing round {rnd} without {lost}"),
            Publish(TOPIC_TASKS, redo),
        ]

    def on_aggregated(
        self, now: float, token: tuple, ref: BlobRef | None, reason: str
    ) -> list[Command]:
        rnd = token[2]
        attempt = token[3] if len(token) > 3 else 0
        close = self.closes.get(rnd)
        if (
            rnd != self.round
            or self.phase != "aggregating"
            or (close is not None and close.attempt != attempt)
        ):
            return []  # superseded by a re-close of the round
        if ref is None:
            return self._fail(now, f"round {rnd}: aggregation failed: {reason}")
        self.global_ref = ref
        self.phase = "evaluating"
        state = self.nodes.setdefault(self.my_id, NodeState())
        state.state, state.round = "evaluating", rnd
        return [
            RunJob(
                self.task_id,
                {"kind": "evaluate", "round": rnd, "weights": ref},
                (self.task_id, "evaluate", rnd),
            )
        ]

    def _on_evaluated(self, now: float, rnd: int, metrics: dict[str, Any]) -> list[Command]:
        state = self.nodes.setdefault(self.my_id, NodeState())
        state.accuracy = metrics.get("accuracy", state.accuracy)
        if "loss" in metrics:
            state.loss = metrics["loss"]
        self.last_metrics = dict(metrics)
        progress_metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if state.epsilon is not None:
            progress_metrics["epsilon"] = state.epsilon
        out: list[Command] = [
            self._event(
                "node",
                now,
                f"round {rnd}/{self.offer.rounds}: " + _fmt_metrics(progress_metrics),
                peer=self.my_id,
                round=rnd,
                metrics={
                    **progress_metrics,
                    "model_cid": self.global_ref.cid if self.global_ref else None,
                },
            )
        ]
        if self.offer.publisher != self.my_id:
            out.append(
                Send(
                    self.offer.publisher,
                    Progress(self.task_id, self.my_id, rnd, "evaluated", progress_metrics),
                )
            )
        if rnd < self.offer.rounds and self.my_id not in self.withdrawn:
            return out + self._train(now, rnd + 1)
        return out + self._finalize(now)

    def on_progress(self, now: float, progress: Progress) -> list[Command]:
        if progress.peer not in self.participants:
            return []
        state = self.nodes.setdefault(progress.peer, NodeState())
        state.state, state.round = progress.state, progress.round
        metrics = progress.metrics if isinstance(progress.metrics, dict) else {}
        state.loss = metrics.get("loss", state.loss)
        state.accuracy = metrics.get("accuracy", state.accuracy)
        state.epsilon = metrics.get("epsilon", state.epsilon)
        return [
            self._event(
                "node",
                now,
                f"round {progress.round}/{self.offer.rounds} {progress.state}"
                + (": " + _fmt_metrics(metrics) if metrics else ""),
                peer=progress.peer,
                round=progress.round,
                metrics=metrics,
            )
        ]

    # --- gossip (push-sum) --------------------------------------------------------------

    def _gossip_send(self, now: float, rnd: int, ref: BlobRef | None, n: int) -> list[Command]:
        if rnd == 1:
            self.mass = float(max(n, 1))
        live = self.live()
        fanout = max(1, min(self.offer.fanout, len(live) - 1))
        targets = targets_of(self.task_id, rnd, self.my_id, live, fanout) if len(live) > 1 else ()
        share = self.mass / (len(targets) + 1)
        self.mass = share  # the share we keep
        own = GossipPush(self.task_id, rnd, self.my_id, ref, share if ref else 0.0)
        self.pushes.setdefault(rnd, {})[self.my_id] = own
        out: list[Command] = [
            Send(t, GossipPush(self.task_id, rnd, self.my_id, ref, share if ref else 0.0))
            for t in targets
        ]
        if self.offer.publisher != self.my_id:
            out.append(
                Send(self.offer.publisher, Progress(self.task_id, self.my_id, rnd, "pushed", {}))
            )
        return out + self._gossip_maybe_merge(now, rnd, deadline_passed=False)

    def on_push(self, now: float, push: GossipPush) -> list[Command]:
        if push.peer not in self.participants or not self.participating:
            return []
        self.pushes.setdefault(push.round, {})[push.peer] = push
        return self._gossip_maybe_merge(now, push.round, deadline_passed=False)

    def _gossip_maybe_merge(self, now: float, rnd: int, deadline_passed: bool) -> list[Command]:
        if (
            rnd != self.round
            or self.phase != "training"
            or self.my_id not in self.pushes.get(rnd, {})
        ):
            return []
        got = self.pushes.get(rnd, {})
        live = self.live()
        fanout = max(1, min(self.offer.fanout, len(live) - 1))
        sources = sources_of(self.task_id, rnd, self.my_id, live, fanout) if len(live) > 1 else ()
        missing = [p for p in sources if p not in got and p not in self.dead]
        if missing and not deadline_passed:
            return []
        shares = [got[p] for p in sorted(got) if got[p].ref is not None and got[p].mass > 0]
        if not shares:
            return self._fail(now, f"round {rnd}: no model to merge")
        self.mass = sum(s.mass for s in shares)
        agg = Aggregate(
            self.task_id,
            rnd,
            tuple(s.ref for s in shares if s.ref is not None),
            tuple(s.mass for s in shares),
            "fedavg",
            {},
            (self.task_id, "aggregate", rnd),
        )
        self.closes[rnd] = RoundClose(self.task_id, rnd, self.my_id, tuple(s.peer for s in shares))
        return [CancelTimer(("round", self.task_id, rnd))] + self._fetch_then(
            agg, {s.ref.cid: s.peer for s in shares if s.ref is not None}
        )

    # --- final step ---------------------------------------------------------------------

    def _finalize(self, now: float) -> list[Command]:
        self.phase = "finalizing"
        metrics = {k: v for k, v in self.last_metrics.items() if isinstance(v, int | float)}
        n = int(metrics.pop("num_samples", self.samples.get(self.my_id, 0)))
        state = self.nodes.setdefault(self.my_id, NodeState())
        state.state = "final"
        return [
            RunJob(
                self.task_id,
                {"kind": "finalize", "num_samples": n, "metrics": metrics, "aggregates": {}},
                (self.task_id, "finalize"),
            )
        ]

    def _after_analysis(self, now: float, result: dict[str, Any]) -> list[Command]:
        n = int(result.get("num_samples", 0))
        if n < self.local.min_records:
            return self._send_partial_refused(
                now, f"fewer than {self.local.min_records} records (k policy): not released"
            )
        self.phase = "finalizing"
        return [
            RunJob(
                self.task_id,
                {
                    "kind": "finalize",
                    "num_samples": n,
                    "metrics": dict(result.get("metrics") or {}),
                    "aggregates": dict(result.get("aggregates") or {}),
                },
                (self.task_id, "finalize"),
            )
        ]

    def _reducer_candidates(self) -> list[str]:
        return [p for p in self.participants if p not in self.dead][:REDUCER_CANDIDATES]

    def _send_partial(self, now: float, partial: Any) -> list[Command]:
        msg = FinalPartial(
            self.task_id,
            self.my_id,
            int(partial.num_samples),
            dict(partial.metrics),
            dict(partial.aggregates),
            self.global_ref if self.is_training else None,
        )
        return self._deliver_partial(now, msg)

    def _send_partial_refused(self, now: float, reason: str) -> list[Command]:
        msg = FinalPartial(self.task_id, self.my_id, 0, {}, {}, None, refused=reason)
        return [Log("info", f"task {self.task_id[:12]}: {reason}")] + self._deliver_partial(
            now, msg
        )

    def _deliver_partial(self, now: float, msg: FinalPartial) -> list[Command]:
        if self.final_sent:
            return []
        self.final_sent = True
        self.phase = "done-local"
        self.nodes.setdefault(self.my_id, NodeState()).state = "refused" if msg.refused else "final"
        out: list[Command] = [CancelTimer(("round", self.task_id, self.round))]
        for peer in self._reducer_candidates():
            if peer != self.my_id:
                out.append(Send(peer, msg))
        if self.offer.publisher != self.my_id:
            out.append(
                Send(
                    self.offer.publisher,
                    Progress(self.task_id, self.my_id, self.round, "final", {}),
                )
            )
        out += self.on_partial(now, msg)
        # Reducer failover: candidates further down wait a little longer each.
        candidates = self._reducer_candidates()
        if self.my_id in candidates:
            pos = candidates.index(self.my_id)
            out.append(
                SetTimer(("reduce", self.task_id), now + self.offer.round_timeout_s + pos * GRACE_S)
            )
        return out

    def on_partial(self, now: float, partial: FinalPartial) -> list[Command]:
        if partial.peer not in self.participants or partial.peer in self.partials:
            return []
        self.partials[partial.peer] = partial
        return self._maybe_reduce(now, deadline_passed=False)

    def _maybe_reduce(self, now: float, deadline_passed: bool) -> list[Command]:
        if self.reducing or self.result is not None or not self.participating:
            return []
        if self.my_id not in self.partials:
            return []  # we reduce only after our own final step
        reducer = first_live(self.participants, self.dead)
        if reducer != self.my_id and not deadline_passed:
            return []
        if reducer != self.my_id and deadline_passed:
            candidates = self._reducer_candidates()
            if self.my_id not in candidates:
                return []
        waiting = [p for p in self.participants if p not in self.dead and p not in self.partials]
        if waiting and not deadline_passed:
            return []
        usable = [p for p in self.partials.values() if not p.refused]
        if len(usable) < min(self.offer.min_nodes, len(self.participants)):
            refused = [f"{p.peer[-8:]}: {p.refused}" for p in self.partials.values() if p.refused]
            return self._fail(
                now,
                f"only {len(usable)} usable partials (min_nodes {self.offer.min_nodes})"
                + (f"; refused: {'; '.join(refused)}" if refused else ""),
            )
        self.reducing = True
        partials = [
            {
                "node": p.peer,
                "num_samples": p.num_samples,
                "metrics": p.metrics,
                "aggregates": p.aggregates,
            }
            for p in sorted(usable, key=lambda p: p.peer)
        ]
        return [
            Log("info", f"task {self.task_id[:12]}: reducing {len(partials)} partials"),
            RunJob(
                self.task_id, {"kind": "reduce", "partials": partials}, (self.task_id, "reduce")
            ),
        ]

    def _publish_result(
        self, now: float, status: str, reason: str, metrics: dict[str, Any]
    ) -> list[Command]:
        if self.result is not None:
            return []
        contributors = tuple(sorted(p.peer for p in self.partials.values() if not p.refused))
        result = TaskResult(
            task_id=self.task_id,
            status=status,
            reason=reason,
            reducer=self.my_id,
            participants=contributors or self.participants,
            rounds=self.round if self.is_training else 1,
            metrics=_jsonable(metrics),
            model=self.global_ref if self.is_training else None,
            created=now,
        )
        return [Publish(TOPIC_TASKS, seal(self.me, result))]

    def _fail(self, now: float, reason: str) -> list[Command]:
        if self.result is not None or self.phase == "failed":
            return []
        self.phase = "failed"
        self.reason = reason
        result = TaskResult(
            task_id=self.task_id,
            status="failed",
            reason=reason,
            reducer=self.my_id,
            participants=self.participants,
            rounds=self.round,
            metrics={},
            model=None,
            created=now,
        )
        return [
            Log("warning", f"task {self.task_id[:12]} failed: {reason}"),
            Publish(TOPIC_TASKS, seal(self.me, result)),
        ]

    def on_result(self, now: float, result: TaskResult, signer: str) -> list[Command]:
        allowed = set(self.participants) | {self.offer.publisher}
        if signer not in allowed:
            return [Log("warning", f"result for {self.task_id[:12]} signed by outsider {signer}")]
        if self.result is not None:
            return []
        self.result = result
        self.result_signer = signer
        self.phase = "done" if result.status == "succeeded" else "failed"
        self.reason = result.reason
        kind = "result" if result.status == "succeeded" else "failed"
        out: list[Command] = [
            CancelTimer(("reduce", self.task_id)),
            CancelTimer(("round", self.task_id, self.round)),
            CancelTimer(("volunteer", self.task_id)),
            CancelTimer(("publisher-watch", self.task_id)),
            self._event(
                kind,
                now,
                f"{result.status}"
                + (f": {result.reason}" if result.reason else "")
                + (" " + _fmt_metrics(result.metrics) if isinstance(result.metrics, dict) else ""),
                peer=result.reducer,
                metrics=result.metrics if isinstance(result.metrics, dict) else {},
            ),
        ]
        if result.model is not None and self.my_id == self.offer.publisher:
            out.append(FetchBlob(result.model, (result.reducer,)))
        return out


def _fmt_metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return ""
    parts = []
    for key in ("loss", "accuracy", "epsilon", "mean", "count"):
        value = metrics.get(key)
        if isinstance(value, int | float):
            parts.append(f"{key}={value:.4g}")
    return " ".join(parts)


def _jsonable(value: Any) -> Any:
    """Reduce output as msgpack-native values (numpy scalars and arrays become Python)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def new_task_id(cid: str, params: Any, publisher: str, rng: random.Random) -> str:
    import hashlib
    import json

    nonce = rng.getrandbits(64)
    blob = json.dumps([cid, params, publisher, nonce], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
