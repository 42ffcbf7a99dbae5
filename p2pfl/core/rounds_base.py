"""What both kinds of training rounds share: the initial model, local training, evaluation
of each new global model, fetch retries and forgetting old rounds' blobs.

A rounds part owns its state and talks to its task through `self.task` (the shared
roster, liveness, follower view and the failure/withdraw rules).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pfl.core.commands import (
    Aggregate,
    Aggregated,
    Command,
    EventKind,
    ForgetBlobs,
    JobDone,
    JobFailed,
    Log,
    Send,
    SetTimer,
)
from p2pfl.core.gather import Gather
from p2pfl.core.messages import Progress
from p2pfl.core.phase import BlobOutcome, Phase
from p2pfl.core.tokens import AggToken, JobStep, TaskTimer, TimerKind
from p2pfl.limits import blob_too_big
from p2pfl.store.blobref import BlobRef

if TYPE_CHECKING:
    from p2pfl.core.task import TaskMachine

KEEP_ROUNDS = 2  # rounds of updates kept for stragglers before their blobs are forgotten
FETCH_RETRIES = 3  # a failed fetch from a live author is retried this often,
RETRY_BACKOFF_S = 1.0  # after 1, 2, then 4 s


class RoundsBase:
    def __init__(self, task: TaskMachine) -> None:
        self.task = task
        self.gather: Gather | None = None
        self.fetch_retries: dict[str, int] = {}  # cid -> retries so far
        # Blobs this task made or fetched, by round, so old rounds can be forgotten.
        self.round_blobs: dict[int, set[str]] = {}
        self.owner: dict[str, str] = {}  # update cid -> the participant that announced it

    # --- shared steps --------------------------------------------------------------------

    def on_job(self, now: float, event: JobDone | JobFailed) -> list[Command]:
        task = self.task
        step, rnd = event.token.step, event.token.round
        if isinstance(event, JobFailed):
            if step is JobStep.EVALUATE:  # no metrics this round; the model is still good
                return [
                    Log("warning", f"task {task.task_id[:12]}: evaluation failed: {event.reason}")
                ] + (self._on_evaluated(now, rnd, {}))
            return task.withdraw(now, f"{step.value} failed: {event.reason}")
        if step is JobStep.INIT:
            result = event.result
            task.global_ref = result
            if isinstance(result, BlobRef):
                self.round_blobs.setdefault(0, set()).add(result.cid)
            return self.train(now, 1)
        if step is JobStep.TRAIN:
            if rnd != task.round or task.phase is not Phase.TRAINING:
                return []  # a straggler's own late update: the round went on without it
            return self.on_trained(now, rnd, event.result)
        if step is JobStep.EVALUATE:
            return self._on_evaluated(now, rnd, dict(event.result or {}))
        return []

    def train(self, now: float, rnd: int) -> list[Command]:
        task = self.task
        task.round = rnd
        task.phase = Phase.TRAINING
        state = task.node(task.my_id)
        state.state, state.round = "training", rnd
        out: list[Command] = [
            task.job(
                JobStep.TRAIN, {"kind": "train", "round": rnd, "weights": task.global_ref}, rnd
            ),
            SetTimer(task.timer(TimerKind.ROUND, rnd), now + task.offer.round_timeout_s),
        ]
        if task.offer.publisher != task.my_id:
            out.append(
                Send(task.offer.publisher, Progress(task.task_id, task.my_id, rnd, "training", {}))
            )
        else:
            out.append(
                task.event(
                    EventKind.NODE, now, f"round {rnd}: training", peer=task.my_id, round=rnd
                )
            )
        return out

    def on_trained(self, now: float, rnd: int, result: dict[str, Any]) -> list[Command]:
        raise NotImplementedError

    def my_samples(self, claimed: Any) -> int:
        """Our own sample count, never above what our signed record says."""
        signed = self.task.samples.get(self.task.my_id, 0)
        return max(0, min(int(claimed or 0), signed))

    def aggregate(
        self, rnd: int, refs: list[BlobRef], weights: list[float], method: str, attempt: int = 0
    ) -> Aggregate:
        task = self.task
        return Aggregate(
            task.task_id,
            rnd,
            tuple(refs),
            tuple(weights),
            method,
            AggToken(task.task_id, rnd, attempt),
            self.aggregator_options(len(refs)) if method != "pushsum" else {},
            reference=task.global_ref,
            max_norm=task.offer.max_update_norm,
        )

    def aggregator_options(self, n: int) -> dict[str, Any]:
        offer = self.task.offer
        params = offer.params if isinstance(offer.params, dict) else {}
        if offer.aggregator == "krum":
            f = int(params.get("krum_f", max(0, (n - 3) // 2)))
            return {"f": min(f, max(0, (n - 3) // 2))}
        if offer.aggregator == "trimmed_mean":
            return {"beta": float(params.get("trim_beta", 0.1))}
        return {}

    def fetch_then(self, agg: Aggregate, authors: dict[str, str]) -> list[Command]:
        """Fetch every blob of `agg` we lack, then aggregate (on BlobReady)."""
        self.task.phase = Phase.AGGREGATING
        self.gather = Gather(agg, authors, self.task.my_id)
        self.round_blobs.setdefault(agg.round, set()).update(ref.cid for ref in agg.refs)
        return self.gather.start()

    def on_blob(self, now: float, event: BlobOutcome) -> list[Command]:
        gather = self.gather
        if gather is None or event.cid not in gather.waiting:
            return []
        if event.ok:
            ready = gather.arrived(event.cid)
            if ready is not None:
                self.gather = None
                return [ready]
            return []
        author = gather.authors.get(event.cid)
        tries = self.fetch_retries.get(event.cid, 0)
        if author is not None and author not in self.task.dead and tries < FETCH_RETRIES:
            # A fetch can fail while its author is alive (a timeout under load): ask again,
            # backing off (a failure can be instant: no connection yet).
            self.fetch_retries[event.cid] = tries + 1
            delay = RETRY_BACKOFF_S * (2**tries)
            return [
                Log(
                    "info",
                    f"task {self.task.task_id[:12]}: retrying {event.cid[:16]} in {delay:g} s ({event.reason})",
                ),
                SetTimer(
                    self.task.timer(TimerKind.REFETCH, self.task.round, event.cid), now + delay
                ),
            ]
        return self.unfetchable(now, event.cid, author, event.reason)

    def unfetchable(self, now: float, cid: str, author: str | None, reason: str) -> list[Command]:
        raise NotImplementedError

    def on_timer(self, now: float, key: TaskTimer) -> list[Command]:
        if key.kind is TimerKind.REFETCH:
            return self.gather.refetch(key.cid) if self.gather is not None else []
        return []

    def on_aggregated(self, now: float, event: Aggregated) -> list[Command]:
        task = self.task
        rnd = event.token.round
        if event.ref is None:
            return task.withdraw(now, f"round {rnd}: aggregation failed here: {event.reason}")
        out: list[Command] = [
            Log(
                "warning",
                f"task {task.task_id[:12]}: round {rnd}: left out update {cid[:16]} of {self.owner.get(cid, '?')[-8:]}: {why}",
            )
            for cid, why in event.dropped
        ]
        task.global_ref = event.ref
        task.phase = Phase.EVALUATING
        self.round_blobs.setdefault(rnd, set()).add(event.ref.cid)
        state = task.node(task.my_id)
        state.state, state.round = "evaluating", rnd
        out += self.forget_before(rnd - KEEP_ROUNDS)
        out.append(
            task.job(
                JobStep.EVALUATE, {"kind": "evaluate", "round": rnd, "weights": event.ref}, rnd
            )
        )
        return out

    def _on_evaluated(self, now: float, rnd: int, metrics: dict[str, Any]) -> list[Command]:
        task = self.task
        if task.phase is not Phase.EVALUATING or rnd != task.round:
            return []
        state = task.node(task.my_id)
        state.absorb(metrics)
        task.last_metrics = dict(metrics)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if state.epsilon is not None:
            numbers["epsilon"] = state.epsilon
        out: list[Command] = [
            task.event(
                EventKind.NODE,
                now,
                f"round {rnd}/{task.offer.rounds} evaluated",
                peer=task.my_id,
                round=rnd,
                metrics={**numbers, "model_cid": task.global_ref.cid if task.global_ref else None},
            )
        ]
        out += task.snapshot()  # a restart from here rejoins at the next round
        numbers = task.shareable(numbers)  # the policy may keep local metrics home
        if task.offer.publisher != task.my_id:
            out.append(
                Send(
                    task.offer.publisher,
                    Progress(task.task_id, task.my_id, rnd, "evaluated", numbers),
                )
            )
        if rnd < task.offer.rounds:
            return out + self.train(now, rnd + 1)
        return out + task.final.finalize(now)

    def forget_before(self, oldest: int, keep: frozenset[str] = frozenset()) -> list[Command]:
        """Forget the blobs of rounds before `oldest` (never the current global model).
        Two rounds are kept: a straggler may still fetch last round's updates from us."""
        stale = [r for r in self.round_blobs if r < oldest]
        if not stale:
            return []
        ref = self.task.global_ref
        keep = keep | ({ref.cid} if ref is not None else set())
        cids = set().union(*(self.round_blobs.pop(r) for r in stale)) - keep
        # A blob of an old round may be one of a newer round's too (equal bytes: a slice
        # of a layer that did not change): it stays.
        cids -= set().union(*self.round_blobs.values())
        return [ForgetBlobs(tuple(sorted(cids)))] if cids else []

    def on_view_changed(self, now: float) -> list[Command]:
        return []

    def check_blob(self, peer: str, ref: BlobRef) -> str | None:
        """Why `peer` may not announce blob `ref`, or None (size cap, no re-announcing
        another participant's blob)."""
        too_big = blob_too_big("update", ref.size)
        if too_big is not None:
            return too_big
        owner = self.owner.setdefault(ref.cid, peer)
        if owner != peer:
            return f"blob {ref.cid[:16]} was announced by {owner[-8:]} first"
        return None
