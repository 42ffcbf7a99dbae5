"""Verified reduce-scatter (core/sketch.py, core/verify.py) on the sans-IO harness: an
owner that shifts its slice and a participant that lies in its sketch are caught by every
honest node and excluded; a forged proof excludes nobody; a malformed sketch is refused."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from p2pfl.core import sketch as sk
from p2pfl.core.commands import Publish, Send
from p2pfl.core.messages import TOPIC_TASKS
from p2pfl.core.round_messages import MAX_SLICES, SketchProof, SliceDone, SliceOffer, SliceSketch
from p2pfl.core.task import TaskMachine
from p2pfl.errors import RemoteProtocolError
from p2pfl.fl.aggregate import fedavg
from p2pfl.wire import Signed, decode, encode, seal, type_name, unseal
from tests.core.harness import Harness, Node, done

PS = sk.PER_SLICE


def sketch_in(cmd: object) -> tuple[SliceSketch, Signed] | None:
    # Published (or sent to every participant), or sent to one again (a StageAsk).
    if isinstance(cmd, Publish | Send) and isinstance(cmd.msg, Signed):
        if cmd.msg.kind == type_name(SliceSketch):
            return unseal(cmd.msg, SliceSketch), cmd.msg
    return None


def final_models(h: Harness, task_id: str, culprit: Node | None = None) -> set[str]:
    """The final models of every node but the culprit (it keeps its own view)."""
    return {
        m.global_ref.cid
        for m in done(h, task_id)
        if m.global_ref is not None and (culprit is None or m.my_id != culprit.peer)
    }


def is_honest_w(h: Harness, w: np.ndarray, rounds: int, without: set[int]) -> bool:
    """Harness training moves node i's weights by i + 1 (equal sample counts): whether
    `w` is the honest FedAvg after `rounds` rounds without the nodes `without` (up to
    float32 rounding; a shifted slice is off by 0.5)."""
    step = np.mean([i + 1 for i in range(len(h.nodes)) if i not in without])
    return bool(np.allclose(w, rounds * step, rtol=0, atol=1e-5))


def excluded_everywhere(h: Harness, task_id: str, culprit: Node, why: str) -> None:
    for m in h.machines(task_id):
        if m.my_id == culprit.peer:
            continue
        assert why in m.withdrawn.get(culprit.peer, ""), (m.my_id[-8:], m.withdrawn)


def slice_of(machine: TaskMachine, peer: str) -> int:
    return machine.participants.index(peer)  # its own slice under a full close


# --- the sketch itself --------------------------------------------------------------------


def test_the_check_passes_honest_float32_sums_and_fails_a_tiny_shift() -> None:
    rng = np.random.default_rng(7)
    seed = sk.sketch_seed("t" * 32, 1, 0, ["a", "b"])
    caught_small = 0
    for trial in range(20):
        n = int(rng.integers(2, 9))
        ups = [
            (
                {
                    "w": (rng.standard_normal(300) * 10 ** rng.uniform(-3, 3)).astype(np.float32),
                    "n": rng.integers(0, 1000, 5).astype(np.int64),
                },
                float(rng.integers(0, 50)),
            )
            for _ in range(n)
        ]
        agg = fedavg(ups)
        factors = sk.weights_of([c for _, c in ups])
        terms = [(f, sk.sketch(seed, 3, u)[:PS]) for f, (u, _) in zip(factors, ups, strict=True)]
        assert sk.slice_fails(sk.aggregate_sketch(seed, 3, agg), terms) is None, trial
        # As published: float32 on the wire.
        wire = [(f, sk.unpack(sk.pack(t))) for f, t in terms]
        assert sk.slice_fails(sk.aggregate_sketch(seed, 3, agg), wire) is None, trial
        # One coordinate moved by 1e-3 of the slice's largest value: always caught. By
        # 1e-4: caught unless all K challenge values at that coordinate are small
        # (|R| < ~0.25 each, uniform on [-sqrt 3, sqrt 3]: 1 chance in 2,300 per shift).
        c = int(rng.integers(0, 300))
        for size in (1e-3, 1e-4):
            shifted = {k: v.copy() for k, v in agg.items()}
            shifted["w"][c] += np.float32(size * np.abs(agg["w"]).max())
            fails = sk.slice_fails(sk.aggregate_sketch(seed, 3, shifted), terms) is not None
            assert fails == (
                sk.slice_fails(sk.aggregate_sketch(seed, 3, shifted), wire) is not None
            )
            if size == 1e-3:
                assert fails, trial
            else:
                caught_small += fails
    assert caught_small >= 19


def test_challenges_are_uniform_with_unit_variance_and_hide_no_direction() -> None:
    seed = sk.sketch_seed("t" * 32, 1, 0, ["a"])
    r = sk.challenge(seed, 0, 0, 200_000)
    assert r.dtype == np.float64 and not r.flags.writeable
    assert np.abs(r).max() <= np.sqrt(3) and abs(r.mean()) < 0.01 and abs(r.var() - 1) < 0.01
    assert np.array_equal(r, sk.challenge(seed, 0, 0, 200_000))  # every node draws the same
    assert not np.array_equal(r[:1000], sk.challenge(seed, 0, 1, 1000))
    # The worst direction for uniform coordinates (Ball's bound, core/sketch.py): a shift
    # spread evenly over two coordinates. <R, d> lands within 0.1 |d| of 0 with
    # probability at most 0.082 (a Gaussian R: 0.080); a one-coordinate shift 0.058.
    pairs = r.reshape(-1, 2)
    assert np.mean(np.abs(pairs.sum(axis=1)) / np.sqrt(2) < 0.1) < 0.09
    assert np.mean(np.abs(r) < 0.1) < 0.065


def test_mixed_dtype_slices_check_each_coordinate_at_its_own_rounding() -> None:
    # A float16 and a float64 tensor in one slice: each coordinate's rounding unit is its
    # own dtype's (the per-coordinate path of sketch._flat), as computed here by hand.
    rng = np.random.default_rng(3)
    seed = sk.sketch_seed("t" * 32, 2, 0, ["a"])
    piece = {
        "h": rng.standard_normal(40).astype(np.float16),
        "n": np.arange(3),
        "d": rng.standard_normal(60),
    }
    flat = np.concatenate([piece["h"].astype(np.float64), piece["d"]])
    units = np.concatenate(
        [np.full(40, float(np.finfo(np.float16).eps) / 2), np.full(60, 2.0**-53)]
    )
    got = sk.aggregate_sketch(seed, 5, piece)
    rmax = max(float(np.abs(sk.challenge(seed, 5, m, flat.size)).max()) for m in range(sk.K))
    assert sk.rmax_of(got) == rmax <= np.sqrt(3)
    bound = rmax * float(np.einsum("i,i->", sk.ROUNDING_MARGIN * units, np.abs(flat)))
    for m in range(sk.K):
        r = sk.challenge(seed, 5, m, flat.size)
        exact = float(np.einsum("i,i->", r, flat))
        assert abs(got[m] - exact) <= 2.0**-40 * float(np.abs(r * flat).sum())
        assert got[sk.K + m] == bound
        # It bounds what the cast of each coordinate can move <R, a> by (what the
        # per-vector sum was), within a factor sqrt 3 / E|R_c| = 2.
        per_vector = float(np.abs(r) @ (sk.ROUNDING_MARGIN * units * np.abs(flat)))
        assert per_vector <= bound <= 2.5 * per_vector
    assert sk.sketch(seed, 5, piece)[sk.K] == float(np.abs(flat).sum())


def test_a_lie_that_fails_a_check_is_always_provable() -> None:
    rng = np.random.default_rng(3)
    seed = sk.sketch_seed("t" * 32, 2, 1, ["x"])
    piece = {"w": rng.standard_normal(50).astype(np.float32)}
    actual = sk.sketch(seed, 0, piece)
    assert sk.sketch_lies(actual[:PS], actual) is None
    # What travels is float32 (norms rounded up): still no lie.
    assert sk.sketch_lies(sk.unpack(sk.pack(actual[:PS])), actual) is None
    for m in range(PS):
        lied = list(actual[:PS])
        lied[m] += 1e-3 * (abs(lied[m]) + 1)
        assert sk.sketch_lies(tuple(lied), actual) is not None
    # Different challenges for different seeds, slices and m; the same for the same.
    assert np.array_equal(sk.challenge(seed, 1, 2, 9), sk.challenge(seed, 1, 2, 9))
    assert not np.array_equal(sk.challenge(seed, 1, 2, 9), sk.challenge(seed, 1, 3, 9))
    assert not np.array_equal(sk.challenge(seed, 1, 2, 9), sk.challenge(seed, 2, 2, 9))


# --- honest rounds --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 7])
def test_the_default_for_fedavg_is_verified_reduce_scatter_bit_equal_to_all_gather(n: int) -> None:
    h = Harness(n)
    task_id = h.offer(rounds=2)  # no aggregation parameter: the default
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    models = final_models(h, task_id)
    assert len(models) == 1
    kinds = [w.token.kind for w in h.slice_works]
    assert kinds.count("mine") == 2 * n
    # Every node checks each of the n combined slices once a round (in batches, as
    # they arrive).
    checked = [w for w in h.slice_works if w.token.kind == "check"]
    assert sum(len(w.refs) for w in checked) == 2 * n * n
    assert "inputs" not in kinds and "proof" not in kinds  # nothing failed, nothing proven
    assert all(not m.withdrawn and m.rounds.closes[2].attempt == 0 for m in machines)
    g = Harness(n)
    gid = g.offer(rounds=2, aggregation={"kind": "allgather"})
    g.run()
    assert not g.slice_works
    assert final_models(g, gid) == models
    assert is_honest_w(h, h.model(next(iter(models)))["w"], 2, set())


def test_fedprox_rounds_are_verified_reduce_scatter_too() -> None:
    h = Harness(5)
    task_id = h.offer(rounds=1, protocol="fedprox", mu=0.1)
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded" and machines[0].offer.protocol == "fedprox"
    assert {"mine", "check"} <= {w.token.kind for w in h.slice_works}
    assert all(m.rounds.scatter.check.verified for m in machines)


def test_three_nodes_and_robust_aggregators_stay_all_gather_by_default() -> None:
    h = Harness(3)
    task_id = h.offer(rounds=1)
    h.run()
    assert done(h, task_id)[0].result.status == "succeeded" and not h.slice_works
    h = Harness(5)
    task_id = h.offer(rounds=1, aggregator="median")
    h.run()
    assert done(h, task_id)[0].result.status == "succeeded" and not h.slice_works


# --- a rogue owner ----------------------------------------------------------------------------


def shift_slice(h: Harness, done_msg: SliceDone) -> SliceDone:
    assert done_msg.ref is not None
    piece = h.model(done_msg.ref.cid)
    moved = {k: (v + 0.5).astype(v.dtype) for k, v in piece.items()}
    return replace(done_msg, ref=h.put(moved))


@pytest.mark.parametrize("index", [2, 0])  # node 0 ranks first here: the coordinator
def test_an_owner_shifting_its_slice_is_excluded_and_its_slice_recomputed(index: int) -> None:
    n = 6
    h = Harness(n)
    task_id = h.offer(rounds=2)
    rogue = h.nodes[index]
    shifted: list[SliceDone] = []

    def rogue_owner(node: Node, cmd: Any) -> Any:
        msg = cmd.msg if isinstance(cmd, Publish) else None
        if node is rogue and isinstance(msg, SliceDone) and msg.ref is not None and not shifted:
            shifted.append(shift_slice(h, msg))
            return replace(cmd, msg=shifted[0])
        return cmd

    h.outgoing = rogue_owner
    h.run()
    machines = done(h, task_id)
    assert shifted and machines[0].result.status == "succeeded"
    assert (machines[0].participants[0] == rogue.peer) == (index == 0)
    # Every honest node saw the slice fail its check and excluded its owner.
    excluded_everywhere(h, task_id, rogue, "the slice check failed")
    assert any("fails its check" in line for line in h.logs("warning"))
    closes = [m.rounds.closes[1] for m in machines if m.my_id != rogue.peer]
    assert all(c.attempt == 1 and rogue.peer not in c.included for c in closes)
    # The rogue's slice was combined again, under the re-close, by the next in rank.
    k = slice_of(machines[0], rogue.peer)
    assert any(
        (w.token.kind, w.token.round, w.token.attempt, w.token.index) == ("reduce", 1, 1, k)
        for w in h.slice_works
    )
    # What is asserted: every honest node ends with one model, bit for bit the FedAvg of
    # the honest updates of each round (the rogue left out from round 1 on; its update,
    # not only its slice, is out: it is withdrawn for the rest of the task).
    models = final_models(h, task_id, rogue)
    assert len(models) == 1
    final = h.model(next(iter(models)))
    assert is_honest_w(h, final["w"], 2, {index})
    last = next(m for m in machines if m.my_id != rogue.peer).rounds
    ups = [
        (h.model(last.updates[2][p].ref.cid), float(last.updates[2][p].num_samples))
        for p in last.closes[2].included
    ]
    assert rogue.peer not in last.closes[2].included
    assert all(final[key].tobytes() == fedavg(ups)[key].tobytes() for key in final)


def test_an_owner_covering_its_shift_with_its_own_sketch_is_still_caught() -> None:
    """The owner's own term comes from its witness: a lie about its own slice that makes
    the sums agree does not help it."""
    n = 5
    h = Harness(n)
    task_id = h.offer(rounds=1)
    rogue = h.nodes[1]
    state: dict[str, Any] = {}

    def cover(node: Node, cmd: Any) -> Any:
        if node is not rogue:
            return cmd
        if isinstance(cmd, Publish) and isinstance(cmd.msg, SliceDone) and cmd.msg.ref:
            if "orig" not in state:
                state["orig"], state["index"] = cmd.msg.ref, cmd.msg.index
                moved = shift_slice(h, cmd.msg)
                state["moved"] = moved.ref
                return replace(cmd, msg=moved)
        found = sketch_in(cmd)
        if found is not None and "moved" in state and "covered" not in state:
            msg, _ = found
            machine = next(m for m in h.machines(task_id) if m.my_id == rogue.peer)
            check = machine.rounds.scatter.check
            j, seed = state["index"], check.seed
            before = sk.sketch(seed, j, h.model(state["orig"].cid))
            after = sk.sketch(seed, j, h.model(state["moved"].cid))
            f = 1.0 / n  # equal sample counts
            values = list(sk.unpack(msg.values))
            for m in range(sk.K):
                values[j * PS + m] += (after[m] - before[m]) / f
            state["covered"] = True
            return replace(cmd, msg=seal(rogue.identity, replace(msg, values=sk.pack(values))))
        return cmd

    h.outgoing = cover
    h.run()
    machines = done(h, task_id)
    assert state.get("covered") and machines[0].result.status == "succeeded"
    excluded_everywhere(h, task_id, rogue, "the slice check failed")
    models = final_models(h, task_id, rogue)
    assert len(models) == 1
    assert is_honest_w(h, h.model(next(iter(models)))["w"], 1, {1})


# --- a lying participant ------------------------------------------------------------------------


def test_a_participant_lying_in_its_sketch_is_proven_and_excluded_by_every_node() -> None:
    n = 6
    h = Harness(n)
    task_id = h.offer(rounds=2)
    liar = h.nodes[4]
    lied: list[int] = []

    def lie(node: Node, cmd: Any) -> Any:
        found = sketch_in(cmd)
        if node is liar and found is not None and not lied:
            msg, _ = found
            machine = next(m for m in h.machines(task_id) if m.my_id == liar.peer)
            j = (slice_of(machine, liar.peer) + 2) % n  # a slice someone else owns
            values = list(sk.unpack(msg.values))
            values[j * PS] += 1000.0
            lied.append(j)
            return replace(cmd, msg=seal(liar.identity, replace(msg, values=sk.pack(values))))
        return cmd

    h.outgoing = lie
    h.run()
    machines = done(h, task_id)
    assert lied and machines[0].result.status == "succeeded"
    j = lied[0]
    owner = machines[0].participants[j]
    # The owner published the proof; every other node (third parties included) checked
    # it by fetching that one slice, and excluded the liar, not the owner.
    assert any("lies; proof published" in line for line in h.logs("warning"))
    proofs = [w for w in h.slice_works if w.token.kind == "proof"]
    provers = {i for i, node in enumerate(h.nodes) if node.peer != owner}
    assert len(proofs) >= len(provers)
    excluded_everywhere(h, task_id, liar, f"its sketch of slice {j} lies")
    assert all(owner not in m.withdrawn for m in machines)
    models = final_models(h, task_id, liar)
    assert len(models) == 1
    final = h.model(next(iter(models)))
    assert is_honest_w(h, final["w"], 2, {4})


def test_a_witness_lying_about_its_owners_slice_is_proven_by_the_owner() -> None:
    """The owner shows its own signed offer to the witness and the witness's sketch."""
    n = 5
    h = Harness(n)
    task_id = h.offer(rounds=1)
    witness = h.nodes[0]
    lied: list[int] = []

    def lie(node: Node, cmd: Any) -> Any:
        found = sketch_in(cmd)
        if node is witness and found is not None and found[0].witnessed and not lied:
            msg, _ = found
            values = list(sk.unpack(msg.witness_values))
            values[1] -= 50.0
            lied.append(msg.witnessed[0])
            forged = replace(msg, witness_values=sk.pack(values))
            return replace(cmd, msg=seal(witness.identity, forged))
        return cmd

    h.outgoing = lie
    h.run()
    machines = done(h, task_id)
    assert lied and machines[0].result.status == "succeeded"
    j = lied[0]
    owner = next(m for m in machines if m.my_id != witness.peer).participants[j]
    excluded_everywhere(h, task_id, witness, f"its sketch of slice {j} lies")
    assert all(owner not in m.withdrawn for m in machines)
    models = final_models(h, task_id, witness)
    assert len(models) == 1
    assert is_honest_w(h, h.model(next(iter(models)))["w"], 1, {0})


