"""Reduce-scatter + all-gather of one fedavg/fedprox round at one node.

The rule (every node evaluates it from the offer and the roster, so nobody announces it):
a task of n participants, 4 <= n <= MAX_SLICES, that sets no max_update_norm, moves its
updates by reduce-scatter when its aggregator is fedavg (fedprox rounds aggregate with
fedavg) and `aggregation` is auto (the default) or reduce-scatter; or, asked for with
`aggregation: {kind: reduce-scatter}`, when it is median, trimmed mean or Krum. Each model
is cut into n slices (fl/slices.py). Under a RoundClose the owner of slice j is the first
participant, in rank order cyclically from participant j, whose update the close
includes; so a participant lost mid-round has its slices reassigned by the coordinator's
re-close, which leaves it out.

1. After training, a participant cuts its update into n slice blobs, announces the
   update (RoundUpdate) as before, and at once offers each slice to its likely owner
   (SliceOffer, a direct message, signed): under a close that includes everyone,
   participant j owns slice j. Offers are O(n) bytes per node (slice refs in the
   gossiped update were O(n^2): 0.45 models per node per round at 128 nodes).
2. Participant j fetches slice j of each update as its offer arrives, before the close
   (`prefetch`). The close names who owns what; an author offers its slices to any owner
   the close moved, and an owner asks again (SliceAsk) for offers still missing. The
   owner combines slice j of every included update in the close's order (`included`, sorted)
   with the offer's aggregator and tells every participant (SliceDone; `tell`). Honest
   owners hold identical inputs, so the slice is a pure function of the close.
3. Everyone fetches the n combined slices from their owners and (fedavg: once every
   slice passes its check, core/verify.py) assembles the model:
   the slices' bytes end to end in slice order (verified by cid), so every node holds
   the bit-identical model; it equals, bit for bit, what all-gather computes.

Each node sends and receives about 2(n-1)/n models per round instead of n-1.

Who may say what is checked here: a SliceDone counts only from the owner of its slice
under the close; an offer only from the author itself (the transport authenticates the
sender; under fedavg it is signed too, and an owner offers its own slice to its
witness); a slice or combined slice larger than the model is refused unread, and one whose
tensors do not fit the slice's place is refused when combined (the coordinator re-closes
without its author) or assembled (re-closed without its owner).

What it trusts. A combined slice is as trustworthy as its owner: nobody else holds that
slice's inputs. Under fedavg every node checks every combined slice against the
participants' random linear sketches before assembling (core/sketch.py, core/verify.py):
an owner that shifts its slice, or a participant that lies in its sketch, is caught and
excluded, unless two of them collude. Median, trimmed mean and Krum are not linear: an
owner can set its 1/n of the model to anything, which a robust aggregator cannot bound
(the owner publishes the aggregate, not an input to it), so for them reduce-scatter is
only used when asked for, by consortia that accept that trust in exchange for 2(n-1)/n
models per node per round (as for hierarchical groups, whose leaders combine for their
group).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pfl.core.aggregation import aggregation
from p2pfl.core.commands import (
    Aggregated,
    CancelTimer,
    Command,
    FetchBlob,
    Log,
    Send,
    SetTimer,
    SliceWork,
    SliceWorked,
)
from p2pfl.core.messages import RoundClose
from p2pfl.core.phase import Phase
from p2pfl.core.round_messages import MAX_SLICES, SliceAsk, SliceDone, SliceOffer, StageAsk
from p2pfl.core.rounds_base import FETCH_RETRIES, RETRY_BACKOFF_S
from p2pfl.core.tokens import AggToken, SliceToken, TimerKind
from p2pfl.core.verify import WORK_KINDS, SliceCheck
from p2pfl.limits import KiB, blob_too_big
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed, encode, seal

if TYPE_CHECKING:
    from p2pfl.core.fedavg_rounds import FedAvgRounds

COORDINATE_WISE = ("fedavg", "median", "trimmed_mean")
# Krum's per-slice distance matrices cost n^2 floats per slice (n^3 per node): up to here.
KRUM_MAX_SLICES = 32
GRACE_S = 2.0  # the coordinator's wait for owners' reports after the round's deadline
SLACK_BYTES = 64 * KiB  # tensor headers: a slice is never larger than the model plus this
MAX_HELD_ATTEMPTS = 4  # close attempts ahead of ours whose SliceDones are held
MAX_ANSWERS = 8  # a participant's StageAsks answered per close and per message we add
MAX_OFFER_ANSWERS = 16  # a slice's offer is sent again at most this often per close
ASK_AFTER_S = 2.0  # a stage message still missing this long after the close: ask for it


def verified(offer: Any) -> bool:
    """Whether every node checks the combined slices (core/verify.py): the aggregator is
    linear (fedavg; fedprox rounds aggregate with fedavg)."""
    return bool(offer.aggregator == "fedavg")


def slice_count(offer: Any, participants: tuple[str, ...]) -> int:
    """How many slices each update is cut into this task; 0: all-gather."""
    kind = aggregation(offer).get("kind", "auto")
    n = len(participants)
    # The default for fedavg/fedprox, whose slices every node checks; asked for only for
    # the robust aggregators, whose owners are trusted (see the module docstring).
    if offer.protocol == "gossip" or kind not in ("auto", "reduce-scatter"):
        return 0
    if kind == "auto" and not verified(offer):
        return 0
    if offer.max_update_norm > 0:
        return 0  # the norm check needs whole updates
    if offer.aggregator not in COORDINATE_WISE and offer.aggregator != "krum":
        return 0
    if n < 4 or n > (KRUM_MAX_SLICES if offer.aggregator == "krum" else MAX_SLICES):
        return 0
    return n


def owners(participants: tuple[str, ...], included: tuple[str, ...], count: int) -> list[str]:
    """Owner of each slice under a close: the first included participant at or after
    position j in rank order (cyclically)."""
    inc = set(included)
    n = len(participants)
    out = []
    for j in range(count):
        out.append(
            next(participants[(j + k) % n] for k in range(n) if participants[(j + k) % n] in inc)
        )
    return out


class Scatter:
    """This node's part in the reduce-scatter of the rounds of one task."""

    def __init__(self, rounds: FedAvgRounds, count: int) -> None:
        self.rounds = rounds
        self.task = rounds.task
        self.count = count
        self.mine: dict[int, tuple[BlobRef, ...]] = {}  # round -> our update's slices
        self.cutting: dict[int, dict[str, Any]] = {}  # round -> training result being cut
        self.offers: dict[int, dict[tuple[str, int], BlobRef]] = {}
        self.offered: dict[int, dict[int, str]] = {}  # round -> slice -> who we offered it to
        self.rank = rounds.task.participants.index(rounds.task.my_id)
        self.held: dict[tuple[int, int], dict[int, SliceDone]] = {}  # early SliceDones
        self.close: RoundClose | None = None
        self.owner: list[str] = []
        self.done: dict[int, SliceDone] = {}  # index -> the owner's SliceDone
        self.reducing: set[int] = set()  # our slices whose reduce is under way or done
        self.want: dict[str, tuple[str, ...]] = {}  # cid -> providers, while fetching
        self.retries: dict[str, int] = {}
        self.later: dict[str, tuple[BlobRef, tuple[str, ...]]] = {}  # cid -> retry (ref, providers)
        self.assembling = False
        # The model, when it was assembled before the slice check passed (`try_assemble`).
        self.assembled: Aggregated | None = None
        self.deadlines = 0  # RECLOSE deadlines passed under the current close
        self.krum = rounds.task.offer.aggregator == "krum"
        self.inputs: dict[int, tuple[BlobRef, ...]] = {}  # Krum: our slices' inputs
        self.choosing = False
        self.chosen = -1  # Krum: the position of the update chosen under the close
        self.told: list[Any] = []  # our stage messages under the current close (StageAsk)
        # (asker, how many stage messages we had told) -> StageAsks answered so, under
        # the close: an ask that came before our messages existed does not use up the
        # answers to the ones that came after.
        self.answered: dict[tuple[str, int], int] = {}
        self.offer_asks = 0  # times we asked again for missing offers under the close
        self.offer_answers: dict[tuple[str, int], int] = {}  # (asker, index) -> resent
        self.check = SliceCheck(self) if verified(rounds.task.offer) else None

    # --- cutting our update ---------------------------------------------------------------

    def cut(self, rnd: int, ref: BlobRef, result: dict[str, Any]) -> list[Command]:
        task = self.task
        assert task.global_ref is not None
        self.cutting[rnd] = result
        token = SliceToken(task.task_id, rnd, 0, "cut")
        return [SliceWork((ref,), self.count, task.global_ref, token)]

    # --- the close ------------------------------------------------------------------------

    def start(self, now: float, close: RoundClose) -> list[Command]:
        """The round's close (or a re-close) is accepted: play our parts under it."""
        task = self.task
        self.close = close
        self.owner = owners(task.participants, close.included, self.count)
        # Fetches under way (`want`) go on: a prefetched slice, or one of the close this
        # re-close replaces, is still the same blob (content-addressed).
        self.done, self.reducing, self.assembling, self.assembled = {}, set(), False, None
        self.later = {}
        self.deadlines = 0
        self.inputs, self.choosing, self.chosen = {}, False, -1
        self.told, self.answered = [], {}
        self.offer_asks, self.offer_answers = 0, {}
        self.offers = {r: o for r, o in self.offers.items() if r >= close.round}
        self.offered = {r: o for r, o in self.offered.items() if r >= close.round}
        self.mine = {r: m for r, m in self.mine.items() if r >= close.round}
        # Blobs of forgotten rounds are no longer held (core/rounds_base.py forget_before).
        tracked = set().union(*self.rounds.round_blobs.values())
        self.rounds.slice_blobs &= tracked
        out: list[Command] = []
        check = self.check
        if check is not None:
            out += check.start(now)
        me = task.my_id
        mine = self.mine.get(close.round)
        if me in close.included and mine is not None:
            # Offers to owners (and our own slice's witness) the close moved from the
            # ones we offered each slice to when we announced our update.
            offered = self.offered.setdefault(close.round, {})
            for j, owner in enumerate(self.owner):
                to = owner if owner != me else (check.witness[j] if check is not None else None)
                if to is not None and offered.get(j) != to:
                    offered[j] = to
                    out.append(Send(to, self._signed_offer(close.round, j, mine[j]), mine[j]))
        if check is not None:
            # A witness sketches its owner's own slice (core/verify.py).
            for j in check.witnessed():
                ref = self.slice_of(close.round, self.owner[j], j)
                if ref is None or ref.cid in self._have or ref.cid in self.want:
                    continue
                if self._too_big(ref) is None:  # else not sketched: its owner answers for it
                    out += self._fetch(ref, (self.owner[j],))
        out.append(
            SetTimer(task.timer(TimerKind.RECLOSE, close.round), now + task.offer.round_timeout_s)
        )
        out.append(SetTimer(task.timer(TimerKind.SLICES, close.round), now + RETRY_BACKOFF_S))
        out.append(SetTimer(task.timer(TimerKind.STAGE, close.round), now + ASK_AFTER_S))
        for j in self.my_indices():
            out += self._try_reduce(j)
        for done in self.held.pop((close.round, close.attempt), {}).values():
            out += self.on_done(now, done)
        self.held = {k: v for k, v in self.held.items() if k[0] >= close.round}
        return out

    def my_indices(self) -> list[int]:
        me = self.task.my_id
        return [j for j, owner in enumerate(self.owner) if owner == me]

    def complete(self) -> bool:
        return len(self.done) == self.count

    # --- offers and our slices -------------------------------------------------------------

    def _signed_offer(self, rnd: int, j: int, ref: BlobRef) -> Signed | SliceOffer:
        """Our offer of slice j, signed when slices are checked (an owner or witness may
        show it in a SketchProof), and kept in that form for our own proofs."""
        task = self.task
        offer = SliceOffer(task.task_id, rnd, task.my_id, j, ref)
        if self.check is None:
            return offer
        envelope = seal(task.me, offer)
        self.check.signed_offers.setdefault(rnd, {})[(task.my_id, j)] = encode(envelope)
        return envelope

    def offer_early(self, rnd: int) -> list[Command]:
        """Our update is cut: offer each slice to the participant that owns it under a
        close that includes everyone (participant j owns slice j), and our own slice to
        its witness there (the participant after us), so that they fetch while the round
        is still open."""
        task = self.task
        mine = self.mine.get(rnd)
        if mine is None:
            return []
        n = len(task.participants)
        offered = self.offered.setdefault(rnd, {})
        out: list[Command] = []
        for j, to in enumerate(task.participants[: self.count]):
            if to == task.my_id:
                if self.check is None:
                    continue
                to = task.participants[(self.rank + 1) % n]
            if to in task.dead or to in task.withdrawn:
                continue
            offered[j] = to
            out.append(Send(to, self._signed_offer(rnd, j, mine[j]), mine[j]))
        return out

    def slice_of(self, rnd: int, author: str, j: int) -> BlobRef | None:
        """Slice j of `author`'s update of round `rnd`, as its offer names it."""
        if author == self.task.my_id:
            mine = self.mine.get(rnd)
            return mine[j] if mine is not None else None
        return self.offers.get(rnd, {}).get((author, j))

    def prefetch(self, offer: SliceOffer) -> list[Command]:
        """Fetch an offered slice while the round is still open when we will most likely
        combine it (slice `rank`) or witness it (slice `rank - 1`, of the participant
        before us): what a close that includes everyone asks of us. A close that leaves
        someone out moves owners, and `start` fetches what is then missing; a slice
        fetched for nothing is 1/n of a model."""
        task = self.task
        if offer.round != task.round or offer.peer == task.my_id:
            return []
        if task.global_ref is None:
            return []  # no model to check the slice's size against yet: after our cut
        n = len(task.participants)
        witnessing = offer.index == (self.rank - 1) % n and self.check is not None
        if offer.index != self.rank and not (
            witnessing and task.participants[offer.index] == offer.peer
        ):
            return []
        ref = offer.ref
        if ref.cid in self._have or ref.cid in self.want or self._too_big(ref):
            return []
        return self._fetch(ref, (offer.peer,))

    def on_offer(
        self, now: float, offer: SliceOffer, envelope: Signed | None = None
    ) -> list[Command]:
        task = self.task
        if offer.peer not in task.participants or offer.index >= self.count:
            return []
        if not task.round <= offer.round <= task.round + 1:
            return []
        problem = self._too_big(offer.ref)
        got = self.offers.setdefault(offer.round, {})
        key = (offer.peer, offer.index)
        if problem is None and key not in got and self.check is not None:
            problem = self.check.keep_offer(offer, envelope)
        if problem is not None:
            return [self._warn(f"slice offer of {offer.peer[-8:]} refused: {problem}")]
        if key in got or len(got) >= self.count * len(task.participants):
            return []
        got[key] = offer.ref
        close = self.close
        if close is None or close.round != offer.round:
            return self.prefetch(offer)
        if self.check is not None and offer.index in self.check.witnessed():
            if offer.peer == self.owner[offer.index] and offer.ref.cid not in self._have:
                if offer.ref.cid not in self.want:
                    return self._fetch(offer.ref, (offer.peer,))
        if offer.index not in self.my_indices():
            return []
        return self._try_reduce(offer.index)

    def _inputs(self, j: int) -> list[BlobRef] | None:
        """Slice j of every included update, in the close's order (None: an update missing)."""
        close = self.close
        assert close is not None
        refs = []
        for author in close.included:
            ref = self.slice_of(close.round, author, j)
            if ref is None:
                return None
            refs.append(ref)
        return refs

    def _try_reduce(self, j: int) -> list[Command]:
        close = self.close
        if close is None or j in self.reducing or self.task.phase is not Phase.AGGREGATING:
            return []
        out: list[Command] = []
        for author in close.included:
            ref = self.slice_of(close.round, author, j)
            problem = self._too_big(ref) if ref is not None else None
            if problem is not None:
                # Offered before our model existed, and larger than it: a malformed input.
                self.reducing.add(j)
                task = self.task
                msg = SliceDone(
                    task.task_id, close.round, close.attempt, task.my_id, j, None, (author,)
                )
                return [
                    self._warn(f"slice {j} of {author[-8:]} refused: {problem}"),
                    *self.tell(msg),
                ]
            if ref is None or ref.cid in self._have or ref.cid in self.want:
                continue
            if ref.cid not in self.later:
                out += self._fetch(ref, (author,))
        refs = self._inputs(j)
        if refs is None or out or any(r.cid not in self._have for r in refs):
            return out
        self.reducing.add(j)
        rounds = self.rounds
        updates = rounds.updates.get(close.round, {})
        weights = tuple(float(updates[p].num_samples) for p in close.included)
        task = self.task
        assert task.global_ref is not None
        kind = "distances" if self.krum else "reduce"
        self.inputs[j] = tuple(refs)
        token = SliceToken(task.task_id, close.round, close.attempt, kind, j)
        return [
            SliceWork(
                tuple(refs),
                self.count,
                task.global_ref,
                token,
                task.offer.aggregator,
                weights,
                rounds.aggregator_options(len(refs)),
            )
        ]

    # --- blobs ---------------------------------------------------------------------------

    @property
    def _have(self) -> set[str]:
        return self.rounds.slice_blobs

    def _fetch(self, ref: BlobRef, providers: tuple[str, ...]) -> list[Command]:
        me = self.task.my_id
        self.want[ref.cid] = tuple(p for p in providers if p != me)
        self.rounds.round_blobs.setdefault(self.task.round, set()).add(ref.cid)
        return [FetchBlob(ref, self.want[ref.cid])]

    def wants(self, cid: str) -> bool:
        return cid in self.want

    def on_blob(self, now: float, cid: str, ok: bool, reason: str) -> list[Command]:
        providers = self.want.pop(cid, ())
        if not ok:
            return self._fetch_failed(now, cid, providers, reason)
        self._have.add(cid)
        out: list[Command] = []
        for j in self.my_indices():
            out += self._try_reduce(j)
        if self.check is not None:
            out += self.check.check_proofs()
        return out + self.try_assemble(now)

    def _fetch_failed(
        self, now: float, cid: str, providers: tuple[str, ...], reason: str
    ) -> list[Command]:
        """Ask again (other live participants may hold it by now: everyone fetches every
        combined slice); past the retries, the round is re-closed without the provider."""
        task = self.task
        close = self.close
        if self.check is not None and self.check.wants(cid):
            return self.check.proof_unfetchable(cid)
        tries = self.retries.get(cid, 0)
        ref = self._ref_of(cid)
        if close is None or ref is None:
            return []
        if tries < FETCH_RETRIES:
            # A fetch can fail while its provider lives (a timeout under load): ask again
            # after 1, 2, 4 s, then also of every live participant (everyone fetches
            # every combined slice, so others may hold it by now).
            self.retries[cid] = tries + 1
            live = tuple(p for p in close.included if p not in task.dead and p != task.my_id)
            others = providers + tuple(p for p in live if p not in providers)
            self.later[cid] = (ref, others if tries >= 1 else providers)
            delay = RETRY_BACKOFF_S * (2**tries)
            return [SetTimer(task.timer(TimerKind.REFETCH, task.round, cid), now + delay)]
        culprit = set(providers[:1])
        return self.rounds.redo(now, culprit, f"slice blob {cid[:16]} unfetchable ({reason})")

    def _ref_of(self, cid: str) -> BlobRef | None:
        for ref in self.mine.get(self.task.round, ()):
            if ref.cid == cid:
                return ref
        for ref in self.offers.get(self.task.round, {}).values():
            if ref.cid == cid:
                return ref
        for done in self.done.values():
            if done.ref is not None and done.ref.cid == cid:
                return done.ref
            for ref in done.inputs:
                if ref.cid == cid:
                    return ref
        return None

    def refetch(self, cid: str) -> list[Command]:
        later = self.later.pop(cid, None)
        return self._fetch(*later) if later is not None else []

    # --- combined slices ---------------------------------------------------------------

    def on_done(self, now: float, done: SliceDone) -> list[Command]:
        task = self.task
        close = self.close
        if done.peer not in task.participants or done.index >= self.count:
            return []
        if close is None or (done.round, done.attempt) > (close.round, close.attempt):
            key = (done.round, done.attempt)
            if task.round <= done.round <= task.round + 1 and (
                key in self.held or len(self.held) < MAX_HELD_ATTEMPTS
            ):
                self.held.setdefault(key, {}).setdefault(done.index, done)
            return []
        if (done.round, done.attempt) != (close.round, close.attempt):
            return []  # an older attempt's
        if self.owner[done.index] != done.peer:
            return [
                self._warn(
                    f"slice {done.index} of round {done.round} from {done.peer[-8:]} refused: "
                    f"not its slice (the owner is {self.owner[done.index][-8:]})"
                )
            ]
        if done.index in self.done:
            return []  # first from the owner wins: an owner equivocating is its own fault
        if done.ref is None:
            bad = set(done.dropped) & set(close.included)
            if not bad or done.peer in bad:
                return [
                    self._warn(f"slice {done.index} report of {done.peer[-8:]} names nobody it may")
                ]
            self.done[done.index] = done
            why = f"{done.peer[-8:]} got no well-formed slice {done.index} from it"
            return self.rounds.redo(now, bad, why)
        problem = self._too_big(done.ref)
        if self.krum and problem is None:
            if len(done.inputs) != len(close.included):
                problem = f"{len(done.inputs)} input slices for {len(close.included)} updates"
            else:
                problem = next(filter(None, map(self._too_big, done.inputs)), None)
        elif done.inputs:
            problem = "input slices are for Krum only"
        if problem is not None:
            return [self._warn(f"slice {done.index} from {done.peer[-8:]} refused: {problem}")]
        self.done[done.index] = done
        out: list[Command] = []
        if done.ref.cid not in self._have and done.ref.cid not in self.want:
            out += self._fetch(done.ref, (done.peer,))
        return out + self.try_assemble(now)

    def try_assemble(self, now: float) -> list[Command]:
        """Assemble the model once every combined slice is here. Under a slice check the
        assembly runs while the check does (it waits for everyone's sketches); the model
        is taken only once the check passes, and dropped with the close if it fails."""
        close = self.close
        if close is None or not self.complete():
            return []
        if self.check is not None and not self.check.verified:
            out = self.check.advance(now)
            if self.check.verified:  # it passed and took the model (or asked for it)
                return out
            return out + self._assemble(now)
        if self.assembled is not None:
            agg, self.assembled = self.assembled, None
            return self._take(now, agg)
        return self._assemble(now)

    def _take(self, now: float, agg: Aggregated) -> list[Command]:
        """The round's model, assembled and (under a slice check) checked."""
        assert self.close is not None
        stop = CancelTimer(self.task.timer(TimerKind.STAGE, self.close.round))
        return [stop, *self.rounds.assembled(now, agg)]

    def _assemble(self, now: float) -> list[Command]:
        close = self.close
        task = self.task
        if close is None or self.assembling:
            return []
        if any(d.ref is None or d.ref.cid not in self._have for d in self.done.values()):
            return []
        if task.phase is not Phase.AGGREGATING or task.round != close.round:
            return []
        assert task.global_ref is not None
        combined = [self.done[j].ref for j in range(self.count)]
        refs = tuple(r for r in combined if r is not None)
        if self.krum:
            # Every node sums the slices' distance matrices in slice order, picks the same
            # update, and assembles that update's slices (as the owners received them).
            if self.chosen < 0:
                if self.choosing:
                    return []
                self.choosing = True
                updates = self.rounds.updates.get(close.round, {})
                n = len(close.included)
                token = SliceToken(task.task_id, close.round, close.attempt, "krum")
                weights = tuple(float(updates[p].num_samples) for p in close.included)
                opts = self.rounds.aggregator_options(n)
                return [SliceWork(refs, self.count, task.global_ref, token, "krum", weights, opts)]
            author = close.included[self.chosen]
            refs = tuple(self.done[j].inputs[self.chosen] for j in range(self.count))
            out: list[Command] = []
            for j, ref in enumerate(refs):
                if (
                    ref.cid not in self._have
                    and ref.cid not in self.want
                    and ref.cid not in self.later
                ):
                    out += self._fetch(ref, (self.owner[j], author))
            if any(ref.cid not in self._have for ref in refs):
                return out
        self.assembling = True
        token = SliceToken(task.task_id, close.round, close.attempt, "assemble")
        work = SliceWork(refs, self.count, task.global_ref, token)
        if self.check is not None and not self.check.verified:
            return [work]  # stage messages may still be missing: keep asking for them
        return [CancelTimer(task.timer(TimerKind.STAGE, close.round)), work]

    # --- work done -----------------------------------------------------------------------

    def on_worked(self, now: float, event: SliceWorked) -> list[Command]:
        task = self.task
        token = event.token
        if token.kind == "cut":
            result = self.cutting.pop(token.round, None)
            if result is None or token.round != task.round:
                return []
            if event.reason or len(event.refs) != self.count:
                return task.withdraw(
                    now, f"round {token.round}: cutting the update failed: {event.reason}"
                )
            self.mine[token.round] = event.refs
            self.rounds.slice_blobs.update(r.cid for r in event.refs)
            self.rounds.round_blobs.setdefault(token.round, set()).update(r.cid for r in event.refs)
            out = self.rounds.announce(now, token.round, result)
            out += self.offer_early(token.round)
            # Offers of faster peers that came while we trained (`prefetch` waits for our
            # round).
            for (author, j), ref in list(self.offers.get(token.round, {}).items()):
                out += self.prefetch(SliceOffer(task.task_id, token.round, author, j, ref))
            return out
        close = self.close
        if close is None or (token.round, token.attempt) != (close.round, close.attempt):
            return []  # superseded by a re-close
        if token.kind in WORK_KINDS and self.check is not None:
            return self.check.on_worked(now, event)
        if token.kind == "krum":
            if event.bad >= 0 and event.bad < self.count:
                owner = self.owner[event.bad]
                return self.rounds.redo(
                    now, {owner}, f"distances of slice {event.bad}: {event.reason}"
                )
            if event.chosen < 0 or event.chosen >= len(close.included):
                return task.withdraw(now, f"round {token.round}: krum failed: {event.reason}")
            self.chosen = event.chosen
            return self.try_assemble(now)
        if token.kind in ("reduce", "distances"):
            if event.bad >= 0:
                author = close.included[event.bad]
                msg = SliceDone(
                    task.task_id,
                    close.round,
                    close.attempt,
                    task.my_id,
                    token.index,
                    None,
                    (author,),
                )
                return [
                    self._warn(f"slice {token.index} of {author[-8:]} malformed: {event.reason}"),
                    *self.tell(msg),
                ]
            if event.reason or not event.refs:
                return task.withdraw(
                    now,
                    f"round {token.round}: combining slice {token.index} failed: {event.reason}",
                )
            ref = event.refs[0]
            self._have.add(ref.cid)
            self.rounds.round_blobs.setdefault(token.round, set()).add(ref.cid)
            inputs = self.inputs.get(token.index, ()) if self.krum else ()
            msg = SliceDone(
                task.task_id, close.round, close.attempt, task.my_id, token.index, ref, (), inputs
            )
            return self.tell(msg, attach=ref)
        # assemble
        if event.bad >= 0 and event.bad < self.count:
            owner = self.owner[event.bad]
            return self.rounds.redo(
                now, {owner}, f"combined slice {event.bad} of {owner[-8:]}: {event.reason}"
            )
        agg = Aggregated(
            AggToken(task.task_id, close.round, close.attempt),
            event.refs[0] if event.refs else None,
            event.reason,
        )
        if self.check is not None and not self.check.verified:
            self.assembled = agg  # taken when the check passes (try_assemble)
            return []
        return self._take(now, agg)

    # --- lost offers (direct messages can be lost) -------------------------------------

    def ask_offers(self, now: float, rnd: int) -> list[Command]:
        """Offers still missing for our slices: ask their authors again, backing off (1,
        then every 2 s) until the round's deadline decides (bounded: the RECLOSE deadline
        replaces the close, and a new close resets this)."""
        task = self.task
        close = self.close
        if close is None or close.round != rnd or task.phase is not Phase.AGGREGATING:
            return []
        lacking = self._lacking_authors(every=True)
        # A witness asks the owner for its own slice too (core/verify.py).
        for j in self.check.lacking_witnessed() if self.check is not None else []:
            lacking.setdefault(j, []).append(self.owner[j])
        if not lacking:
            return []
        self.offer_asks += 1
        out: list[Command] = [
            Send(author, SliceAsk(task.task_id, rnd, task.my_id, j))
            for j, authors in sorted(lacking.items())
            for author in authors
        ]
        delay = RETRY_BACKOFF_S * (2 ** min(self.offer_asks, 1))
        return out + [SetTimer(task.timer(TimerKind.SLICES, rnd), now + delay)]

    def on_offer_ask(self, now: float, ask: SliceAsk) -> list[Command]:
        """Our offer of slice `index` again, to the participant that owns it now."""
        task = self.task
        close = self.close
        mine = self.mine.get(ask.round)
        if close is None or close.round != ask.round or mine is None or ask.index >= self.count:
            return []
        check = self.check
        witness = check is not None and check.witness[ask.index] == ask.peer
        if self.owner[ask.index] != ask.peer and not (
            witness and self.owner[ask.index] == task.my_id
        ):
            return []
        if task.my_id not in close.included:
            return []
        # Answered a bounded number of times per close: asks cannot make us a megaphone.
        key = (ask.peer, ask.index)
        if self.offer_answers.get(key, 0) >= MAX_OFFER_ANSWERS:
            return []
        self.offer_answers[key] = self.offer_answers.get(key, 0) + 1
        ref = mine[ask.index]
        return [Send(ask.peer, self._signed_offer(ask.round, ask.index, ref), ref)]

    # --- lost stage messages (direct messages can be lost) -------------------------------

    def ask_stage(self, now: float, rnd: int) -> list[Command]:
        """Stage messages still missing under the close: ask their senders again (the
        owners of slices not announced; participants with no sketch once the seed is
        known), every 2 s until the model is assembled and checked or the round's deadline
        replaces the close (each peer answers an asker at most MAX_ANSWERS times per close)."""
        task = self.task
        close = self.close
        if close is None or close.round != rnd or task.phase is not Phase.AGGREGATING:
            return []
        if self.assembling and (self.check is None or self.check.verified):
            return []
        missing = {self.owner[j] for j in range(self.count) if j not in self.done}
        check = self.check
        if check is not None and check.seed is not None and not check.verified:
            missing |= {p for p in close.included if p not in check.sketches}
            missing -= check.excluded
        missing -= {task.my_id} | task.dead
        ask = StageAsk(task.task_id, close.round, close.attempt, task.my_id)
        out: list[Command] = [Send(p, ask) for p in sorted(missing)]
        return out + [SetTimer(task.timer(TimerKind.STAGE, rnd), now + ASK_AFTER_S)]

    def on_stage_ask(self, now: float, ask: StageAsk) -> list[Command]:
        """Our stage messages of the asker's close once more, to it alone (bounded)."""
        close = self.close
        if close is None or (ask.round, ask.attempt) != (close.round, close.attempt):
            return []
        if ask.peer not in self.task.participants or ask.peer == self.task.my_id:
            return []
        key = (ask.peer, len(self.told))
        if not self.told or self.answered.get(key, 0) >= MAX_ANSWERS:
            return []
        self.answered[key] = self.answered.get(key, 0) + 1
        return [Send(ask.peer, msg) for msg in self.told]

    # --- a stalled round ----------------------------------------------------------------

    def on_deadline(self, now: float) -> list[Command]:
        """The round's deadline passed under this close. First deadline: an owner still
        missing an author's slice says so (a SliceDone naming that author; the
        coordinator re-closes without it), and the coordinator leaves out authors it
        lacks itself. Second (a grace later): the coordinator re-closes without the owners
        still silent; anyone else withdraws at the third (the base RECLOSE rule)."""
        task = self.task
        close = self.close
        assert close is not None
        self.deadlines += 1
        acting = task.acting() == task.my_id
        out: list[Command] = []
        if self.check is not None and self.complete() and not self.check.verified:
            out += self.check.on_deadline(now, first=self.deadlines == 1)
        if self.deadlines == 1:
            lacking = {j: a[0] for j, a in self._lacking_authors().items()}
            if acting and lacking:
                return self.rounds.redo(now, set(lacking.values()), "slices never offered")
            for j, author in sorted(lacking.items()):
                msg = SliceDone(
                    task.task_id, close.round, close.attempt, task.my_id, j, None, (author,)
                )
                out += self.tell(msg)
            grace = task.offer.round_timeout_s if not acting else 2 * GRACE_S
            return out + [SetTimer(task.timer(TimerKind.RECLOSE, close.round), now + grace)]
        if acting and not self.complete():
            return self.rounds.redo(
                now, self.missing_owners(), "combined slices missing at the deadline"
            )
        return out + [
            SetTimer(task.timer(TimerKind.RECLOSE, close.round), now + task.offer.round_timeout_s)
        ]

    def _lacking_authors(self, every: bool = False) -> dict[int, list[str]]:
        """Our slices whose inputs are incomplete -> the authors not offering one (the
        first only, unless `every`)."""
        close = self.close
        assert close is not None
        me = self.task.my_id
        got = self.offers.get(close.round, {})
        out: dict[int, list[str]] = {}
        for j in self.my_indices():
            if j in self.reducing:
                continue
            authors = [a for a in close.included if a != me and (a, j) not in got]
            if authors:
                out[j] = authors if every else authors[:1]
        return out

    # --- helpers -------------------------------------------------------------------------

    def missing_owners(self) -> set[str]:
        """Owners whose combined slice has not been announced under the current close."""
        return {self.owner[j] for j in range(self.count) if j not in self.done}

    def tell(self, msg: Any, attach: BlobRef | None = None) -> list[Command]:
        """A stage message (SliceDone, SliceSketch) for every participant, us included:
        directly when we are connected to all of them (task.to_participants; over 8 hosts
        the round's gossip was a third of its event-loop time), with the combined slice a
        SliceDone names attached (each participant fetches it at once). Kept to answer
        StageAsk."""
        self.told.append(msg)
        return self.task.to_participants(msg, attach=attach)

    def fetch(self, ref: BlobRef, providers: tuple[str, ...]) -> list[Command]:
        return self._fetch(ref, providers)

    def too_big(self, ref: BlobRef) -> str | None:
        return self._too_big(ref)

    def warn(self, text: str) -> Command:
        return self._warn(text)

    def _too_big(self, ref: BlobRef) -> str | None:
        """Why a slice is too big to fetch (checked before each fetch: `prefetch`,
        `_try_reduce`, `start`, `on_done`). Before our initial model exists, only the
        update cap applies (we fetch nothing then)."""
        model = self.task.global_ref
        if model is None:
            return blob_too_big("update", ref.size)
        cap = model.size + SLACK_BYTES
        if ref.size > cap:
            return f"slice of {ref.size} bytes, over {cap} (the model plus headers)"
        return None

    def _warn(self, text: str) -> Command:
        return Log("warning", f"task {self.task.task_id[:12]}: {text}")
