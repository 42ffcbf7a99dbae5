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
from typing import Any

from p2pfl.core.commands import (
    CancelTimer,
    Command,
    Log,
    Publish,
    RunJob,
    SetTimer,
)
from p2pfl.core.election import ranked, roster_problem
from p2pfl.core.final import FinalStep
from p2pfl.core.messages import (
    TOPIC_TASKS,
    Decline,
    Roster,
    RoundUpdate,
    Volunteer,
)
from p2pfl.core.rounds import Rounds
from p2pfl.core.task_state import (
    GRACE_S,
    NodeState,
)
from p2pfl.wire import Signed, encode, seal


class TaskMachine(Rounds, FinalStep):
    """One task at one node: the offer, volunteering, the roster, timers and lost peers;
    rounds and the final step come from the mixins (same state, see core/task_state.py)."""

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
        # Cheap tests first: this runs on every volunteer record (N^2 times in a network).
        if early and len(self.volunteers) < self.offer.max_nodes and not self._everyone_answered():
            return []
        order = [p for p in ranked(self.task_id, self.volunteers) if p not in self.dead]
        if not order or order[0] != self.my_id:
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
        self.roster_publish = Publish(TOPIC_TASKS, seal(self.me, roster))
        return [
            self.roster_publish,
            # Once more shortly: a participant that missed it would sit out the task.
            SetTimer(("republish-roster", self.task_id), now + GRACE_S / 2),
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
        if kind == "republish-roster":
            mine = self.roster is not None and self.roster.coordinator == self.my_id
            return [self.roster_publish] if mine and self.roster_publish is not None else []
        if kind == "refetch":
            return self.on_refetch(now, key[2])
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

    def on_peer_back(self, now: float, peer: str) -> list[Command]:
        """A participant we had lost is reachable again (a partition healed, a restart):
        it is expected in the next rounds again. If it missed rounds, the next close it
        receives brings it back in step (on_close jumps to that round)."""
        if peer not in self.dead or peer not in self.participants or self.result is not None:
            return []
        self.dead.discard(peer)
        self.nodes.setdefault(peer, NodeState()).state = "rejoined"
        return [self._event("node", now, "reachable again", peer=peer)]

    # --- rounds (fedavg / fedprox) ----------------------------------------------------

    def on_job_done(self, now: float, token: tuple, result: Any) -> list[Command]:
        step = token[1]
        if step == "validate":
            return self._volunteer(now) if self.phase == "validating" else []
        if step == "init":
            self.global_ref = result
            if result is not None:
                self.round_blobs.setdefault(0, set()).add(result.cid)
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


def new_task_id(cid: str, params: Any, publisher: str, rng: random.Random) -> str:
    import hashlib
    import json

    nonce = rng.getrandbits(64)
    blob = json.dumps([cid, params, publisher, nonce], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
