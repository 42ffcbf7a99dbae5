"""The slice check of a verified reduce-scatter round (fedavg, fedprox) at one node.

core/sketch.py says what is computed and why it catches an owner; this is who sends what,
and what every node decides from it (the same on every honest node: each step is a rule
over signed or transport-authenticated messages that all nodes receive).

1. Once every slice owner's SliceDone is here, the seed R follows from their cids. Each
   included participant sketches its own slices (and, as witness, each owner's own slice
   it was offered) and publishes one signed SliceSketch.
2. Every node sketches the combined slices it fetched and checks each slice j against the
   included participants' sketches, weighted as fedavg weighs them; the owner's own term
   comes from the witness's sketch. All slices pass: the model is assembled.
3. A slice fails: either its owner shifted it, or a sketch lies. The owner holds every
   input of its slice with the author's signed SliceOffer (and its own offer to its
   witness), so it finds the lying sketch and publishes a SketchProof: the liar's signed
   sketch and the signed offer naming the slice's cid. Every node fetches that one slice,
   recomputes the sketch, and excludes the liar if the numbers disagree. A proof whose
   signatures do not hold, whose offer is not for that slice, or whose slice matches the
   sketch is refused and excludes nobody. Two different signed sketches from one
   participant for one close exclude it at once.
4. At the round's second deadline (the first lets a witness still missing its owner's
   slice sketch without it) a slice that still fails without a proven liar excludes its
   owner, and a participant that published no sketch is excluded (like an author that
   never offered its slice; one lost meanwhile is only left out, and at once). Excluded
   participants are treated as withdrawn for the rest of the task; the acting coordinator
   re-closes the round without them, which reassigns their slices (core/scatter.py); a
   node that gets that re-close before its own deadline (or before its own check of a
   proof) excludes whom the re-close leaves out and its own check blames.

What this does not catch: an owner and a participant that collude (the participant's
sketch can then cover the owner's shift; or a witness covering its owner). THREATS.md's
rule is about one participant; see docs/architecture.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from p2pfl.core import sketch as sk
from p2pfl.core.commands import Command, Publish, SliceWork, SliceWorked
from p2pfl.core.messages import TOPIC_TASKS, RoundClose
from p2pfl.core.round_messages import SketchProof, SliceOffer, SliceSketch
from p2pfl.core.tokens import SliceToken
from p2pfl.errors import RemoteProtocolError
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed, decode, encode, seal, unseal

if TYPE_CHECKING:
    from p2pfl.core.scatter import Scatter

PS = sk.PER_SLICE
MAX_HELD_ATTEMPTS = 4  # close attempts ahead of ours whose sketches are held
WORK_KINDS = ("mine", "check", "inputs", "proof")


@dataclass
class Proof:
    """A SketchProof being checked: the claimant's published sketch of slice `index`,
    and the slice its author signed an offer for."""

    claimant: str
    index: int
    claimed: tuple[float, ...]
    ref: BlobRef
    prover: str
    asked: bool = False


def claim(msg: SliceSketch, author: str, j: int) -> tuple[float, ...] | None:
    """What `msg` says of slice j of `author`'s update (PER_SLICE floats): its own slice
    when `author` signed it, else the slice it witnessed (None if it did not)."""
    if author == msg.peer:
        data = msg.values
        k = j
    elif j in msg.witnessed:
        data = msg.witness_values
        k = msg.witnessed.index(j)
    else:
        return None
    size = PS * sk.WIRE.itemsize
    return sk.unpack(data[k * size : (k + 1) * size])


def witnesses(
    participants: tuple[str, ...], included: tuple[str, ...], owner: list[str]
) -> list[str | None]:
    """The witness of each slice: the first included participant after its owner in rank
    order (cyclically); None when the owner is the only one included."""
    inc = set(included)
    rank = {p: k for k, p in enumerate(participants)}
    n = len(participants)
    out: list[str | None] = []
    for o in owner:
        k = rank[o]
        out.append(
            next(
                (
                    participants[(k + d) % n]
                    for d in range(1, n)
                    if participants[(k + d) % n] in inc
                ),
                None,
            )
        )
    return out


class SliceCheck:
    """One node's part in the slice checks of one task's rounds."""

    def __init__(self, scatter: Scatter) -> None:
        self.scatter = scatter
        self.task = scatter.task
        self.held: dict[tuple[int, int], dict[str, tuple[SliceSketch, bytes]]] = {}
        # round -> (author, index) -> its signed SliceOffer (encoded), for proofs
        self.signed_offers: dict[int, dict[tuple[str, int], bytes]] = {}
        self.witness: list[str | None] = []
        self.close: RoundClose | None = None
        self.owner: list[str] = []
        self.seed: bytes | None = None
        self.verified = False
        self.start()

    def start(self, now: float = 0.0) -> list[Command]:
        """A new close (or re-close): everything below is per close. A re-close that
        leaves out whom the check of the close it replaces blames (the acting coordinator
        acted at its deadline, or on a proof, before us): they are excluded here too."""
        sc = self.scatter
        close = sc.close
        out: list[Command] = []
        before = self.close
        if (
            close is not None
            and before is not None
            and before.round == close.round
            and close.attempt > before.attempt
            and self.seed is not None
            and not self.verified
        ):
            # A proof still being checked here (its slice on its way) counts too: its
            # signatures held, and the re-close left its claimant out.
            kept = set(close.included)
            for proof in self.proofs:
                if proof.claimant not in kept:
                    why = f"its sketch of slice {proof.index} lies (a proof was shown)"
                    out += self._mark(now, {proof.claimant}, f"{why}; the round was re-closed")
            dropped = self._blame(before) - kept - self.task.dead  # the lost may come back
            out += self._mark(now, dropped, "the slice check failed; the round was re-closed")
        self.close = close
        self.owner = list(sc.owner)  # this close's owners (the scatter's move on first)
        if close is not None:
            self.witness = witnesses(self.task.participants, close.included, sc.owner)
            self.signed_offers = {r: o for r, o in self.signed_offers.items() if r >= close.round}
        self.seed = None
        self.sketches: dict[str, tuple[SliceSketch, bytes]] = {}
        self.mine_asked = self.inputs_asked = False
        # Each combined slice is sketched as soon as it is here (and the seed known), in
        # batches: slot -> the slices of that batch.
        self.check_asked: set[int] = set()
        self.check_batches: dict[int, tuple[int, ...]] = {}
        self.witnessing: tuple[int, ...] = ()  # the witnessed slices our sketch covers
        self.give_up = False  # past the first deadline: sketch without missing witnessed slices
        self.checked: dict[int, tuple[float, ...]] = {}  # slice -> its aggregate_sketch
        self.inputs: dict[int, tuple[float, ...]] = {}  # our slice -> its inputs' sketches
        self.failed: dict[int, str] = {}
        self.decided = self.verified = False
        self.excluded: set[str] = set()
        self.proofs: list[Proof] = []
        self.proven: set[tuple[str, int]] = set()
        return out

    # --- what we hold for proofs -----------------------------------------------------------

    def keep_offer(self, offer: SliceOffer, envelope: Signed | None) -> str | None:
        """Keep an offer's signed form (an owner or witness may need to show it). Why it is
        refused, or None."""
        if envelope is None or envelope.signer != offer.peer:
            return "slice offers must be signed by their author"
        got = self.signed_offers.setdefault(offer.round, {})
        if len(got) < len(self.task.participants) * self.scatter.count:
            got.setdefault((offer.peer, offer.index), encode(envelope))
        return None

    # --- the steps -----------------------------------------------------------------------

    def witnessed(self) -> list[int]:
        me = self.task.my_id
        return [j for j, w in enumerate(self.witness) if w == me]

    def advance(self, now: float) -> list[Command]:
        """Ask for whatever work can start now; decide once everything is in."""
        sc, task = self.scatter, self.task
        close = sc.close
        if close is None or self.verified or not sc.complete():
            return []
        if any(sc.done[j].ref is None for j in range(sc.count)):
            return []
        out: list[Command] = []
        if self.seed is None:
            cids = [sc.done[j].ref.cid for j in range(sc.count)]  # type: ignore[union-attr]
            self.seed = sk.sketch_seed(task.task_id, close.round, close.attempt, cids)
            for msg, raw in self.held.pop((close.round, close.attempt), {}).values():
                out += self._store(now, msg, raw)
            self.held = {k: v for k, v in self.held.items() if k[0] >= close.round}
        out += self._sketch_mine()
        here = [
            j
            for j in range(sc.count)
            if j not in self.check_asked and sc.done[j].ref.cid in sc.rounds.slice_blobs  # type: ignore[union-attr]
        ]
        if here:
            slot = len(self.check_batches)
            self.check_batches[slot] = tuple(here)
            self.check_asked.update(here)
            refs = tuple(sc.done[j].ref for j in here)
            out.append(self._work("check", refs, here, slot))  # type: ignore[arg-type]
        out += self.check_proofs()
        return out + self._decide(now)

    def _sketch_mine(self) -> list[Command]:
        sc, task = self.scatter, self.task
        close = sc.close
        assert close is not None
        mine = sc.mine.get(close.round)
        if self.mine_asked or task.my_id not in close.included or mine is None:
            return []
        refs, indices = list(mine), list(range(sc.count))
        for j in self.witnessed():
            ref = sc.slice_of(close.round, sc.owner[j], j)
            if ref is None or ref.cid not in sc.rounds.slice_blobs:
                if self.give_up:
                    continue  # never offered: slice j cannot be checked; its owner answers
                # Asked for again (core/scatter.py ask_offers), or on its way (a failed
                # fetch re-closes without the owner), until the first deadline.
                return []
            refs.append(ref)
            indices.append(j)
        self.mine_asked = True
        self.witnessing = tuple(indices[sc.count :])
        return [self._work("mine", tuple(refs), indices)]

    def _work(
        self, kind: str, refs: tuple[BlobRef, ...], indices: list[int], slot: int = 0
    ) -> Command:
        sc, task = self.scatter, self.task
        close = sc.close
        assert close is not None and task.global_ref is not None and self.seed is not None
        token = SliceToken(task.task_id, close.round, close.attempt, kind, slot)
        options = {"seed": self.seed.hex(), "indices": indices}
        return SliceWork(refs, sc.count, task.global_ref, token, "sketch", (), options)

    def _decide(self, now: float) -> list[Command]:
        sc = self.scatter
        close = sc.close
        assert close is not None
        if self.decided or len(self.checked) < sc.count:
            return []
        if any(p not in self.sketches for p in close.included):
            return []
        self.decided = True
        updates = sc.rounds.updates.get(close.round, {})
        factors = sk.weights_of([float(updates[p].num_samples) for p in close.included])
        # Every included participant's sketches, (participants, slices, PER_SLICE); each
        # owner's own entry replaced by its witness's.
        claims = np.stack(
            [
                np.frombuffer(self.sketches[p][0].values, dtype=sk.WIRE).reshape(sc.count, PS)
                for p in close.included
            ]
        ).astype(np.float64)
        position = {p: k for k, p in enumerate(close.included)}
        unverifiable = set()
        for j, (owner, witness) in enumerate(zip(sc.owner, self.witness, strict=True)):
            if witness is None:
                continue
            entry = claim(self.sketches[witness][0], owner, j)
            if entry is None:
                unverifiable.add(j)
            else:
                claims[position[owner], j] = entry
        checked = np.asarray([self.checked[j] for j in range(sc.count)], dtype=np.float64)
        for j, why in enumerate(sk.slices_fail(checked, claims, np.asarray(factors))):
            if j in unverifiable:
                self.failed[j] = "its witness published no sketch of the owner's own slice"
            elif why is not None:
                self.failed[j] = why
        if not self.failed:
            self.verified = True
            return sc.try_assemble(now)
        out: list[Command] = [
            sc.warn(f"round {close.round}: slice {j} of {sc.owner[j][-8:]} fails its check: {why}")
            for j, why in sorted(self.failed.items())
        ]
        return out + self._inputs_work()

    def _entry(self, author: str, j: int) -> tuple[float, ...] | None:
        """The sketch of slice j of `author`'s update the check uses: its own, except for
        the owner's own slice, whose witness's sketch counts."""
        witness = self.witness[j]
        if author == self.scatter.owner[j] and witness is not None:
            return claim(self.sketches[witness][0], author, j)
        return claim(self.sketches[author][0], author, j)

    # --- an owner finds the lie ---------------------------------------------------------------

    def _inputs_work(self) -> list[Command]:
        sc = self.scatter
        ours = [j for j in sc.my_indices() if j in self.failed]
        if not ours or self.inputs_asked:
            return []
        refs: list[BlobRef] = []
        indices: list[int] = []
        for j in ours:
            inputs = sc._inputs(j)
            if inputs is None:
                return []
            refs += inputs
            indices += [j] * len(inputs)
        self.inputs_asked = True
        return [self._work("inputs", tuple(refs), indices)]

    def _prove(self, values: tuple[float, ...]) -> list[Command]:
        """Our failing slices' inputs are sketched (`values`, K + 2 per input, in the
        close's order per slice): publish a proof against each sketch that lies."""
        sc, task = self.scatter, self.task
        close = sc.close
        assert close is not None
        me, width = task.my_id, PS + 1
        out: list[Command] = []
        pos = 0
        offers = self.signed_offers.get(close.round, {})
        for j in [j for j in sc.my_indices() if j in self.failed]:
            for author in close.included:
                actual = values[pos * width : (pos + 1) * width]
                pos += 1
                if author == me:
                    claimant = self.witness[j]
                    if claimant is None:
                        continue
                    claimed = self._entry(author, j)
                else:
                    claimant, claimed = author, self._entry(author, j)
                if claimed is None or sk.sketch_lies(claimed, actual) is None:
                    continue
                offer = offers.get((author, j))
                if offer is None:
                    continue
                proof = SketchProof(
                    task.task_id,
                    close.round,
                    close.attempt,
                    me,
                    j,
                    self.sketches[claimant][1],
                    offer,
                )
                out.append(
                    sc.warn(f"slice {j}: the sketch of {claimant[-8:]} lies; proof published")
                )
                out.append(Publish(TOPIC_TASKS, proof))
        return out

    # --- messages ----------------------------------------------------------------------

    def on_sketch(self, now: float, msg: SliceSketch, envelope: Signed | None) -> list[Command]:
        sc, task = self.scatter, self.task
        close = sc.close
        if envelope is None or envelope.signer != msg.peer or msg.peer not in task.participants:
            return []
        raw = encode(envelope)
        key = (msg.round, msg.attempt)
        current = None if close is None else (close.round, close.attempt)
        if current is None or key > current or (key == current and self.seed is None):
            # Ahead of us (our close or the SliceDones are still on their way): held, bounded.
            if task.round <= msg.round <= task.round + 1 and (
                key in self.held or len(self.held) < MAX_HELD_ATTEMPTS
            ):
                held = self.held.setdefault(key, {})
                if msg.peer not in held and len(held) < len(task.participants):
                    held[msg.peer] = (msg, raw)
            return []
        if key != current:
            return []
        return self._store(now, msg, raw) + self.advance(now)

    def _store(self, now: float, msg: SliceSketch, raw: bytes) -> list[Command]:
        """Take a sketch of the current close (once per participant: a second, different
        one is proof enough of a liar, both being signed)."""
        sc = self.scatter
        close = sc.close
        assert close is not None
        if msg.peer not in close.included:
            return []
        problem = self._sketch_problem(msg)
        if problem is not None:
            return [sc.warn(f"sketch of {msg.peer[-8:]} refused: {problem}")]
        held = self.sketches.get(msg.peer)
        if held is None:
            self.sketches[msg.peer] = (msg, raw)
            return []
        if held[1] == raw:
            return []
        return self.exclude(now, {msg.peer}, "two different signed sketches for one close")

    def _sketch_problem(self, msg: SliceSketch) -> str | None:
        sc = self.scatter
        if msg.slices() != sc.count:
            return f"sketches of {msg.slices()} slices, for {sc.count}"
        allowed = {j for j, w in enumerate(self.witness) if w == msg.peer}
        if not set(msg.witnessed) <= allowed:
            return (
                f"witnesses slices {sorted(set(msg.witnessed) - allowed)[:4]} it does not witness"
            )
        return None

    def on_proof(self, now: float, proof: SketchProof) -> list[Command]:
        sc = self.scatter
        close = sc.close
        if close is None or (proof.round, proof.attempt) != (close.round, close.attempt):
            return []
        if self.seed is None or proof.index >= sc.count or len(self.proofs) >= 2 * sc.count:
            return []
        try:
            claimant, claimed, ref, author = self._open_proof(proof)
        except RemoteProtocolError as exc:
            return [sc.warn(f"sketch proof from {proof.peer[-8:]} refused: {exc}")]
        key = (claimant, proof.index)
        if key in self.proven or claimant in self.excluded:
            return []
        self.proven.add(key)
        held = self.sketches.get(claimant)
        if held is not None and held[1] != proof.sketch:
            return self.exclude(now, {claimant}, "two different signed sketches for one close")
        out: list[Command] = []
        if held is None:
            out += self._store(now, unseal(decode(proof.sketch, Signed), SliceSketch), proof.sketch)
        self.proofs.append(Proof(claimant, proof.index, claimed, ref, proof.peer))
        if ref.cid not in sc.rounds.slice_blobs and not sc.wants(ref.cid):
            out += sc.fetch(ref, (proof.peer, author))
        # Checked even once this node's checks passed: a proven liar is excluded for good.
        return out + self.check_proofs() + self.advance(now)

    def _open_proof(self, proof: SketchProof) -> tuple[str, tuple[float, ...], BlobRef, str]:
        """(claimant, its claimed sketch, the slice's ref, its author) of a proof whose
        signatures and roles hold; RemoteProtocolError names what does not."""
        sc, task = self.scatter, self.task
        close = sc.close
        assert close is not None
        j = proof.index
        signed_sketch = decode(proof.sketch, Signed)
        msg = unseal(signed_sketch, SliceSketch)
        signed_offer = decode(proof.offer, Signed)
        offer = unseal(signed_offer, SliceOffer)
        if signed_sketch.signer != msg.peer or signed_offer.signer != offer.peer:
            raise RemoteProtocolError("a signed message names someone other than its signer")
        if (msg.task_id, msg.round, msg.attempt) != (task.task_id, close.round, close.attempt):
            raise RemoteProtocolError("the sketch is not of this round's close")
        if (offer.task_id, offer.round, offer.index) != (task.task_id, close.round, j):
            raise RemoteProtocolError(f"the offer is not of slice {j} of this round")
        if msg.peer not in close.included or offer.peer not in close.included:
            raise RemoteProtocolError("the sketch or offer is not from an included participant")
        problem = self._sketch_problem(msg)
        if problem is not None:
            raise RemoteProtocolError(f"the sketch is malformed: {problem}")
        owner, witness = sc.owner[j], self.witness[j]
        claimed: tuple[float, ...] | None = None
        if msg.peer == offer.peer and msg.peer != owner:
            claimed = claim(msg, offer.peer, j)
        elif offer.peer == owner and msg.peer == witness and j in msg.witnessed:
            claimed = claim(msg, owner, j)
        if claimed is None:
            raise RemoteProtocolError(
                f"the sketch's signer is neither the offer's author nor slice {j}'s witness"
            )
        too_big = sc.too_big(offer.ref)
        if too_big is not None:
            raise RemoteProtocolError(too_big)
        return msg.peer, claimed, offer.ref, offer.peer

    def check_proofs(self) -> list[Command]:
        out: list[Command] = []
        for slot, proof in enumerate(self.proofs):
            if not proof.asked and proof.ref.cid in self.scatter.rounds.slice_blobs:
                proof.asked = True
                out.append(self._work("proof", (proof.ref,), [proof.index], slot))
        return out

    def proof_unfetchable(self, cid: str) -> list[Command]:
        """A proof's slice cannot be fetched: the proof is not checked (it excludes nobody)."""
        gone = [p for p in self.proofs if p.ref.cid == cid and not p.asked]
        for proof in gone:
            proof.asked = True
        return [
            self.scatter.warn(
                f"sketch proof about {p.claimant[-8:]}: its slice is unfetchable; ignored"
            )
            for p in gone
        ]

    def wants(self, cid: str) -> bool:
        return any(p.ref.cid == cid and not p.asked for p in self.proofs)

    # --- work done ---------------------------------------------------------------------

    def on_worked(self, now: float, event: SliceWorked) -> list[Command]:
        sc, task = self.scatter, self.task
        close = sc.close
        token = event.token
        if close is None or (token.round, token.attempt) != (close.round, close.attempt):
            return []
        if token.kind == "proof":
            return self._proof_checked(now, token.index, event)
        batch = self.check_batches.get(token.index, ()) if token.kind == "check" else ()
        if event.bad >= 0 and 0 <= event.bad < len(batch):
            j = batch[event.bad]
            return self.exclude(now, {sc.owner[j]}, f"combined slice {j}: {event.reason}")
        if event.reason or event.bad >= 0:
            return task.withdraw(
                now, f"round {token.round}: sketching slices failed: {event.reason}"
            )
        if token.kind == "mine":
            return self._publish(now, event.values)
        if token.kind == "check":
            width = 2 * sk.K + 1
            if len(event.values) != width * len(batch):
                return task.withdraw(now, f"round {token.round}: sketching slices failed")
            for k, j in enumerate(batch):
                self.checked[j] = event.values[k * width : (k + 1) * width]
            return self.advance(now)
        if token.kind == "inputs":
            return self._prove(event.values)
        return []

    def _publish(self, now: float, values: tuple[float, ...]) -> list[Command]:
        sc, task = self.scatter, self.task
        close = sc.close
        assert close is not None
        if not all(math.isfinite(x) for x in values):
            # NaN/Inf in our update (all-gather would leave it out): we cannot take part.
            return task.withdraw(now, f"round {close.round}: our update is not finite")
        width = PS + 1  # sketch() adds rmax, which is not published
        chunks = [values[p * width : p * width + PS] for p in range(len(values) // width)]
        witnessed = self.witnessing
        msg = SliceSketch(
            task.task_id,
            close.round,
            close.attempt,
            task.my_id,
            sk.pack([x for c in chunks[: sc.count] for x in c]),
            tuple(witnessed),
            sk.pack([x for c in chunks[sc.count :] for x in c]),
        )
        envelope = seal(task.me, msg)
        self.sketches.setdefault(task.my_id, (msg, encode(envelope)))
        return sc.tell(envelope) + self.advance(now)

    def _proof_checked(self, now: float, slot: int, event: SliceWorked) -> list[Command]:
        sc = self.scatter
        if not 0 <= slot < len(self.proofs):
            return []
        proof = self.proofs[slot]
        if event.reason or event.bad >= 0:
            return [sc.warn(f"sketch proof about {proof.claimant[-8:]} refused: {event.reason}")]
        lie = sk.sketch_lies(proof.claimed, event.values)
        if lie is None:
            return [
                sc.warn(
                    f"sketch proof from {proof.prover[-8:]} about {proof.claimant[-8:]} refused: "
                    f"slice {proof.index} matches its sketch"
                )
            ]
        return self.exclude(
            now, {proof.claimant}, f"its sketch of slice {proof.index} lies ({lie})"
        )

    # --- deciding who goes ---------------------------------------------------------------

    def lacking_witnessed(self) -> list[int]:
        """Slices we witness whose owner's offer has not come (to ask for again)."""
        sc = self.scatter
        close = sc.close
        if close is None or self.mine_asked:
            return []
        got = sc.offers.get(close.round, {})
        return [j for j in self.witnessed() if (sc.owner[j], j) not in got]

    def on_deadline(self, now: float, first: bool) -> list[Command]:
        """The round's deadline under this close, every combined slice announced but the
        check not passed. First deadline: a witness still missing its owner's slice
        sketches without it. Second: participants with no sketch, and owners of slices
        that fail with no proven liar (or that their witness could not sketch), are
        excluded."""
        sc = self.scatter
        close = sc.close
        assert close is not None
        if first:
            self.give_up = True
            return self.advance(now)
        if self.verified or self.excluded:
            return []  # a liar was proven: the re-close is on its way
        culprits = self._blame(close)
        lost = culprits & self.task.dead  # unreachable, not lying: left out, not excluded
        if not culprits:
            return []
        why = "the slice check failed at the round's deadline"
        return self.exclude(now, culprits - lost, why, also=lost)

    def _blame(self, close: RoundClose) -> set[str]:
        """Who the check blames at the deadline: participants with no sketch, and owners
        of slices that fail with no proven liar (or that their witness could not sketch)."""
        culprits = {p for p in close.included if p not in self.sketches}
        if self.decided:
            culprits |= {self.owner[j] for j in self.failed}
        culprits.discard(self.task.my_id)
        return culprits

    def exclude(
        self, now: float, peers: set[str], why: str, also: frozenset[str] | set[str] = frozenset()
    ) -> list[Command]:
        """`peers` misbehaved (a rule every honest node evaluates the same way): they are
        withdrawn for the rest of the task, and the round is re-closed without them (and
        without `also`, participants lost on the way)."""
        peers = {p for p in peers if p != self.task.my_id and p not in self.excluded}
        if not peers and not also:
            return []
        out = self._mark(now, peers, why)
        return out + self.scatter.rounds.redo(now, peers | set(also), why)

    def _mark(self, now: float, peers: set[str], why: str) -> list[Command]:
        task, sc = self.task, self.scatter
        peers = {p for p in peers if p != task.my_id and p not in self.excluded}
        self.excluded |= peers
        out: list[Command] = []
        for peer in sorted(peers):
            out.append(sc.warn(f"{peer[-8:]} excluded: {why}"))
            out += task._on_withdraw(now, peer, f"excluded by the slice check: {why}")
        return out
