"""gossip rounds (push-sum) of one task at one node.

Each participant sends its model with a share of its push-sum mass to `fanout` targets
drawn by a hash every receiver can recompute (core/gossip.py), waits for the shares
addressed to it (or the round deadline) and merges them: the mass-weighted mean of the
estimates, masses as floats end to end (fl/pushsum.py is the one implementation; the
driver's "pushsum" aggregation calls it). Mass starts at a participant's signed sample
count, and no share may carry more mass than all participants' signed counts together,
so nobody dominates the average beyond its signed record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from p2pfl.core.commands import Aggregated, CancelTimer, Command, Log, Send
from p2pfl.core.gossip import sources_of, targets_of
from p2pfl.core.messages import GossipPush, Progress
from p2pfl.core.phase import Phase
from p2pfl.core.rounds_base import RoundsBase
from p2pfl.core.tokens import TaskTimer, TimerKind
from p2pfl.store.blobref import BlobRef


class PushSumRounds(RoundsBase):
    def __init__(self, task: Any) -> None:
        super().__init__(task)
        self.mass = 0.0  # our push-sum weight
        self.pushes: dict[int, dict[str, GossipPush]] = {}
        self.merged: set[int] = set()  # rounds whose shares we merged
        self.masses: dict[str, float] = {}  # cid -> mass of the share being merged
        self.cap: float | None = None  # all participants' signed counts together

    def _fanout(self, live: Sequence[str]) -> int:
        return max(1, min(self.task.offer.fanout, len(live) - 1))

    def on_trained(self, now: float, rnd: int, result: dict[str, Any]) -> list[Command]:
        task = self.task
        ref: BlobRef | None = result.get("ref")
        if ref is None:
            return task.withdraw(now, f"round {rnd}: training produced no update")
        metrics = dict(result.get("metrics") or {})
        state = task.node(task.my_id)
        state.absorb(metrics)
        state.state = "waiting"
        self.round_blobs.setdefault(rnd, set()).add(ref.cid)
        self.owner.setdefault(ref.cid, task.my_id)
        if rnd == 1:
            self.mass = float(max(self.my_samples(result.get("num_samples")), 1))
        live = task.live()
        targets = (
            targets_of(task.task_id, rnd, task.my_id, live, self._fanout(live))
            if len(live) > 1
            else ()
        )
        share = self.mass / (len(targets) + 1)
        self.mass = share  # the share we keep
        push = GossipPush(task.task_id, rnd, task.my_id, ref, share)
        self.pushes.setdefault(rnd, {})[task.my_id] = push
        out: list[Command] = [Send(t, push) for t in targets]
        if task.offer.publisher != task.my_id:
            out.append(
                Send(task.offer.publisher, Progress(task.task_id, task.my_id, rnd, "pushed", {}))
            )
        return out + self._maybe_merge(now, rnd, deadline_passed=False)

    def on_push(self, now: float, push: GossipPush) -> list[Command]:
        task = self.task
        if push.peer not in task.participants or not task.participating or push.ref is None:
            return []
        if not 1 <= push.round <= task.offer.rounds or push.peer in self.pushes.get(push.round, {}):
            return []
        if self.cap is None:  # the roster is fixed: sum once, not per share (O(N) each)
            self.cap = task.signed_total()
        cap = self.cap
        if push.mass > cap:
            return [
                Log(
                    "warning",
                    f"task {task.task_id[:12]}: share of {push.peer[-8:]} claims mass {push.mass:g} > {cap:g}: refused",
                )
            ]
        problem = self.check_blob(push.peer, push.ref)
        if problem is not None:
            return [
                Log(
                    "warning",
                    f"task {task.task_id[:12]}: share of {push.peer[-8:]} refused: {problem}",
                )
            ]
        self.pushes.setdefault(push.round, {})[push.peer] = push
        return self._maybe_merge(now, push.round, deadline_passed=False)

    def _maybe_merge(self, now: float, rnd: int, deadline_passed: bool) -> list[Command]:
        task = self.task
        got = self.pushes.get(rnd, {})
        if rnd != task.round or task.phase is not Phase.TRAINING or task.my_id not in got:
            return []
        live = task.live()
        sources = (
            sources_of(task.task_id, rnd, task.my_id, live, self._fanout(live))
            if len(live) > 1
            else ()
        )
        missing = [p for p in sources if p not in got and p not in task.dead]
        if missing and not deadline_passed:
            return []
        shares = [got[p] for p in sorted(got) if got[p].ref is not None and got[p].mass > 0]
        if not shares:
            return task.withdraw(now, f"round {rnd}: no model to merge")
        self.mass = sum(s.mass for s in shares)
        self.masses = {s.ref.cid: s.mass for s in shares if s.ref is not None}
        self.merged.add(rnd)
        agg = self.aggregate(
            rnd, [s.ref for s in shares if s.ref is not None], [s.mass for s in shares], "pushsum"
        )
        authors = {s.ref.cid: s.peer for s in shares if s.ref is not None}
        return [CancelTimer(task.timer(TimerKind.ROUND, rnd))] + self.fetch_then(agg, authors)

    def on_aggregated(self, now: float, event: Aggregated) -> list[Command]:
        task = self.task
        if event.token.round != task.round or task.phase is not Phase.AGGREGATING:
            return []
        # A share left out at aggregation (bad tensors) takes its mass with it.
        self.mass -= sum(self.masses.get(cid, 0.0) for cid, _ in event.dropped)
        return super().on_aggregated(now, event)

    def on_timer(self, now: float, key: TaskTimer) -> list[Command]:
        if key.kind is TimerKind.ROUND:
            return self._maybe_merge(now, key.round, deadline_passed=True)
        return super().on_timer(now, key)

    def on_view_changed(self, now: float) -> list[Command]:
        return self._maybe_merge(now, self.task.round, deadline_passed=False)

    def unfetchable(self, now: float, cid: str, author: str | None, reason: str) -> list[Command]:
        """A share that cannot be fetched is left out (its mass is lost with it)."""
        gather = self.gather
        if gather is None:
            return []
        self.mass -= self.masses.pop(cid, 0.0)
        ready = gather.leave_out(cid)
        out: list[Command] = [
            Log("warning", f"task {self.task.task_id[:12]}: share {cid[:16]} left out ({reason})")
        ]
        if gather.empty:
            self.gather = None
            return out + self.task.withdraw(
                now, f"round {self.task.round}: no share could be fetched ({reason})"
            )
        if ready is not None:
            self.gather = None
            out.append(ready)
        return out
