"""Hierarchical aggregation of one fedavg/fedprox round at one node.

The offer asks for it (params `aggregation: {kind: hierarchical, group_size: g}` or
`{kind: hierarchical, group_by: LABEL}`). Groups are a rule every node evaluates from the
roster: participants in rank order, cut into runs of g; or, by label, one group per
value of the site label LABEL each volunteer put in its signed record (`--label
region=eu`; carried in the roster), cut into runs of g if group_size is also given. Under a RoundClose, the leader of a group is its first member, in rank
order, whose update the close includes; a leader lost mid-round is replaced by the next
in rank in its group through the coordinator's re-close, which leaves the lost one out.

1. A leader fetches its group's included updates and combines them with the offer's
   aggregator (robust aggregators work inside each group), in the close's order, and
   publishes its group model (GroupDone, stage "group").
2. Every leader fetches every group model and averages them, weighted by each group's
   included sample counts (which every node knows from the signed, announced updates), in
   group order: every honest leader computes the same bytes. It publishes the global
   model's ref (GroupDone, stage "global") and takes it as its own.
3. A member takes the global model from its group's leader (or, when that leader is
   lost, from the first live leader in group order), fetched by cid.

Traffic: a member sends one update and receives one model per round; a leader receives
its group's updates and the other groups' models. With g about sqrt(n), no node moves
more than about 2 sqrt(n) models, whatever n is, and 1,000-node tasks can run exact
FedAvg.

Checked on receipt: a GroupDone counts only from the leader of its group under the
close (stage group), or from the leader this node takes its model from (stage global);
a blob larger than the model (plus headers) is refused unread.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from p2pfl.core.aggregation import MAX_GROUP_SIZE, aggregation
from p2pfl.core.commands import Aggregate, Aggregated, Command, FetchBlob, Log, Publish, SetTimer
from p2pfl.core.messages import TOPIC_TASKS, RoundClose, Volunteer
from p2pfl.core.round_messages import GLOBAL_STAGE, GROUP_STAGE, GroupDone
from p2pfl.core.rounds_base import FETCH_RETRIES, RETRY_BACKOFF_S
from p2pfl.core.scatter import SLACK_BYTES
from p2pfl.core.tokens import AggToken, TimerKind
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import decode, unseal

if TYPE_CHECKING:
    from p2pfl.core.fedavg_rounds import FedAvgRounds

DEFAULT_GROUP_SIZE = 8


def group_size(offer: Any) -> int:
    """The group size of a hierarchical task; 0: not hierarchical."""
    agg = aggregation(offer)
    if agg.get("kind") != "hierarchical" or offer.protocol == "gossip":
        return 0
    size = agg.get("group_size", DEFAULT_GROUP_SIZE)
    if type(size) is not int or not 2 <= size <= MAX_GROUP_SIZE:
        return 0  # refused when the offer is checked (offer_problem); never trusted here
    return size


def groups(participants: tuple[str, ...], size: int) -> list[tuple[str, ...]]:
    return [participants[i : i + size] for i in range(0, len(participants), size)]


def label_groups(
    participants: tuple[str, ...], label: dict[str, str], size: int | None = None
) -> list[tuple[str, ...]]:
    """A group per label value (members in rank order; groups in the rank order of their
    best member), each cut into runs of `size` when given."""
    by_value: dict[str, list[str]] = {}
    for p in participants:
        by_value.setdefault(label.get(p, ""), []).append(p)
    out: list[tuple[str, ...]] = []
    for members in by_value.values():  # dicts keep insertion order: best member first
        out += groups(tuple(members), size) if size else [tuple(members)]
    return out


@functools.lru_cache(maxsize=16)
def roster_labels(task_id: str, volunteers: tuple[bytes, ...]) -> dict[str, str]:
    """peer -> its `group` value, from the signed volunteer records a roster carries
    (their signatures were checked when the roster was accepted; memoised: every node of
    a simulation holds the same roster)."""
    out: dict[str, str] = {}
    for raw in volunteers:
        vol = unseal(decode(raw))
        if isinstance(vol, Volunteer) and vol.task_id == task_id:
            out[vol.peer] = vol.group
    return out


def leaders(group_list: list[tuple[str, ...]], included: tuple[str, ...]) -> dict[int, str]:
    """Group index -> its leader under a close (groups with no included member: none)."""
    inc = set(included)
    out = {}
    for k, members in enumerate(group_list):
        first = next((p for p in members if p in inc), None)
        if first is not None:
            out[k] = first
    return out


class Hierarchy:
    """This node's part in the hierarchical aggregation of the rounds of one task."""

    def __init__(self, rounds: FedAvgRounds, size: int) -> None:
        self.rounds = rounds
        self.task = rounds.task
        roster = self.task.roster
        assert roster is not None
        by = aggregation(self.task.offer).get("group_by")
        if isinstance(by, str):
            split = aggregation(self.task.offer).get("group_size")
            call = self.task.call  # a large task's records are in its call
            labels = (
                dict(call.groups)
                if call is not None
                else roster_labels(self.task.task_id, roster.volunteers)
            )
            self.groups = label_groups(roster.participants, labels, split)
        else:
            self.groups = groups(roster.participants, size)
        self.group_of = {p: k for k, members in enumerate(self.groups) for p in members}
        self.close: RoundClose | None = None
        self.leader: dict[int, str] = {}
        self.group_done: dict[int, GroupDone] = {}  # group -> its leader's group model
        self.global_done: dict[str, GroupDone] = {}  # leader -> its global model
        self.held: dict[tuple[int, int], list[GroupDone]] = {}  # an attempt ahead of ours
        self.want: dict[str, tuple[str, ...]] = {}  # cid -> providers, while fetching
        self.have: set[str] = set()
        self.retries: dict[str, int] = {}
        self.later: dict[str, tuple[BlobRef, tuple[str, ...]]] = {}
        self.started: set[str] = set()  # stages under way: "group", "global", "take"
        self.deadlines = 0

    # --- the close -----------------------------------------------------------------------

    def start(self, now: float, close: RoundClose) -> list[Command]:
        task = self.task
        self.close = close
        self.leader = leaders(self.groups, close.included)
        self.group_done, self.global_done = {}, {}
        self.want, self.later, self.started, self.deadlines = {}, {}, set(), 0
        self.have &= set().union(*self.rounds.round_blobs.values())  # not forgotten
        out: list[Command] = [
            SetTimer(task.timer(TimerKind.RECLOSE, close.round), now + task.offer.round_timeout_s)
        ]
        mine = self.my_group()
        if mine is not None:  # we lead a group: fetch its updates
            updates = self.rounds.updates.get(close.round, {})
            for p in self.members(mine):
                ref = updates[p].ref
                if ref is not None and ref.cid not in self.have:
                    out += self._fetch(ref, (p,))
            out += self._try_group()
        for held in self.held.pop((close.round, close.attempt), []):
            out += self.on_done(now, held)
        self.held = {k: v for k, v in self.held.items() if k[0] >= close.round}
        return out

    def my_group(self) -> int | None:
        """The group we lead under the close, if any."""
        me = self.task.my_id
        k = self.group_of.get(me)
        return k if k is not None and self.leader.get(k) == me else None

    def members(self, k: int) -> list[str]:
        """Group k's included members, in the close's order."""
        close = self.close
        assert close is not None
        return [p for p in close.included if self.group_of.get(p) == k]

    def weight(self, k: int) -> float:
        updates = self.rounds.updates.get(self.task.round, {})
        return float(sum(updates[p].num_samples for p in self.members(k) if p in updates))

    def source(self) -> str | None:
        """The leader we take the global model from: our group's, else the first live one."""
        task = self.task
        gone = task.dead | set(task.withdrawn)
        k = self.group_of.get(task.my_id)
        order = ([self.leader[k]] if k in self.leader else []) + [
            self.leader[j] for j in sorted(self.leader)
        ]
        return next((p for p in order if p not in gone), None)

    def complete(self) -> bool:
        """The global model is ours (what the coordinator waits for before re-closing)."""
        return "take" in self.started

    # --- stage 1: our group ---------------------------------------------------------------

    def _try_group(self) -> list[Command]:
        k = self.my_group()
        close = self.close
        if k is None or close is None or "group" in self.started:
            return []
        updates = self.rounds.updates.get(close.round, {})
        refs = [updates[p].ref for p in self.members(k)]
        if any(r is None or r.cid not in self.have for r in refs):
            return []
        self.started.add("group")
        weights = [float(updates[p].num_samples) for p in self.members(k)]
        agg = self.rounds.aggregate(
            close.round,
            [r for r in refs if r is not None],
            weights,
            self.task.offer.aggregator,
            close.attempt,
        )
        token = AggToken(self.task.task_id, close.round, close.attempt, stage=GROUP_STAGE)
        return [_with_token(agg, token)]

    # --- stage 2: every group's model -> the global one -----------------------------------

    def _try_global(self) -> list[Command]:
        close = self.close
        task = self.task
        if close is None or self.my_group() is None or "global" in self.started:
            return []
        if set(self.group_done) != set(self.leader):
            return []
        refs = [self.group_done[k].ref for k in sorted(self.leader)]
        if any(r.cid not in self.have for r in refs):
            return []
        self.started.add("global")
        weights = [self.weight(k) for k in sorted(self.leader)]
        agg = self.rounds.aggregate(close.round, refs, weights, "fedavg", close.attempt)
        token = AggToken(task.task_id, close.round, close.attempt, stage=GLOBAL_STAGE)
        return [_with_token(agg, token)]

    def on_aggregated(self, now: float, event: Aggregated) -> list[Command]:
        task = self.task
        close = self.close
        token = event.token
        if close is None or (token.round, token.attempt) != (close.round, close.attempt):
            return []
        if event.ref is None:
            return task.withdraw(
                now, f"round {token.round}: {token.stage} aggregation failed: {event.reason}"
            )
        k = self.my_group()
        if k is None:
            return []
        self.have.add(event.ref.cid)
        self.rounds.round_blobs.setdefault(token.round, set()).add(event.ref.cid)
        done = GroupDone(
            task.task_id, close.round, close.attempt, task.my_id, k, token.stage, event.ref
        )
        out: list[Command] = [Publish(TOPIC_TASKS, done)]
        if token.stage == GROUP_STAGE:
            # An update left out here (bad tensors) still counts in its group's weight:
            # every node computes group weights from the announced updates alone.
            return out + self._try_global()
        self.started.add("take")
        plain = Aggregated(AggToken(task.task_id, close.round, close.attempt), event.ref)
        return out + self.rounds.on_aggregated(now, plain)

    # --- what leaders publish ---------------------------------------------------------------

    def on_done(self, now: float, done: GroupDone) -> list[Command]:
        task = self.task
        close = self.close
        if done.peer not in task.participants:
            return []
        if close is None or (done.round, done.attempt) > (close.round, close.attempt):
            key = (done.round, done.attempt)
            held = (
                self.held.setdefault(key, [])
                if task.round <= done.round <= task.round + 1
                else None
            )
            if held is not None and len(held) < 2 * len(self.groups) and len(self.held) <= 4:
                held.append(done)
            return []
        if (done.round, done.attempt) != (close.round, close.attempt):
            return []
        if done.ref.size > self._cap():
            return [
                self._warn(
                    f"{done.stage} model of {done.peer[-8:]} refused: {done.ref.size} bytes, over {self._cap()}"
                )
            ]
        if done.stage == GROUP_STAGE:
            if self.leader.get(done.group) != done.peer:
                return [
                    self._warn(
                        f"group {done.group} model from {done.peer[-8:]} refused: not its leader"
                    )
                ]
            if done.group in self.group_done:
                return []
            self.group_done[done.group] = done
            if self.my_group() is None:
                return []
            out = self._fetch(done.ref, (done.peer,)) if done.ref.cid not in self.have else []
            return out + self._try_global()
        if self.leader.get(self.group_of.get(done.peer, -1)) != done.peer:
            return [self._warn(f"global model from {done.peer[-8:]} refused: not a leader")]
        self.global_done.setdefault(done.peer, done)
        return self._try_take(now)

    def _try_take(self, now: float) -> list[Command]:
        """A member: take the global model from its source leader once it is here."""
        if self.my_group() is not None or "take" in self.started:
            return []
        source = self.source()
        done = self.global_done.get(source) if source is not None else None
        if done is None:
            return []
        if done.ref.cid not in self.have:
            return self._fetch(done.ref, (done.peer,)) if done.ref.cid not in self.want else []
        self.started.add("take")
        task = self.task
        self.rounds.round_blobs.setdefault(done.round, set()).add(done.ref.cid)
        return self.rounds.on_aggregated(
            now, Aggregated(AggToken(task.task_id, done.round, done.attempt), done.ref)
        )

    def on_view_changed(self, now: float) -> list[Command]:
        return self._try_take(now) if self.close is not None else []

    # --- blobs ---------------------------------------------------------------------------

    def wants(self, cid: str) -> bool:
        return cid in self.want

    def _fetch(self, ref: BlobRef, providers: tuple[str, ...]) -> list[Command]:
        me = self.task.my_id
        self.want[ref.cid] = tuple(p for p in providers if p != me)
        self.rounds.round_blobs.setdefault(self.task.round, set()).add(ref.cid)
        return [FetchBlob(ref, self.want[ref.cid])]

    def on_blob(self, now: float, cid: str, ok: bool, reason: str) -> list[Command]:
        providers = self.want.pop(cid, ())
        if ok:
            self.have.add(cid)
            return self._try_group() + self._try_global() + self._try_take(now)
        task = self.task
        tries = self.retries.get(cid, 0)
        ref = self._ref_of(cid)
        if ref is None:
            return []
        if tries < FETCH_RETRIES and not (set(providers) & task.dead):
            self.retries[cid] = tries + 1
            self.later[cid] = (ref, providers)
            delay = RETRY_BACKOFF_S * (2**tries)
            return [SetTimer(task.timer(TimerKind.REFETCH, task.round, cid), now + delay)]
        return self.rounds.redo(now, set(providers[:1]), f"blob {cid[:16]} unfetchable ({reason})")

    def refetch(self, cid: str) -> list[Command]:
        later = self.later.pop(cid, None)
        return self._fetch(*later) if later is not None else []

    def _ref_of(self, cid: str) -> BlobRef | None:
        for update in self.rounds.updates.get(self.task.round, {}).values():
            if update.ref is not None and update.ref.cid == cid:
                return update.ref
        for done in [*self.group_done.values(), *self.global_done.values()]:
            if done.ref.cid == cid:
                return done.ref
        return None

    # --- a stalled round -----------------------------------------------------------------

    def on_deadline(self, now: float) -> list[Command]:
        """The round's deadline under this close: the coordinator re-closes without the
        leaders whose group model is missing (their groups' next in rank lead instead);
        others wait one more deadline, then withdraw (the base RECLOSE rule)."""
        task = self.task
        close = self.close
        assert close is not None
        self.deadlines += 1
        if task.acting() == task.my_id and not self.complete():
            silent = {self.leader[k] for k in self.leader if k not in self.group_done}
            if not silent and self.my_group() is None:
                silent = {self.source() or ""} - {""}
            if silent:
                return self.rounds.redo(now, silent, "group models missing at the deadline")
        return [
            SetTimer(task.timer(TimerKind.RECLOSE, close.round), now + task.offer.round_timeout_s)
        ]

    def _cap(self) -> int:
        model = self.task.global_ref
        return (model.size if model is not None else 0) + SLACK_BYTES

    def _warn(self, text: str) -> Command:
        return Log("warning", f"task {self.task.task_id[:12]}: {text}")


def _with_token(agg: Aggregate, token: AggToken) -> Aggregate:
    from dataclasses import replace

    return replace(agg, token=token)