def test_a_participant_that_publishes_no_sketch_is_excluded_at_the_deadline() -> None:
    """Also: assembly runs beside the check (it waits for everyone's sketches), and a
    model whose check never passed is not taken: every node assembles under the first
    close, and the round still ends with the re-close's model, without the mute one."""
    h = Harness(5)
    task_id = h.offer(rounds=1)
    mute = h.nodes[3]
    h.outgoing = lambda node, cmd: None if node is mute and sketch_in(cmd) else cmd
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    excluded_everywhere(h, task_id, mute, "the slice check failed")
    # Assembled under the first close, whose check never passed.
    assert any(
        (w.token.kind, w.token.round, w.token.attempt) == ("assemble", 1, 0) for w in h.slice_works
    )
    assert all(m.rounds.closes[1].attempt == 1 for m in machines if m.my_id != mute.peer)
    models = final_models(h, task_id, mute)
    assert len(models) == 1
    assert is_honest_w(h, h.model(next(iter(models)))["w"], 1, {3})


def test_a_participant_lost_before_its_sketch_is_left_out_not_excluded() -> None:
    n = 6
    h = Harness(n)
    task_id = h.offer(rounds=2)
    victim = h.nodes[4]

    def crash(node: Node, cmd: Any) -> Any:
        if node is victim and sketch_in(cmd) is not None:
            h.at(0, lambda: h.crash(victim.index))
            return None
        return cmd

    h.outgoing = crash
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    for m in machines:
        assert victim.peer not in m.withdrawn  # lost, not a liar: it may come back
        assert m.rounds.closes[1].attempt == 1 and victim.peer not in m.rounds.closes[1].included
    assert any("participants lost mid-round" in line for line in h.logs("warning"))


