"""Training rounds of one task at one node.

fedavg / fedprox: every participant announces its update (a blob, by cid); the acting
coordinator -- the first live roster member -- publishes a RoundClose naming exactly the
updates that make the round; everyone averages exactly those, sorted by peer id, so honest
nodes hold bit-identical models. An included update that proves unfetchable makes the
coordinator re-close the round without it.

gossip: push-sum. Each participant sends its model with a share of its mass to `fanout`
targets drawn by a hash every receiver can recompute (core/gossip.py), waits for the
shares addressed to it (or the round deadline) and merges them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from p2pfl.core.commands import (
    Aggregate,
    CancelTimer,
    Command,
    FetchBlob,
    ForgetBlobs,
    Log,
    Publish,
    RunJob,
    Send,
    SetTimer,
)
from p2pfl.core.gossip import sources_of, targets_of
from p2pfl.core.messages import (
    TOPIC_TASKS,
    GossipPush,
    Progress,
    RoundClose,
    RoundUpdate,
)
from p2pfl.core.task_state import (
    GRACE_S,
    NodeState,
    TaskState,
)
from p2pfl.store.blobref import BlobRef

KEEP_ROUNDS = 2  # rounds of updates kept for stragglers before their blobs are forgotten
FETCH_RETRIES = 3  # a failed fetch from a live author is retried this often,
RETRY_BACKOFF_S = 1.0  # after 1, 2, then 4 s


class Rounds(TaskState):
    """Round behaviour; mixed into TaskMachine."""

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
            self.round_blobs.setdefault(rnd, set()).add(ref.cid)
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
        # The acting coordinator closes at its deadline. If it stays silent for a further
        # grace period, everyone treats it as gone and the next in rank closes; a silent
        # next-in-rank is skipped one grace later, and so on, all nodes in step.
        coordinator = self.acting_coordinator()
        if coordinator == self.my_id:
            return self._close(now, rnd)
        waits = self.deadline_waits.get(rnd, 0) + 1
        self.deadline_waits[rnd] = waits
        if waits >= 2 and coordinator is not None:
            self.dead.add(coordinator)
            if self.acting_coordinator() == self.my_id:
                return [
                    Log(
                        "warning",
                        f"task {self.task_id[:12]}: coordinator silent, taking over round {rnd}",
                    )
                ] + self._close(now, rnd)
        return [SetTimer(("round", self.task_id, rnd), now + GRACE_S)]

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
            return self._fail(now, f"round {rnd}: no usable update" + _failure_reasons(got))
        # `dead` is informational (followers, traces): late peers are stragglers, not dead,
        # and each node decides liveness from its own network events.
        close = RoundClose(self.task_id, rnd, self.my_id, included, tuple(sorted(self.dead)))
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
        self.round_blobs.setdefault(agg.round, set()).update(self.waiting_blobs)
        out: list[Command] = []
        for ref in agg.refs:
            provider = providers.get(ref.cid)
            peers = tuple(p for p in (provider,) if p and p != self.my_id)
            out.append(FetchBlob(ref, peers))
        return out

    def _forget_rounds_before(
        self, oldest: int, keep: frozenset[str] = frozenset()
    ) -> list[Command]:
        """Forget the blobs of rounds before `oldest` (never the current global model).

        Two rounds are kept: a straggler may still fetch last round's updates from us."""
        stale = [r for r in self.round_blobs if r < oldest]
        if not stale:
            return []
        keep = keep | ({self.global_ref.cid} if self.global_ref else set())
        cids = set().union(*(self.round_blobs.pop(r) for r in stale)) - keep
        return [ForgetBlobs(tuple(sorted(cids)))] if cids else []

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
        if self.final_merge == "merging":
            return self.on_final_merged(now, None, f"model {cid[:16]} unfetchable: {reason}")
        rnd = self.round
        agg = self.pending_aggregate
        ref = next((r for r in agg.refs if r.cid == cid), None) if agg is not None else None
        if self.offer.protocol == "gossip":
            shares = self.pushes.get(rnd, {}).values()
            authors = {s.ref.cid: s.peer for s in shares if s.ref is not None}
        else:
            updates = self.updates.get(rnd, {})
            authors = {u.ref.cid: p for p, u in updates.items() if u.ref is not None}
        lost = authors.get(cid)
        # A fetch can fail while its author is alive (a timeout under load): ask again.
        tries = self.fetch_retries.get(cid, 0)
        if ref is not None and lost is not None and lost not in self.dead and tries < FETCH_RETRIES:
            # Back off: a failure can be instant (no connection yet), and retrying at once
            # would spend every retry before the network had a chance to change.
            self.fetch_retries[cid] = tries + 1
            delay = RETRY_BACKOFF_S * (2**tries)
            return [
                Log(
                    "info",
                    f"task {self.task_id[:12]}: retrying {cid[:16]} from {lost[-8:]} in {delay:g} s ({reason})",
                ),
                SetTimer(("refetch", self.task_id, cid), now + delay),
            ]
        if self.offer.protocol == "gossip" and agg is not None:
            return self._drop_share(now, agg, cid, reason)
        close = self.closes.get(rnd)
        if close is None:
            return self._fail(now, f"could not fetch update {cid[:16]}: {reason}")
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

    def on_refetch(self, now: float, cid: str) -> list[Command]:
        agg = self.pending_aggregate
        if agg is None or cid not in self.waiting_blobs:
            return []  # the round moved on meanwhile
        ref = next((r for r in agg.refs if r.cid == cid), None)
        shares = self.pushes.get(self.round, {}).values()
        updates = self.updates.get(self.round, {})
        authors = {s.ref.cid: s.peer for s in shares if s.ref is not None}
        authors.update({u.ref.cid: p for p, u in updates.items() if u.ref is not None})
        author = authors.get(cid)
        return [FetchBlob(ref, (author,))] if ref is not None and author else []

    def _drop_share(self, now: float, agg: Aggregate, cid: str, reason: str) -> list[Command]:
        """gossip: merge without a share that cannot be fetched (its mass is lost)."""
        kept = [(r, w) for r, w in zip(agg.refs, agg.weights, strict=True) if r.cid != cid]
        if not kept:
            return self._fail(now, f"round {self.round}: no share could be fetched ({reason})")
        self.mass = sum(w for _, w in kept)
        self.pending_aggregate = replace(
            agg, refs=tuple(r for r, _ in kept), weights=tuple(w for _, w in kept)
        )
        self.waiting_blobs.discard(cid)
        out: list[Command] = [
            Log("warning", f"task {self.task_id[:12]}: share {cid[:16]} left out ({reason})")
        ]
        if not self.waiting_blobs:
            ready, self.pending_aggregate = self.pending_aggregate, None
            out.append(ready)
        return out

    def on_aggregated(
        self, now: float, token: tuple, ref: BlobRef | None, reason: str
    ) -> list[Command]:
        if token[1] == "final-aggregate":
            return self.on_final_merged(now, ref, reason)
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
        self.round_blobs.setdefault(rnd, set()).add(ref.cid)
        state = self.nodes.setdefault(self.my_id, NodeState())
        state.state, state.round = "evaluating", rnd
        return self._forget_rounds_before(rnd - KEEP_ROUNDS) + [
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
                f"round {rnd}/{self.offer.rounds} evaluated",
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
                f"round {progress.round}/{self.offer.rounds} {progress.state}",
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


def _failure_reasons(updates: dict[str, RoundUpdate]) -> str:
    """Why participants sent no update, e.g. `; 3 failed: ValueError: budget too low`."""
    reasons: dict[str, int] = {}
    for update in updates.values():
        if update.status != "ok" and isinstance(update.metrics, dict):
            why = str(update.metrics.get("error") or update.status)
            reasons[why] = reasons.get(why, 0) + 1
    if not reasons:
        return " arrived"
    return "; " + "; ".join(
        f"{why} ({n} node{'s' if n != 1 else ''})" for why, n in sorted(reasons.items())
    )
