"""fedavg / fedprox rounds of one task at one node.

Every participant announces its update (a blob, by cid). The acting coordinator -- the
first live roster member in this node's view -- publishes a RoundClose naming exactly the
updates that make the round; everyone averages exactly those, sorted by peer id, so
honest nodes hold bit-identical models. A close from anyone else is held until this
node's own deadlines have passed the ranks above its sender. An included update that
proves unfetchable makes the coordinator re-close the round without it.

Honest weights: an update's sample count may not exceed its author's signed volunteer
record; a blob announced by another participant first is refused; the aggregation step
leaves out updates whose tensors do not match the model, are not finite, or lie farther
than the offer's max_update_norm (core/commands.py Aggregate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from p2pfl.core.commands import (
    Aggregated,
    Audit,
    CancelTimer,
    Command,
    EventKind,
    Log,
    Send,
    SetTimer,
    SliceWorked,
)
from p2pfl.core.hierarchy import Hierarchy, group_size
from p2pfl.core.messages import RoundClose, RoundUpdate, UpdateAsk
from p2pfl.core.phase import ACTIVE, BlobOutcome, Phase
from p2pfl.core.round_messages import (
    GroupDone,
    SketchProof,
    SliceAsk,
    SliceDone,
    SliceOffer,
    SliceSketch,
    StageAsk,
)
from p2pfl.core.rounds_base import RoundsBase
from p2pfl.core.scatter import Scatter, slice_count
from p2pfl.core.tokens import TaskTimer, TimerKind
from p2pfl.core.view import withdrew_summary
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed

GRACE_S = 2.0
# Updates are held for rounds up to this far ahead of ours (a straggler that a close
# moves on to a later round needs that round's updates) and one round behind: a peer
# cannot make us hold its updates for every round of the task.
ROUNDS_AHEAD = 8
ASK_AFTER_S = 2.0  # an update a close includes still missing this long after it: ask
MAX_UPDATE_ANSWERS = 8  # an asker's UpdateAsks answered per round


class FedAvgRounds(RoundsBase):
    def __init__(self, task: Any) -> None:
        super().__init__(task)
        self.updates: dict[int, dict[str, RoundUpdate]] = {}
        self.closes: dict[int, RoundClose] = {}
        self.held: dict[int, dict[str, RoundClose]] = {}  # closes not (yet) from the duty
        self.waiting_close: RoundClose | None = None  # accepted, announcements missing
        self.deadline_waits: dict[int, int] = {}  # round -> graces waited
        # Reduce-scatter (core/scatter.py) when the rule says so for this roster.
        self.slice_blobs: set[str] = set()  # slice blobs this node holds
        self._scatter: Scatter | None = None
        self._hierarchy: Hierarchy | None = None
        self.redone: set[tuple[int, int]] = set()  # (round, attempt) we asked to re-close
        self.update_answers: dict[int, dict[str, int]] = {}  # round -> asker -> answers

    @property
    def scatter(self) -> Scatter | None:
        if self._scatter is None and self.task.roster is not None:
            count = slice_count(self.task.offer, self.task.participants)
            if count:
                self._scatter = Scatter(self, count)
        return self._scatter

    @property
    def hierarchy(self) -> Hierarchy | None:
        if self._hierarchy is None and self.task.roster is not None:
            size = group_size(self.task.offer)
            if size:
                self._hierarchy = Hierarchy(self, size)
        return self._hierarchy

    def stage(self) -> Scatter | Hierarchy | None:
        """The aggregation stage after the close, when the rule asks for one."""
        return self.hierarchy or self.sliced()

    def sliced(self) -> Scatter | None:
        """Reduce-scatter for this round: slices are cut along a reference model, so a
        round without one (the first, when the taskpack starts from no initial weights:
        the same at every node) moves whole updates."""
        return self.scatter if self.task.global_ref is not None else None

    # --- our own update ------------------------------------------------------------------

    def on_trained(self, now: float, rnd: int, result: dict[str, Any]) -> list[Command]:
        task = self.task
        if rnd in self.closes:
            return []
        ref: BlobRef | None = result.get("ref")
        if ref is None:
            return task.withdraw(now, f"round {rnd}: training produced no update")
        scatter = self.sliced()
        if scatter is not None:  # cut it into slices first, then announce it
            return scatter.cut(rnd, ref, result)
        return self.announce(now, rnd, result)

    def announce(self, now: float, rnd: int, result: dict[str, Any]) -> list[Command]:
        task = self.task
        if rnd in self.closes or rnd != task.round:
            return []
        ref: BlobRef = result["ref"]
        metrics = dict(result.get("metrics") or {})
        state = task.node(task.my_id)
        state.absorb(metrics)
        state.state = "waiting"
        self.round_blobs.setdefault(rnd, set()).add(ref.cid)
        shared = task.shareable(metrics)
        update = RoundUpdate(
            task.task_id, rnd, task.my_id, ref, self.my_samples(result.get("num_samples")), shared
        )
        # It comes back to us too (a direct copy is sent to us, and a gossip publisher
        # receives its own), so our own update is taken the same way as everyone's. No
        # gossip copy when the direct ones go: over 8 hosts its relays cost a reduce-scatter
        # round a third of its time; a participant that misses one asks (UpdateAsk).
        out: list[Command] = task.to_participants(update)
        out.append(SetTimer(task.timer(TimerKind.UPDATES, rnd), now + ASK_AFTER_S))
        if task.decision is not None:  # a site: what leaves is recorded
            what = {"task": task.task_id, "round": rnd, "what": "update", "bytes": ref.size}
            out.append(Audit("release", {**what, "dp_spend": 0.0, "notes": []}))
        return out

    # --- everyone's updates ------------------------------------------------------------

    def on_update(self, now: float, update: RoundUpdate) -> list[Command]:
        task = self.task
        peer = update.peer
        if peer not in task.participants or peer in task.withdrawn:
            return []
        if not 1 <= update.round <= task.offer.rounds or update.status != "ok":
            return task._refuse(RoundUpdate, f"round {update.round} status {update.status!r}")
        if not task.round - 1 <= update.round <= task.round + ROUNDS_AHEAD:
            return []
        if update.ref is None or peer in self.updates.get(update.round, {}):
            return []
        signed = task.samples.get(peer, 0)
        if update.num_samples > signed:
            return [
                Log(
                    "warning",
                    f"task {task.task_id[:12]}: update of {peer[-8:]} claims {update.num_samples} samples; its signed record says {signed}: refused",
                )
            ]
        problem = self.check_blob(peer, update.ref)
        if problem is not None:
            return [
                Log(
                    "warning", f"task {task.task_id[:12]}: update of {peer[-8:]} refused: {problem}"
                )
            ]
        self.updates.setdefault(update.round, {})[peer] = update
        state = task.node(peer)
        state.round = update.round
        state.absorb(update.metrics)
        state.state = "updated"
        out: list[Command] = [
            task.event(
                EventKind.ROUND,
                now,
                f"round {update.round}: update from {peer[-8:]}",
                peer=peer,
                round=update.round,
                metrics=update.metrics if isinstance(update.metrics, dict) else {},
            )
        ]
        if self.waiting_close is not None and self.waiting_close.round == update.round:
            close, self.waiting_close = self.waiting_close, None
            return out + self._aggregate_close(now, close)
        return out + self._check_complete(now)

    # --- lost updates (direct messages can be lost) -----------------------------------

    def ask_updates(self, now: float, rnd: int) -> list[Command]:
        """Updates still missing, asked of their authors again every ASK_AFTER_S: those
        our close includes (until they come or the RECLOSE deadline decides), and, while
        we are the acting coordinator of an open round, those of live participants (one
        still training has none yet and stays silent; the round's deadline decides)."""
        task = self.task
        close = self.waiting_close
        if close is not None and close.round == rnd:
            wanted: Sequence[str] = close.included
        elif rnd == task.round and rnd not in self.closes and task.phase in ACTIVE:
            wanted = task.live() if task.acting() == task.my_id else ()
        else:
            return []  # the round moved on: no more asks
        got = self.updates.get(rnd, {})
        gone = task.dead | {task.my_id}
        ask = UpdateAsk(task.task_id, rnd, task.my_id)
        out: list[Command] = [Send(p, ask) for p in wanted if p not in got and p not in gone]
        return out + [SetTimer(task.timer(TimerKind.UPDATES, rnd), now + ASK_AFTER_S)]

    def on_update_ask(self, now: float, ask: UpdateAsk) -> list[Command]:
        """Our update of `ask.round` once more, to the asking participant alone (bounded
        per round and asker: asks cannot make us a megaphone)."""
        task = self.task
        if ask.peer not in task.participants or ask.peer == task.my_id:
            return []
        mine = self.updates.get(ask.round, {}).get(task.my_id)
        if mine is None:
            return []
        answers = self.update_answers.setdefault(ask.round, {})
        if answers.get(ask.peer, 0) >= MAX_UPDATE_ANSWERS:
            return []
        answers[ask.peer] = answers.get(ask.peer, 0) + 1
        return [Send(ask.peer, mine)]

    def _check_complete(self, now: float) -> list[Command]:
        task = self.task
        rnd = task.round
        if task.acting() != task.my_id or rnd in self.closes or task.phase not in ACTIVE:
            return []
        got = self.updates.get(rnd, {})
        if any(p not in got for p in task.live()):
            return []
        return self._close(now, rnd)

    def _close(self, now: float, rnd: int) -> list[Command]:
        task = self.task
        got = self.updates.get(rnd, {})
        live = task.live()
        if len(live) < task.offer.min_nodes:
            return task.fail(now, _too_few(task, live))
        included = tuple(sorted(p for p in got if p not in task.withdrawn))
        if not included:
            return task.fail(now, f"round {rnd}: no usable update" + _reasons(task.withdrawn))
        close = RoundClose(task.task_id, rnd, task.my_id, included, tuple(sorted(task.dead)))
        return task.to_participants(close, gossip_too=True)

    # --- closes --------------------------------------------------------------------------

    def on_close(self, now: float, close: RoundClose) -> list[Command]:
        task = self.task
        if close.peer not in task.participants:
            return []
        if not task.may_act(close.peer):
            # Not its duty (yet) in our view: hold it; our deadlines may move the duty.
            held = self.held.setdefault(close.round, {})
            if close.round >= task.round and len(held) < len(task.participants):
                held[close.peer] = close
            return [
                Log(
                    "info",
                    f"task {task.task_id[:12]}: round {close.round} close from {close.peer[-8:]} held: not its duty",
                )
            ]
        return self._accept_close(now, close)

    def _accept_close(self, now: float, close: RoundClose) -> list[Command]:
        task = self.task
        previous = self.closes.get(close.round)
        if previous is not None:
            # Only a re-close of the round we are still assembling replaces the first one.
            redo = (
                close.attempt > previous.attempt
                and close.round == task.round
                and task.phase is Phase.AGGREGATING
            )
            if not redo:
                return []
        self.closes[close.round] = close
        self.held.pop(close.round, None)
        for old in [r for r in self.updates if r < close.round - 1]:
            del self.updates[old]  # held no longer (ROUNDS_AHEAD)
            self.update_answers.pop(old, None)
        out: list[Command] = [
            CancelTimer(task.timer(TimerKind.ROUND, close.round)),
            CancelTimer(task.timer(TimerKind.RECLOSE, close.round)),
            task.event(
                EventKind.CLOSED,
                now,
                f"round {close.round}/{task.offer.rounds} closed with {len(close.included)} updates",
                round=close.round,
            ),
        ]
        if task.phase not in ACTIVE or task.phase in (Phase.FINALIZING, Phase.REDUCING):
            return out
        if close.round < task.round:
            return out
        # Straggler or not: this close defines the round for everyone.
        task.round = close.round
        return out + self._aggregate_close(now, close)

    def _aggregate_close(self, now: float, close: RoundClose) -> list[Command]:
        task = self.task
        updates = self.updates.get(close.round, {})
        missing = [p for p in close.included if p not in updates]
        if missing:
            # The close may overtake an announcement on the way: wait for it, bounded.
            self.waiting_close = close
            task.phase = Phase.AGGREGATING
            return [
                SetTimer(
                    task.timer(TimerKind.RECLOSE, close.round), now + task.offer.round_timeout_s
                ),
                SetTimer(task.timer(TimerKind.UPDATES, close.round), now + ASK_AFTER_S),
            ]
        stage = self.stage()
        if stage is not None:
            task.phase = Phase.AGGREGATING
            return stage.start(now, close)
        refs = [updates[p].ref for p in close.included]
        weights = [float(updates[p].num_samples) for p in close.included]
        agg = self.aggregate(
            close.round,
            [r for r in refs if r is not None],
            weights,
            task.offer.aggregator,
            close.attempt,
        )
        return self.fetch_then(agg, {u.ref.cid: u.peer for u in updates.values() if u.ref})

    def on_aggregated(self, now: float, event: Any) -> list[Command]:
        task = self.task
        if event.token.stage and self._hierarchy is not None:
            return self._hierarchy.on_aggregated(now, event)
        close = self.closes.get(event.token.round)
        if (
            event.token.round != task.round
            or task.phase is not Phase.AGGREGATING
            or (close is not None and close.attempt != event.token.attempt)
        ):
            return []  # superseded by a re-close of the round
        return super().on_aggregated(now, event)

    # --- deadlines -----------------------------------------------------------------------

    def on_timer(self, now: float, key: TaskTimer) -> list[Command]:
        task = self.task
        if key.kind is TimerKind.ROUND:
            return self._on_round_deadline(now, key.round)
        if key.kind is TimerKind.UPDATES:
            return self.ask_updates(now, key.round)
        if key.kind is TimerKind.SLICES and self._scatter is not None:
            return self._scatter.ask_offers(now, key.round)
        if key.kind is TimerKind.STAGE and self._scatter is not None:
            return self._scatter.ask_stage(now, key.round)
        if (
            key.kind is TimerKind.REFETCH
            and self.scatter is not None
            and key.cid in self.scatter.later
        ):
            return self.scatter.refetch(key.cid)
        if key.kind is TimerKind.RECLOSE:
            scatter = self._scatter
            if (
                scatter is not None
                and scatter.close is not None
                and key.round == task.round == scatter.close.round
                and task.phase is Phase.AGGREGATING
                and scatter.deadlines < 2
            ):
                return scatter.on_deadline(now)
            if key.round == task.round and task.phase is Phase.AGGREGATING:
                return task.withdraw(
                    now, f"round {key.round}: the round's updates stayed out of reach"
                )
            return []
        return super().on_timer(now, key)

    def _on_round_deadline(self, now: float, rnd: int) -> list[Command]:
        """The acting coordinator closes at its deadline. If it stays silent for a further
        grace period, this node treats it as gone and the next in rank has the duty; a
        silent next-in-rank is skipped one grace later, and so on, all nodes in step."""
        task = self.task
        if rnd in self.closes or rnd != task.round:
            return []
        acting = task.acting()
        if acting == task.my_id:
            return self._close(now, rnd)
        waits = self.deadline_waits.get(rnd, 0) + 1
        self.deadline_waits[rnd] = waits
        out: list[Command] = []
        if waits >= 2 and acting is not None:
            task.dead.add(acting)
            out.append(
                Log(
                    "warning",
                    f"task {task.task_id[:12]}: {acting[-8:]} silent past round {rnd}'s deadline",
                )
            )
            out += task.on_view_changed(now)
            if rnd in self.closes:
                return out
        return out + [SetTimer(task.timer(TimerKind.ROUND, rnd), now + GRACE_S)]

    def on_view_changed(self, now: float) -> list[Command]:
        task = self.task
        out: list[Command] = []
        held = self.held.get(task.round, {})
        for peer in [p for p in task.participants if p in held]:
            if task.may_act(peer):
                out += self._accept_close(now, held.pop(peer))
                break
        live = task.live()
        if task.acting() == task.my_id and len(live) < task.offer.min_nodes:
            return out + task.fail(now, _too_few(task, live))
        return out + self._scatter_lost(now) + self._check_complete(now)

    def _scatter_lost(self, now: float) -> list[Command]:
        """An included participant was lost while the round's stage is incomplete: the
        acting coordinator re-closes the round without it, which reassigns its slices
        (reduce-scatter) or hands its group to the next in rank (hierarchical)."""
        task, stage = self.task, self.stage()
        if stage is None or stage.close is None or task.phase is not Phase.AGGREGATING:
            return []
        out = stage.on_view_changed(now) if isinstance(stage, Hierarchy) else []
        close = stage.close
        if close.round != task.round or task.acting() != task.my_id:
            return out
        gone = {p for p in close.included if p in task.dead or p in task.withdrawn}
        if stage.complete():
            # Every slice combined; under a slice check, a participant lost before its
            # sketch still stalls the round (core/verify.py).
            check = stage.check if isinstance(stage, Scatter) else None
            if check is None or check.verified:
                return out
            gone -= set(check.sketches)
        return out + (self.redo(now, gone, "participants lost mid-round") if gone else [])

    def redo(self, now: float, without: set[str], why: str) -> list[Command]:
        """The round cannot close as it stands (a slice owner lost or silent, a malformed
        slice): the acting coordinator re-closes it without `without` (and every lost
        participant); anyone else waits for that re-close until its RECLOSE deadline."""
        task = self.task
        close = self.closes.get(task.round)
        if close is None or (close.round, close.attempt) in self.redone:
            return []
        if task.acting() != task.my_id:
            return [
                Log(
                    "info",
                    f"task {task.task_id[:12]}: round {close.round}: {why}; waiting for a re-close",
                )
            ]
        self.redone.add((close.round, close.attempt))
        gone = without | task.dead | set(task.withdrawn)
        included = tuple(p for p in close.included if p not in gone)
        if not included or len(task.live()) < task.offer.min_nodes:
            return task.fail(now, f"round {close.round}: too few participants remain ({why})")
        redo = RoundClose(
            task.task_id,
            close.round,
            task.my_id,
            included,
            tuple(sorted(task.dead)),
            close.attempt + 1,
        )
        left = ", ".join(sorted(p[-8:] for p in set(close.included) - set(included)))
        return [
            Log(
                "warning",
                f"task {task.task_id[:12]}: re-closing round {close.round} without {left}: {why}",
            ),
            *task.to_participants(redo, gossip_too=True),
        ]

    # --- reduce-scatter messages ---------------------------------------------------------

    def on_stage_message(
        self,
        now: float,
        msg: SliceOffer | SliceAsk | SliceDone | GroupDone | SliceSketch | SketchProof | StageAsk,
        envelope: Signed | None = None,
    ) -> list[Command]:
        scatter = self.scatter
        if isinstance(msg, SliceOffer) and scatter is not None:
            return scatter.on_offer(now, msg, envelope)
        if isinstance(msg, SliceAsk) and scatter is not None:
            return scatter.on_offer_ask(now, msg)
        if isinstance(msg, StageAsk) and scatter is not None:
            return scatter.on_stage_ask(now, msg)
        check = scatter.check if scatter is not None else None
        if isinstance(msg, SliceSketch) and check is not None:
            return check.on_sketch(now, msg, envelope)
        if isinstance(msg, SketchProof) and check is not None:
            return check.on_proof(now, msg)
        if isinstance(msg, GroupDone) and self.hierarchy is not None:
            return self.hierarchy.on_done(now, msg)
        if isinstance(msg, SliceDone) and scatter is not None:
            return scatter.on_done(now, msg)
        return self.task._refuse(type(msg), "not part of this task's aggregation")

    def on_slice_worked(self, now: float, event: SliceWorked) -> list[Command]:
        return self.scatter.on_worked(now, event) if self.scatter is not None else []

    def assembled(self, now: float, event: Aggregated) -> list[Command]:
        return self.on_aggregated(now, event)

    def on_blob(self, now: float, event: BlobOutcome) -> list[Command]:
        stage = self._scatter or self._hierarchy
        if stage is not None and stage.wants(event.cid):
            return stage.on_blob(now, event.cid, event.ok, event.reason)
        return super().on_blob(now, event)

    # --- unfetchable updates -----------------------------------------------------------

    def unfetchable(self, now: float, cid: str, author: str | None, reason: str) -> list[Command]:
        """An included update cannot be fetched (its author died before anyone copied it):
        the acting coordinator re-closes the round without it; everyone else waits for that
        re-close until a deadline."""
        task = self.task
        rnd = task.round
        close = self.closes.get(rnd)
        if close is None:
            return task.withdraw(now, f"could not fetch update {cid[:16]}: {reason}")
        if author is not None and author != task.my_id:
            task.dead.add(author)
        if task.acting() != task.my_id:
            return [
                Log(
                    "warning",
                    f"task {task.task_id[:12]}: update {cid[:16]} of round {rnd} unfetchable ({reason}); waiting for a re-close",
                ),
                SetTimer(task.timer(TimerKind.RECLOSE, rnd), now + task.offer.round_timeout_s),
            ]
        included = tuple(p for p in close.included if p not in task.dead)
        if not included or len(task.live()) < task.offer.min_nodes:
            return task.fail(now, f"round {rnd}: too few fetchable updates remain")
        redo = RoundClose(
            task.task_id, rnd, task.my_id, included, tuple(sorted(task.dead)), close.attempt + 1
        )
        return [
            Log("warning", f"task {task.task_id[:12]}: re-closing round {rnd} without {author}"),
            *task.to_participants(redo, gossip_too=True),
        ]


def _reasons(withdrawn: dict[str, str]) -> str:
    """Why participants left, e.g. `; 2 withdrew: train failed: ValueError (2 nodes)`."""
    return f"; {withdrew_summary(withdrawn)}" if withdrawn else " arrived"


def _too_few(task: Any, live: Sequence[str]) -> str:
    return (
        f"{len(live)} of {len(task.participants)} participants remain, fewer than min_nodes "
        f"({task.offer.min_nodes})" + _reasons(task.withdrawn)
    )
