"""Task setup for large tasks: volunteer records go to the publisher, not to everyone.

The setup of core/task.py is all-to-all: every volunteer publishes its signed record and
later its ranking nonce to every node, so N volunteers cost 2*N^2 deliveries and every node
holds N records (29 s of setup CPU at 800 simulated nodes, and no 10,000-node task ever got
past it). An offer for more than CALL_MODE_OVER nodes sets up another way, a rule every
node evaluates from the signed offer alone (`uses_call`):

1. A volunteer sends its signed record (with its nonce commitment) to the publisher only.
2. At the volunteer deadline the publisher publishes the *call*: every record it holds, in
   peer order, signed, in parts that each fit one gossip message (`CallPart`). Everyone
   checks every record's own signature (a publisher cannot invent volunteers) and builds
   the same `CallView`. A volunteer missing from the call declines, saying so.
3. The *committee* is the COMMITTEE volunteers of the call with the lowest
   sha256(task_id | peer): a rule on public values. Only they reveal their nonces, to
   everyone (COMMITTEE*N deliveries); the beacon is the hash of the committee's revealed
   nonces, and every volunteer of the call is ranked under it as before
   (core/election.py).
4. The best-ranked live volunteer publishes a *compact roster*: the call's digest, the
   committee's nonces and the volunteers it skips as gone. The participants are not
   listed: every node derives them, the same way, from the call and the beacon
   (`call_participants`), so a 10,000-node roster is a few KiB.

What a node can still check on its own: every participant signed a record for this task;
the roster is the call's and follows the rank rule under the committee's beacon; no
committee reveal the node holds is left out; the coordinator is the best-ranked volunteer
not skipped, and a takeover waits for the ranks above it (as before).

What changes in trust (docs/architecture.md): the publisher decides which records make the
call. It already decides who may take part through the offer; what it gains is a say over
the committee: to own the beacon it would have to leave out every honest volunteer whose
committee key is below its own volunteers', and each of those sees that it was left out
(its decline says "left out of the call"). Below CALL_MODE_OVER nodes the all-to-all
setup, which gives the publisher no such say, stays.

Pure functions, memoised per process: in a simulation every node checks the same call and
roster, and holds the same immutable view of them (one copy per process, not per node).
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from p2pfl.core.election import beacon, commitment, rank_key
from p2pfl.core.messages import CallPart, Roster, Volunteer
from p2pfl.errors import RemoteProtocolError
from p2pfl.wire import Signed, decode, unseal

CALL_MODE_OVER = 512  # offers for more nodes than this set up through a call
COMMITTEE = 16  # volunteers whose nonces make the beacon
CALL_PART_BYTES = 384 * 1024  # records per part stay under MAX_GOSSIP_BYTES (512 KiB)
MAX_SKIPPED = 4096  # volunteers a compact roster may skip as gone


def uses_call(max_nodes: int) -> bool:
    return max_nodes > CALL_MODE_OVER


def committee_key(task_id: str, peer: str) -> bytes:
    return hashlib.sha256(b"p2pfl/committee/v1|" + task_id.encode() + b"|" + peer.encode()).digest()


def split_records(records: Sequence[bytes]) -> list[tuple[bytes, ...]]:
    """The call's records (in peer order) cut into parts of at most CALL_PART_BYTES."""
    parts: list[tuple[bytes, ...]] = []
    current: list[bytes] = []
    size = 0
    for raw in records:
        if current and size + len(raw) > CALL_PART_BYTES:
            parts.append(tuple(current))
            current, size = [], 0
        current.append(raw)
        size += len(raw) + 8
    if current:
        parts.append(tuple(current))
    return parts


@dataclass(frozen=True, eq=False)
class CallView:
    """What every node knows from a complete call (shared, never mutated)."""

    digest: bytes  # sha256 over the parts' records, in order: what a roster names
    peers: tuple[str, ...]  # in peer order
    samples: Mapping[str, int]  # each volunteer's signed sample count
    commits: Mapping[str, bytes]
    groups: Mapping[str, str]  # hierarchical label values (Volunteer.group)
    cids: Mapping[str, str]  # a rollout's archive per volunteer (Volunteer.cid)
    committee: tuple[str, ...]  # lowest committee keys first

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CallView) and other.digest == self.digest


def call_digest(parts: Sequence[tuple[bytes, ...]]) -> bytes:
    h = hashlib.sha256(b"p2pfl/call/v1|")
    for part in parts:
        for raw in part:
            h.update(len(raw).to_bytes(4, "big") + raw)
    return h.digest()