# --- forged proofs and malformed sketches ---------------------------------------------------------


def test_forged_proofs_are_refused_and_exclude_nobody() -> None:
    n = 5
    h = Harness(n)
    task_id = h.offer(rounds=1)
    victim, forger = h.nodes[1], h.nodes[3]
    seen: dict[str, Any] = {}

    def watch(node: Node, cmd: Any) -> Any:
        # The forger owns a slice: it holds the victim's genuine signed offer of it.
        if node is victim and isinstance(cmd, Send) and cmd.peer == forger.peer:
            if isinstance(cmd.msg, Signed) and "offer" not in seen:
                seen["offer"] = cmd.msg
        found = sketch_in(cmd)
        if node is victim and found is not None and "sent" not in seen:
            seen["sent"] = True
            msg, envelope = found
            offer = unseal(seen["offer"], SliceOffer)
            j = offer.index
            raw_sketch, raw_offer = encode(envelope), encode(seen["offer"])
            # The victim's offer naming another cid (a slice its sketch does not match),
            # signed by the forger.
            other = h.put({k: v + 1 for k, v in h.model(offer.ref.cid).items()})
            forged_offer = seal(forger.identity, replace(offer, ref=other))
            own_offer = seal(forger.identity, replace(offer, peer=forger.peer))
            fake_sketch = seal(forger.identity, msg)  # claims to be the victim's
            proofs = [
                (raw_sketch, encode(forged_offer)),
                (raw_sketch, encode(own_offer)),
                (encode(fake_sketch), raw_offer),
                (raw_sketch, raw_offer),  # genuine, but the slice matches the sketch
            ]
            # Genuine both, but the offer is of another slice than the proof names.
            wrong = SketchProof(
                task_id, msg.round, msg.attempt, forger.peer, (j + 1) % n, raw_sketch, raw_offer
            )
            h.at(0.02, lambda: h.inject(forger, TOPIC_TASKS, wrong))
            for s, o in proofs:
                proof = SketchProof(task_id, msg.round, msg.attempt, forger.peer, j, s, o)
                h.at(0.02, lambda p=proof: h.inject(forger, TOPIC_TASKS, p))
        return cmd

    h.outgoing = watch
    h.run()
    machines = done(h, task_id)
    assert seen.get("sent") and machines[0].result.status == "succeeded"
    assert all(not m.withdrawn for m in machines)
    assert all(m.rounds.closes[1].attempt == 0 for m in machines)
    refusals = [line for line in h.logs("warning") if "sketch proof from" in line]
    for why in (
        "names someone other than its signer",
        "neither the offer's author nor",
        "is not of slice",
        "matches its sketch",
    ):
        assert any(why in line for line in refusals), why


