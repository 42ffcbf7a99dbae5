"""The final step of one task at one node: partials, reduce, the signed result.

Each participant sends its final partial directly to the best-ranked live participants;
the first live one runs the taskpack's `reduce` and publishes the signed TaskResult. If it
dies or stays silent, the next candidate reduces after a deadline. A result counts only
from the participant whose duty it is in this node's view; one from a lower-ranked
participant is held until this node's deadlines have passed the ranks above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pfl.core.commands import (
    Aggregate,
    Aggregated,
    CancelTimer,
    Command,
    EventKind,
    FetchBlob,
    JobDone,
    JobFailed,
    Log,
    Publish,
    Send,
    SetTimer,
)
from p2pfl.core.gather import Gather
from p2pfl.core.messages import TOPIC_TASKS, FinalPartial, Progress, TaskResult
from p2pfl.core.phase import BlobOutcome, Phase
from p2pfl.core.rounds_base import RoundsBase
from p2pfl.core.tokens import AggToken, JobStep, TimerKind
from p2pfl.core.versions import by_version
from p2pfl.core.view import NodeState, jsonable
from p2pfl.limits import blob_too_big
from p2pfl.wire import seal

if TYPE_CHECKING:
    from p2pfl.core.task import TaskMachine

GRACE_S = 2.0
REDUCER_CANDIDATES = 3  # final partials go to this many best-ranked live participants
# Our partial goes to the candidates again every GRACE_S until a result comes, this many
# times at most: it is a direct message, and one lost on the way used to leave a reducer
# short of partials at its deadline (the task failed under a lossy link).
PARTIAL_RESENDS = 3


class FinalStep:
    def __init__(self, task: TaskMachine) -> None:
        self.task = task
        self.partials: dict[str, FinalPartial] = {}
        self.sent = False
        self.resent = 0  # times our partial went out again (PARTIAL_RESENDS)
        self.reducing = False
        self.merge = ""  # gossip reducer: "" -> "merging" -> "merged" (or "skipped")
        self.gather: Gather | None = None
        self.held: dict[str, TaskResult] = {}  # results not (yet) from the duty
        self.cap: float | None = None  # all participants' signed counts together

    @property
    def gathering(self) -> bool:
        return self.gather is not None

    # --- our partial ---------------------------------------------------------------------

    def finalize(self, now: float) -> list[Command]:
        task = self.task
        task.phase = Phase.FINALIZING
        metrics = {k: v for k, v in task.last_metrics.items() if isinstance(v, int | float)}
        n = int(metrics.pop("num_samples", task.samples.get(task.my_id, 0)))
        task.node(task.my_id).state = "final"
        job = {"kind": "finalize", "num_samples": n, "metrics": metrics, "aggregates": {}}
        return [task.job(JobStep.FINALIZE, job)]

    def on_job(self, now: float, event: JobDone | JobFailed) -> list[Command]:
        task = self.task
        step = event.token.step
        if isinstance(event, JobFailed):
            if step is JobStep.TRAIN:  # analysis: the one execution
                return self._send_refused(now, f"execution failed: {event.reason}")
            if step is JobStep.FINALIZE:
                return self._send_refused(now, f"postprocess failed: {event.reason}")
            if step is JobStep.REDUCE:
                return task.fail(now, f"reduce failed: {event.reason}")
            return []
        if step is JobStep.TRAIN:
            return self._after_analysis(now, event.result)
        if step is JobStep.FINALIZE:
            return self._send_partial(now, event.result)
        if step is JobStep.REDUCE:
            return self._publish_result(now, event.result)
        return []

    def _after_analysis(self, now: float, result: dict[str, Any]) -> list[Command]:
        task = self.task
        n = min(int(result.get("num_samples", 0)), task.samples.get(task.my_id, 0))
        if n < task.k:
            why = f"fewer than {task.k} records (k policy): not released"
            return self._send_refused(now, why)
        task.phase = Phase.FINALIZING
        job = {
            "kind": "finalize",
            "num_samples": n,
            "metrics": dict(result.get("metrics") or {}),
            "aggregates": dict(result.get("aggregates") or {}),
        }
        return [task.job(JobStep.FINALIZE, job)]

    def _candidates(self) -> list[str]:
        return list(self.task.live()[:REDUCER_CANDIDATES])

    def _send_partial(self, now: float, partial: Any) -> list[Command]:
        task = self.task
        rounds = task.rounds
        msg = FinalPartial(
            task.task_id,
            task.my_id,
            min(int(partial.num_samples), task.samples.get(task.my_id, 0)),
            jsonable(
                task.shareable(partial.metrics) if task.is_training else dict(partial.metrics)
            ),
            jsonable(dict(partial.aggregates)),
            task.global_ref if task.is_training else None,
            mass=getattr(rounds, "mass", 0.0) if task.offer.protocol == "gossip" else 0.0,
        )
        return self._deliver(now, msg)

    def _send_refused(self, now: float, reason: str) -> list[Command]:
        task = self.task
        msg = FinalPartial(task.task_id, task.my_id, 0, {}, {}, None, refused=reason[:2000])
        return [Log("info", f"task {task.task_id[:12]}: {reason}")] + self._deliver(now, msg)

    def _deliver(self, now: float, msg: FinalPartial) -> list[Command]:
        task = self.task
        if self.sent:
            return []
        self.sent = True
        task.phase = Phase.REDUCING
        task.node(task.my_id).state = "refused" if msg.refused else "final"
        out: list[Command] = [CancelTimer(task.timer(TimerKind.ROUND, task.round))]
        out += [Send(peer, msg) for peer in self._candidates() if peer != task.my_id]
        out.append(SetTimer(task.timer(TimerKind.PARTIAL), now + GRACE_S))
        if task.offer.publisher != task.my_id:
            progress = Progress(task.task_id, task.my_id, task.round, "final", {})
            out.append(Send(task.offer.publisher, progress))
        out += self.on_partial(now, msg)
        # Every participant keeps a deadline for the result: past it, the duty moves down
        # one rank per grace period (and a held result from the next in rank counts).
        out.append(SetTimer(task.timer(TimerKind.REDUCE), now + task.offer.round_timeout_s))
        return out

    def resend(self, now: float) -> list[Command]:
        """No result yet: our partial once more to the (current) candidates, bounded."""
        task = self.task
        mine = self.partials.get(task.my_id)
        if task.result is not None or mine is None or self.resent >= PARTIAL_RESENDS:
            return []
        self.resent += 1
        out: list[Command] = [Send(p, mine) for p in self._candidates() if p != task.my_id]
        return out + [SetTimer(task.timer(TimerKind.PARTIAL), now + GRACE_S)]

    # --- the reducer ---------------------------------------------------------------------

    def on_partial(self, now: float, partial: FinalPartial) -> list[Command]:
        task = self.task
        if partial.peer not in task.participants or partial.peer in self.partials:
            return []
        if partial.model is not None and blob_too_big("update", partial.model.size):
            return [
                Log(
                    "warning",
                    f"task {task.task_id[:12]}: oversize final model from {partial.peer[-8:]}",
                )
            ]
        if self.cap is None:  # the roster is fixed: sum once, not per partial (O(N) each)
            self.cap = task.signed_total()
        cap = self.cap
        if partial.mass > cap or partial.num_samples > task.samples.get(partial.peer, 0):
            return [
                Log(
                    "warning",
                    f"task {task.task_id[:12]}: partial of {partial.peer[-8:]} claims more than its signed record",
                )
            ]
        self.partials[partial.peer] = partial
        return self._maybe_reduce(now, deadline_passed=False)

    def _maybe_reduce(self, now: float, deadline_passed: bool) -> list[Command]:
        task = self.task
        if self.reducing or task.result is not None or not task.participating:
            return []
        if task.my_id not in self.partials:
            return []  # we reduce only after our own final step
        if task.acting() != task.my_id:
            return []
        live = task.live()
        if not deadline_passed and len(self.partials) < len(live):
            return []  # someone live has not sent one yet (O(1): asked on every partial)
        waiting = [p for p in live if p not in self.partials]
        if waiting and not deadline_passed:
            return []
        usable = [p for p in self.partials.values() if not p.refused]
        if len(usable) < min(task.offer.min_nodes, len(task.participants)):
            refused = [f"{p.peer[-8:]}: {p.refused}" for p in self.partials.values() if p.refused]
            why = f"only {len(usable)} usable partials (min_nodes {task.offer.min_nodes})"
            return task.fail(now, why + (f"; refused: {'; '.join(refused)}" if refused else ""))
        if task.offer.protocol == "gossip" and task.is_training and self.merge in ("", "merging"):
            return self._merge_final_models(now, usable)
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
            Log("info", f"task {task.task_id[:12]}: reducing {len(partials)} partials"),
            task.job(JobStep.REDUCE, {"kind": "reduce", "partials": partials}),
        ]

    def _merge_final_models(self, now: float, usable: list[FinalPartial]) -> list[Command]:
        """gossip: the result's model is the mass-weighted mean of every participant's
        final estimate -- the consensus push-sum converges to, reached in one step here."""
        if self.merge == "merging":
            return []
        task = self.task
        models = sorted(
            (p for p in usable if p.model is not None and p.mass > 0), key=lambda p: p.peer
        )
        if not models:
            self.merge = "skipped"
            return self._maybe_reduce(now, deadline_passed=True)
        self.merge = "merging"
        rnd = task.offer.rounds + 1
        agg = Aggregate(
            task.task_id,
            rnd,
            tuple(p.model for p in models if p.model is not None),
            tuple(p.mass for p in models),
            "pushsum",
            AggToken(task.task_id, rnd, final=True),
            reference=task.global_ref,
        )
        self.gather = Gather(agg, {p.model.cid: p.peer for p in models if p.model}, task.my_id)
        return self.gather.start()

    def on_blob(self, now: float, event: BlobOutcome) -> list[Command]:
        gather = self.gather
        if gather is None or event.cid not in gather.waiting:
            return []
        if not event.ok:
            self.gather = None
            return self._merged(now, None, f"model {event.cid[:16]} unfetchable: {event.reason}")
        ready = gather.arrived(event.cid)
        if ready is None:
            return []
        self.gather = None
        return [ready]

    def on_merged(self, now: float, event: Aggregated) -> list[Command]:
        return self._merged(now, event.ref, event.reason)

    def _merged(self, now: float, ref: Any, reason: str) -> list[Command]:
        task = self.task
        out: list[Command] = []
        if ref is None:
            self.merge = "skipped"  # keep our own estimate as the result's model
            out.append(Log("warning", f"task {task.task_id[:12]}: final merge failed: {reason}"))
        else:
            self.merge = "merged"
            task.global_ref = ref
        return out + self._maybe_reduce(now, deadline_passed=True)

    def _publish_result(self, now: float, metrics: Any) -> list[Command]:
        task = self.task
        if task.result is not None:
            return []
        contributors = tuple(sorted(p.peer for p in self.partials.values() if not p.refused))
        if task.offer.rollout and isinstance(metrics, dict):
            # A partial rollout: the metrics of each version's participants, side by side.
            usable = [p for p in self.partials.values() if not p.refused]
            metrics = {**metrics, "by_version": by_version(task.offer, usable)}
        result = TaskResult(
            task_id=task.task_id,
            status="succeeded",
            reason="",
            reducer=task.my_id,
            **task.members(contributors or task.participants),
            rounds=task.round if task.is_training else 1,
            metrics=jsonable(metrics if isinstance(metrics, dict) else {}),
            model=task.global_ref if task.is_training else None,
            created=now,
        )
        envelope = seal(task.me, result)
        task.result_envelopes[task.my_id] = envelope
        return [Publish(TOPIC_TASKS, envelope)] + self.take_result(now, result, task.my_id)

    def on_deadline(self, now: float) -> list[Command]:
        """Our deadline for the result passed: the duty moves one rank down, and a held
        result from the new acting participant counts."""
        task = self.task
        if task.result is not None:
            return []
        acting = task.acting()
        out: list[Command] = []
        if acting == task.my_id:
            return self._maybe_reduce(now, deadline_passed=True)
        if acting is not None and task.participating:
            task.dead.add(acting)
            out.append(
                Log(
                    "warning",
                    f"task {task.task_id[:12]}: {acting[-8:]} silent past the result's deadline",
                )
            )
        elif not task.participating and self.held:
            # A follower has no deadlines of its own: it takes the best-ranked held result
            # (the publisher's failure only once no participant is left, its one duty).
            order = task.participants
            ranked = [p for p in order if p in self.held]
            if ranked:
                return self.take_result(now, self.held.pop(ranked[0]), ranked[0])
        out += task.on_view_changed(now)
        if task.result is None and len(task.live()) > 0:
            out.append(SetTimer(task.timer(TimerKind.REDUCE), now + GRACE_S))
        return out

    def on_view_changed(self, now: float) -> list[Command]:
        task = self.task
        for signer in [*task.participants, task.offer.publisher]:
            if signer in self.held and task.may_end(signer, self.held[signer]):
                return self.take_result(now, self.held.pop(signer), signer)
        return self._maybe_reduce(now, deadline_passed=False)

    # --- the result ------------------------------------------------------------------------

    def on_result(self, now: float, result: TaskResult, signer: str) -> list[Command]:
        task = self.task
        if task.result is not None or signer != result.reducer:
            return []
        if task.roster is None:
            # Before any roster only the publisher may end the task (a failure).
            if signer == task.offer.publisher and result.status == "failed":
                return self.take_result(now, result, signer)
            return task._refuse(TaskResult, f"result from {signer[-8:]} before any roster")
        if result.model is not None and blob_too_big("result", result.model.size):
            return task._refuse(TaskResult, f"result model of {result.model.size} bytes")
        roster = set(task.participants)
        failing = signer == task.offer.publisher and result.status == "failed"
        if (signer not in roster and not failing) or not (
            set(result.participants) | set(result.absent)
        ) <= roster:
            return task._refuse(TaskResult, f"result from {signer[-8:]} outside the roster")
        if not task.may_end(signer, result):
            if len(self.held) <= len(task.participants):  # one each, and the publisher's
                self.held[signer] = result
            out: list[Command] = [
                Log(
                    "info",
                    f"task {task.task_id[:12]}: result from {signer[-8:]} held: not its duty yet",
                )
            ]
            if not task.participating:
                out.append(SetTimer(task.timer(TimerKind.REDUCE), now + task.offer.round_timeout_s))
            return out
        return self.take_result(now, result, signer)

    def take_result(self, now: float, result: TaskResult, signer: str) -> list[Command]:
        task = self.task
        if task.result is not None:
            return []
        task.result = result
        task.result_signer = signer
        self.held.clear()
        # Followers see where everyone ended, even participants they heard little from
        # (in a large task only its publisher: a NodeState per participant per node
        # would be N^2 of them in a simulation).
        included = task.contributors(result)
        large = task.large and task.my_id != task.offer.publisher
        for peer in () if large else task.participants:
            state = task.nodes.setdefault(peer, NodeState())
            contributed = peer in included
            state.state = "done" if contributed else ("lost" if peer in task.dead else "left out")
            if contributed and result.status == "succeeded":
                state.round = max(state.round, result.rounds)
        ok = result.status == "succeeded"
        task.phase = Phase.DONE if ok else Phase.FAILED
        task.reason = result.reason
        out: list[Command] = [
            CancelTimer(task.timer(kind, task.round if kind is TimerKind.ROUND else 0))
            for kind in (
                TimerKind.REDUCE,
                TimerKind.ROUND,
                TimerKind.VOLUNTEER,
                TimerKind.REVEAL,
                TimerKind.ROSTER_TAKEOVER,
                TimerKind.PUBLISHER_WATCH,
                TimerKind.EXPIRE,
            )
        ]
        out.append(
            task.event(
                EventKind.RESULT if ok else EventKind.FAILED,
                now,
                # Metrics travel in the event's `metrics`; followers render them once.
                result.status + (f": {result.reason}" if result.reason else ""),
                peer=result.reducer,
                metrics=result.metrics if isinstance(result.metrics, dict) else {},
            )
        )
        # The task is over: keep only the final model (for `p2pfl result --model-out`).
        if isinstance(task.rounds, RoundsBase):
            final = frozenset({result.model.cid} if result.model else ())
            out += task.rounds.forget_before(1 << 30, keep=final)
        if result.model is not None and task.my_id == task.offer.publisher:
            out.append(FetchBlob(result.model, (result.reducer,)))
        return out + task.end(result.status, result.reason)