@functools.lru_cache(maxsize=8)
def call_view(task_id: str, parts: tuple[tuple[bytes, ...], ...], max_nodes: int) -> CallView:
    """Check every record of a complete call and build its view; RemoteProtocolError
    naming the first thing wrong. Records must be in strict peer order (so one set of
    volunteers has one call) and at most `max_nodes` of them."""
    peers: list[str] = []
    samples: dict[str, int] = {}
    commits: dict[str, bytes] = {}
    groups: dict[str, str] = {}
    cids: dict[str, str] = {}
    for part in parts:
        for raw in part:
            signed = decode(raw, expected=Signed)
            vol = unseal(signed, expected=Volunteer)
            if vol.peer != signed.signer or vol.task_id != task_id:
                raise RemoteProtocolError("call carries a volunteer record for someone else")
            if peers and vol.peer <= peers[-1]:
                raise RemoteProtocolError("call records are not in strict peer order")
            peers.append(vol.peer)
            samples[vol.peer] = vol.num_samples
            commits[vol.peer] = vol.commit
            if vol.group:
                groups[vol.peer] = vol.group
            if vol.cid:
                cids[vol.peer] = vol.cid
    if not peers:
        raise RemoteProtocolError("empty call")
    if len(peers) > max_nodes:
        raise RemoteProtocolError(f"call of {len(peers)} records, over max_nodes {max_nodes}")
    committee = tuple(sorted(peers, key=lambda p: committee_key(task_id, p))[:COMMITTEE])
    return CallView(call_digest(parts), tuple(peers), samples, commits, groups, cids, committee)


def check_part(part: CallPart, publisher: str, signer: str) -> str | None:
    if signer != publisher or part.publisher != publisher:
        return f"call part signed by {signer[-8:]}, not the publisher"
    return None


@functools.lru_cache(maxsize=8)
def call_order(task_id: str, view: CallView, seed: bytes) -> tuple[tuple[str, ...], dict[str, int]]:
    """Every volunteer of the call best-ranked first under `seed`, and each one's place."""
    order = tuple(sorted(view.peers, key=lambda p: rank_key(task_id, p, seed)))
    return order, {p: i for i, p in enumerate(order)}


def committee_seed(view: CallView, nonces: Mapping[str, bytes]) -> bytes:
    return beacon({p: n for p, n in nonces.items() if p in view.commits})


@functools.lru_cache(maxsize=8)
def call_participants(
    task_id: str, view: CallView, seed: bytes, skipped: tuple[str, ...], max_nodes: int
) -> tuple[str, ...]:
    gone = set(skipped)
    order, _ = call_order(task_id, view, seed)
    out: list[str] = []
    for peer in order:
        if peer not in gone:
            out.append(peer)
            if len(out) >= max_nodes:
                break
    return tuple(out)


def with_participants(roster: Roster, participants: tuple[str, ...]) -> Roster:
    """The compact roster with the participants this node derived. Not re-validated: they
    come from the call's checked records, and checking 10,000 peer ids again on every node
    of a simulation would cost N^2."""
    full = copy.copy(roster)
    object.__setattr__(full, "participants", participants)
    return full


@functools.lru_cache(maxsize=8)
def signed_total(view: CallView, participants: tuple[str, ...]) -> float:
    """All participants' signed sample counts together (what caps a share's mass)."""
    return float(sum(view.samples.get(p, 0) for p in participants))


def roster_nonces(roster: Roster, view: CallView) -> dict[str, bytes] | str:
    """The committee's nonces a compact roster carries (peer -> nonce), or why they are
    wrong: one entry per committee member, empty or matching its commitment."""
    if len(roster.committee) != len(view.committee):
        return f"{len(roster.committee)} committee nonces for a committee of {len(view.committee)}"
    out: dict[str, bytes] = {}
    for peer, nonce in zip(view.committee, roster.committee, strict=True):
        if not nonce:
            continue
        if commitment(nonce) != view.commits[peer]:
            return f"committee nonce of {peer[-8:]} does not match its record"
        out[peer] = nonce
    if not out:
        return "no committee nonce"
    return out


def call_roster_problem(
    task_id: str,
    roster: Roster,
    view: CallView,
    held: Iterable[str],
    min_nodes: int,
    max_nodes: int,
) -> tuple[str | None, tuple[str, ...]]:
    """(why a compact roster breaks the rule or None, the participants it stands for).

    `held`: committee members whose reveal this node holds itself; the roster must carry
    each of them (a coordinator may not drop a reveal to pick its beacon)."""
    if roster.call != view.digest:
        return "roster names another call", ()
    nonces = roster_nonces(roster, view)
    if isinstance(nonces, str):
        return nonces, ()
    missing = [p for p in held if p not in nonces]
    if missing:
        return f"leaves out the reveal of committee member {missing[0]}", ()
    if len(roster.skipped) > MAX_SKIPPED:
        return f"skips {len(roster.skipped)} volunteers, over {MAX_SKIPPED}", ()
    seed = committee_seed(view, nonces)
    order, place = call_order(task_id, view, seed)
    if any(p not in place for p in roster.skipped):
        return "skips a peer that is not in the call", ()
    if roster.coordinator not in place:
        return "coordinator is not in the call", ()
    position = place[roster.coordinator]
    if position > roster.epoch:
        return (
            f"coordinator is rank {position} but the roster claims takeover epoch {roster.epoch}",
            (),
        )
    participants = call_participants(task_id, view, seed, tuple(sorted(roster.skipped)), max_nodes)
    if not participants or participants[0] != roster.coordinator:
        return "coordinator is not the best-ranked volunteer it does not skip", ()
    if len(participants) < min_nodes:
        return f"{len(participants)} participants, under min_nodes {min_nodes}", ()
    return None, participants
