"""The final step of one task at one node: partials, reduce, the signed result.

Each participant sends its final partial directly to the three best-ranked live
participants; the first live one runs the taskpack's `reduce` and publishes the signed
TaskResult. If it dies, the next candidate reduces after a deadline.
"""

from __future__ import annotations

from typing import Any

from p2pfl.core.commands import (
    Aggregate,
    CancelTimer,
    Command,
    FetchBlob,
    Log,
    Publish,
    RunJob,
    Send,
    SetTimer,
)
from p2pfl.core.election import first_live
from p2pfl.core.messages import (
    TOPIC_TASKS,
    FinalPartial,
    Progress,
    TaskResult,
)
from p2pfl.core.task_state import (
    GRACE_S,
    REDUCER_CANDIDATES,
    NodeState,
    TaskState,
    _jsonable,
)
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import seal


class FinalStep(TaskState):
    """Final-step behaviour; mixed into TaskMachine."""

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
            mass=self.mass if self.offer.protocol == "gossip" else 0.0,
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
        if self.offer.protocol == "gossip" and self.final_merge in ("", "merging"):
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
            Log("info", f"task {self.task_id[:12]}: reducing {len(partials)} partials"),
            RunJob(
                self.task_id, {"kind": "reduce", "partials": partials}, (self.task_id, "reduce")
            ),
        ]

    def _merge_final_models(self, now: float, usable: list[FinalPartial]) -> list[Command]:
        """gossip: the result's model is the mass-weighted average of every participant's
        final estimate -- the consensus push-sum converges to, reached in one step here."""
        if self.final_merge == "merging":
            return []
        models = sorted(
            (p for p in usable if p.model is not None and p.mass > 0), key=lambda p: p.peer
        )
        if not models:
            self.final_merge = "skipped"
            return self._maybe_reduce(now, deadline_passed=True)
        self.final_merge = "merging"
        agg = Aggregate(
            self.task_id,
            self.offer.rounds + 1,
            tuple(p.model for p in models if p.model is not None),
            tuple(p.mass for p in models),
            "fedavg",
            {},
            (self.task_id, "final-aggregate", self.offer.rounds + 1),
        )
        return self._fetch_then(agg, {p.model.cid: p.peer for p in models if p.model is not None})

    def on_final_merged(self, now: float, ref: BlobRef | None, reason: str) -> list[Command]:
        self.pending_aggregate = None
        self.waiting_blobs = set()
        self.phase = "done-local"
        if ref is None:
            self.final_merge = "skipped"  # keep our own estimate as the result's model
            out: list[Command] = [
                Log("warning", f"task {self.task_id[:12]}: final merge failed: {reason}")
            ]
        else:
            self.final_merge = "merged"
            self.global_ref = ref
            out = []
        return out + self._maybe_reduce(now, deadline_passed=True)

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
        # Followers see where everyone ended, even participants they heard little from.
        for peer in self.participants:
            state = self.nodes.setdefault(peer, NodeState())
            contributed = peer in result.participants
            state.state = "done" if contributed else ("lost" if peer in self.dead else "left out")
            if contributed and result.status == "succeeded":
                state.round = max(state.round, result.rounds)
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
                # Metrics travel in the event's `metrics`; followers render them once.
                f"{result.status}" + (f": {result.reason}" if result.reason else ""),
                peer=result.reducer,
                metrics=result.metrics if isinstance(result.metrics, dict) else {},
            ),
        ]
        # The task is over: keep only the final model (for `p2pfl result --model-out`).
        final = frozenset({result.model.cid} if result.model else ())
        out += self._forget_rounds_before(1 << 30, keep=final)
        if result.model is not None and self.my_id == self.offer.publisher:
            out.append(FetchBlob(result.model, (result.reducer,)))
        return out