def test_a_malformed_sketch_is_refused_with_a_reason_and_does_not_displace_the_genuine_one() -> (
    None
):
    n = 5
    h = Harness(n)
    task_id = h.offer(rounds=1)
    sender = h.nodes[2]
    sent: list[bool] = []

    def early(node: Node, cmd: Any) -> Any:
        found = sketch_in(cmd)
        if node is sender and found is not None and not sent:
            sent.append(True)
            msg, _ = found
            bad = replace(msg, values=msg.values[: PS * 4])  # one slice's worth, for n slices
            h.inject(sender, TOPIC_TASKS, seal(sender.identity, bad))
        return cmd

    h.outgoing = early
    h.run()
    machines = done(h, task_id)
    assert sent and machines[0].result.status == "succeeded"
    assert any(f"sketches of 1 slices, for {n}" in line for line in h.logs("warning"))
    assert all(not m.withdrawn for m in machines)


def test_oversized_or_inconsistent_sketches_and_proofs_do_not_decode() -> None:
    peer = Harness(1).nodes[0].peer
    base = {"v": 1, "t": "task.slice-sketch", "task_id": "a" * 32, "round": 1, "attempt": 0}
    too_many = {**base, "peer": peer, "values": sk.pack([0.0] * (PS * (MAX_SLICES + 1)))}
    not_whole = {**base, "peer": peer, "values": sk.pack([0.0] * (PS + 1))}
    negative_norm = {**base, "peer": peer, "values": sk.pack([0.0] * (PS - 1) + [-1.0])}
    nan = {**base, "peer": peer, "values": sk.pack([float("nan")] + [0.0] * (PS - 1))}
    import msgpack

    for fields, why in (
        (too_many, "at most 256 slices"),
        (not_whole, f"expected {PS * 4} per slice"),
        (negative_norm, "L1 norm"),
        (nan, "finite"),
    ):
        with pytest.raises(RemoteProtocolError, match=why):
            decode(msgpack.packb(fields))
    big = {
        "v": 1,
        "t": "task.sketch-proof",
        "task_id": "a" * 32,
        "round": 1,
        "attempt": 0,
        "peer": peer,
        "index": 0,
        "sketch": b"x" * (64 * 1024),
        "offer": b"",
    }
    with pytest.raises(RemoteProtocolError, match="signed sketch of"):
        decode(msgpack.packb(big))


# --- the simulated network: real node code, the driver's slice work -------------------------


@pytest.mark.slow
def test_sim_fedavg_defaults_to_verified_reduce_scatter(tmp_path) -> None:  # noqa: ANN001
    """Four simulated nodes, real training, the driver's slice work: every round moved by
    reduce-scatter, every slice checked, every node with the same model. (Equality with
    all-gather's bytes is the harness test's: another `aggregation` parameter is another
    task id, so another training seed.)"""
    from tests.core.simhelp import digits_split, run, spec

    paths, test = digits_split(tmp_path, 4, per_node=100)
    cluster, _ = run(spec(paths, test, params={"rounds": 2}))
    assert cluster.result["status"] == "succeeded", cluster.result
    machines = [n.core.tasks[cluster.task_id] for n in cluster.nodes]
    for m in machines:
        scatter = m.rounds.scatter
        assert scatter is not None and scatter.count == 4
        assert scatter.check is not None and scatter.check.verified and not m.withdrawn
        assert all(c.attempt == 0 and len(c.included) == 4 for c in m.rounds.closes.values())
    assert {m.global_ref.cid for m in machines} == {cluster.result["model_cid"]}
