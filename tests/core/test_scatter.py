"""Reduce-scatter rounds (core/scatter.py) on the sans-IO harness: slice assignment,
bit-identical models, slice reassignment after a crash, and what a peer may not do."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from p2pfl.core.commands import FetchBlob, Publish, Send
from p2pfl.core.messages import TOPIC_TASKS, RoundClose
from p2pfl.core.round_messages import SliceDone, SliceOffer, StageAsk
from p2pfl.core.scatter import MAX_ANSWERS, owners, slice_count, verified
from p2pfl.core.tokens import JobStep
from p2pfl.fl import slices
from p2pfl.fl.aggregate import fedavg, median, trimmed_mean
from p2pfl.net.base import PeerDisconnected
from p2pfl.wire import Signed, seal
from tests.core.harness import Harness, Node, carried, done, tap, update_in

RS = {"kind": "reduce-scatter"}  # the default for fedavg at n >= 4; asked for by others


def offer_in(cmd: object) -> SliceOffer | None:
    """The slice offer a Send carries (signed when slices are checked), or None."""
    return carried(cmd, SliceOffer, Send)


def with_offer(node: Node, cmd: Send, offer: SliceOffer) -> Send:
    """`cmd` carrying `offer` instead, signed by `node` as the original was."""
    return replace(cmd, msg=seal(node.identity, offer) if isinstance(cmd.msg, Signed) else offer)


def run(n: int, crash: tuple[int, float] | None = None, **fed: object) -> tuple[Harness, str]:
    h = Harness(n)
    task_id = h.offer(**{"aggregation": RS, **fed})
    if crash is not None:
        h.at(crash[1], lambda: h.crash(crash[0]))
    h.run()
    return h, task_id


def final_models(h: Harness, task_id: str) -> set[str]:
    return {m.global_ref.cid for m in done(h, task_id) if m.global_ref is not None}


# --- the rule ----------------------------------------------------------------------------


def test_slice_count_rule() -> None:
    h, task_id = run(4, rounds=1)
    offer = h.machines(task_id)[0].offer
    peers = tuple(f"p{i}" for i in range(8))
    assert slice_count(offer, peers) == 8
    assert slice_count(offer, peers[:3]) == 0  # n <= 3: all-gather
    assert slice_count(replace(offer, aggregator="krum"), peers) == 8
    many = tuple(f"p{i}" for i in range(33))
    assert slice_count(replace(offer, aggregator="krum"), many) == 0  # n^3 distances
    assert slice_count(offer, many) == 33
    assert slice_count(replace(offer, max_update_norm=1.0), peers) == 0
    assert slice_count(replace(offer, protocol="gossip"), peers) == 0
    allgather = replace(offer, params={"aggregation": {"kind": "allgather"}})
    assert slice_count(allgather, peers) == 0
    # The default: verified reduce-scatter for fedavg (its slices are checked), all-gather
    # for the robust aggregators (their owners would be trusted).
    for params in ({"aggregation": {"kind": "auto"}}, {}):
        auto = replace(offer, params=params)
        assert slice_count(auto, peers) == 8 and verified(auto)
        assert slice_count(auto, peers[:3]) == 0
        for method in ("median", "trimmed_mean", "krum"):
            assert slice_count(replace(auto, aggregator=method), peers) == 0
            assert not verified(replace(auto, aggregator=method))


def test_owners_follow_rank_and_skip_the_left_out() -> None:
    peers = ("a", "b", "c", "d", "e")
    assert owners(peers, peers, 5) == list(peers)
    # c is not included: its slice goes to the next included participant in rank order.
    assert owners(peers, ("a", "b", "d", "e"), 5) == ["a", "b", "d", "d", "e"]
    # The last one's slice wraps around to the first.
    assert owners(peers, ("b", "c", "d"), 5) == ["b", "b", "c", "d", "b"]


def test_slices_cut_and_assemble_exactly() -> None:
    rng = np.random.default_rng(3)
    model = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(4, dtype=np.int64)}
    for count in (1, 4, 7, 19, 25):
        pieces = slices.cut(model, count)
        assert sum(v.size for p in pieces for v in p.values()) == 19
        back = slices.assemble(pieces, model)
        assert all(
            back[k].dtype == model[k].dtype and np.array_equal(back[k], model[k]) for k in model
        )


@pytest.mark.parametrize("method", ["fedavg", "median", "trimmed_mean"])
def test_sliced_aggregation_is_bitwise_the_whole_one(method: str) -> None:
    rng = np.random.default_rng(5)
    ups = [
        (
            {"w": rng.standard_normal(23).astype(np.float32), "b": rng.standard_normal((2, 3))},
            float(10 + i),
        )
        for i in range(6)
    ]
    whole = {"fedavg": fedavg, "median": median, "trimmed_mean": trimmed_mean}[method](ups)
    layout = slices.layout(ups[0][0])
    count = 6
    parts = []
    for j in range(count):
        pieces = [(slices.cut(w, count)[j], n) for w, n in ups]
        combined, bad = slices.reduce_slice(method, pieces, layout, count, j)
        assert bad is None
        parts.append(combined)
    sliced = slices.assemble(parts, ups[0][0])
    assert all(sliced[k].tobytes() == whole[k].tobytes() for k in whole)


# --- rounds over the harness --------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 6, 8])
def test_reduce_scatter_rounds_end_bit_identical_and_equal_to_all_gather(n: int) -> None:
    h, task_id = run(n, rounds=3)
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    models = final_models(h, task_id)
    assert len(models) == 1
    kinds = {w.token.kind for w in h.slice_works}
    # fedavg: every node sketches its slices and checks the combined ones (core/verify.py).
    assert kinds == {"cut", "reduce", "mine", "check", "assemble"}
    # Every node reduced exactly its own slice each round (n slices, n owners).
    reduces = [w for w in h.slice_works if w.token.kind == "reduce"]
    assert len(reduces) == 3 * n
    # The same task over all-gather ends with the same bytes.
    g, gid = run(n, rounds=3, aggregation={"kind": "allgather"})
    assert not g.slice_works
    assert final_models(g, gid) == models
    # Honest FedAvg of the harness's updates: node i moves every weight by i + 1.
    w = h.model(next(iter(models)))["w"]
    assert np.allclose(w, 3 * np.mean(np.arange(1, n + 1)))


def test_each_node_fetches_one_slice_per_peer_not_whole_updates() -> None:
    n = 6
    h, task_id = run(n, rounds=1)
    done(h, task_id)
    updates = {m.rounds.updates[1][p].ref.cid for m in h.machines(task_id) for p in m.participants}
    fetched_updates = [cid for _, cid in h.fetched if cid in updates]
    assert fetched_updates == []  # no whole update moves
    per_node = {i: sum(1 for j, _ in h.fetched if j == i) for i in range(n)}
    # n-1 slices from the others + n combined slices (one is our own: a local hit) + the
    # initial model.
    assert all(count <= 2 * n + 1 for count in per_node.values()), per_node


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregators_work_per_slice(method: str) -> None:
    h, task_id = run(5, rounds=2, aggregator=method)
    assert done(h, task_id)[0].result.status == "succeeded"
    assert len(final_models(h, task_id)) == 1
    assert any(w.method == method for w in h.slice_works if w.token.kind == "reduce")


def test_a_node_crashed_mid_round_has_its_slice_reassigned() -> None:
    n = 6
    h = Harness(n)
    task_id = h.offer(rounds=2, aggregation=RS)
    victim = 3

    # Crash the victim once round 1 is closed with its update in it, before it combines.
    def watch(node, cmd):  # noqa: ANN001, ANN202
        msg = cmd.msg
        if isinstance(msg, RoundClose) and msg.round == 1 and h.nodes[victim].peer in msg.included:
            h.at(0.001, lambda: h.crash(victim))
        return cmd

    h.outgoing = watch
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert len(final_models(h, task_id)) == 1
    closes = [m.rounds.closes[1] for m in machines]
    assert all(c.attempt == 1 and h.nodes[victim].peer not in c.included for c in closes)
    # The victim's slice was combined by the next participant in rank order.
    order = machines[0].participants
    k = order.index(h.nodes[victim].peer)
    heir = order[(k + 1) % n]
    reduced = {
        (w.token.round, w.token.attempt, w.token.index)
        for w in h.slice_works
        if w.token.kind == "reduce"
    }
    assert (1, 1, k) in reduced
    assert owners(order, closes[0].included, n)[k] == heir
    assert any("re-closing round 1" in line for line in h.logs("warning"))


# --- attacks -------------------------------------------------------------------------------


def test_a_slice_from_a_peer_that_does_not_own_it_is_refused() -> None:
    h = Harness(5)
    task_id = h.offer(rounds=1, aggregation=RS)
    thief = h.nodes[4]

    def forge(node, cmd):  # noqa: ANN001, ANN202
        if node is thief and isinstance(cmd, Publish) and isinstance(cmd.msg, SliceDone):
            order = h.machines(task_id)[0].participants
            other = (cmd.msg.index + 1) % len(order)  # a slice someone else owns
            h.inject(thief, TOPIC_TASKS, replace(cmd.msg, index=other))
        return cmd

    h.outgoing = forge
    h.run()
    assert done(h, task_id)[0].result.status == "succeeded"
    assert len(final_models(h, task_id)) == 1
    assert any("not its slice" in line for line in h.logs("warning"))


def test_an_oversized_slice_is_refused_unread() -> None:
    h = Harness(5)
    task_id = h.offer(rounds=1, aggregation=RS)
    liar = h.nodes[2]

    def inflate(node, cmd):  # noqa: ANN001, ANN202
        offer = offer_in(cmd)
        if node is liar and offer is not None:
            big = replace(offer.ref, size=10**9)
            return with_offer(node, cmd, replace(offer, ref=big))
        return cmd

    h.outgoing = inflate
    h.run()
    assert any("slice offer of" in line and "refused" in line for line in h.logs("warning"))
    machines = done(h, task_id)
    # The liar's slices never arrived: the coordinator re-closed without it at its deadline.
    assert machines[0].result.status == "succeeded"
    assert len(final_models(h, task_id)) == 1
    assert all(liar.peer not in m.rounds.closes[1].included for m in machines)


def test_a_mismatched_slice_makes_the_round_close_without_its_author() -> None:
    h = Harness(5)
    task_id = h.offer(rounds=1, aggregation=RS)
    liar = h.nodes[1]

    def swap(node, cmd):  # noqa: ANN001, ANN202
        offer = offer_in(cmd)
        if node is liar and offer is not None:
            # A well-formed blob, but shaped like another slice: refused when combined.
            wrong = h.put({"w": np.ones(3, np.float32), "zz": np.ones(9, np.float32)})
            return with_offer(node, cmd, replace(offer, ref=wrong))
        return cmd

    h.outgoing = swap
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert len(final_models(h, task_id)) == 1
    assert all(liar.peer not in m.rounds.closes[1].included for m in machines)
    assert any("malformed" in line for line in h.logs("warning"))


def test_a_close_forged_by_a_non_coordinator_is_held_not_used() -> None:
    h = Harness(5)
    task_id = h.offer(rounds=1, aggregation=RS)
    forger = h.nodes[4]
    sent = []

    def forge(node, cmd):  # noqa: ANN001, ANN202
        if node is forger and isinstance(cmd, Publish) and isinstance(cmd.msg, RoundClose) is False:
            if not sent and type(cmd.msg).__name__ == "RoundUpdate":
                sent.append(1)
                fake = RoundClose(task_id, 1, forger.peer, (forger.peer,))
                h.inject(forger, TOPIC_TASKS, fake)
        return cmd

    h.outgoing = forge
    h.run()
    machines = done(h, task_id)
    assert all(len(m.rounds.closes[1].included) == 5 for m in machines)


def test_direct_updates_and_closes_are_taken_only_from_the_peer_they_name() -> None:
    """Updates and closes also come directly now: a participant that sends, over its
    own connection, an update in another's name or a close it may not make is refused
    (the direct sender must be the peer the message names; a close counts only from
    the acting coordinator), and the round is the honest one."""
    h = Harness(5)
    task_id = h.offer(rounds=1, aggregation=RS)
    h.run(until=1.0)  # the roster is out, training has not begun
    by_peer = {node.peer: node for node in h.nodes}
    ranked = h.machines(task_id)[0].participants
    forger, victim = by_peer[ranked[-1]], by_peer[ranked[-2]]  # neither is coordinating
    forged: list[object] = []

    def forge(node, cmd):  # noqa: ANN001, ANN202
        update = update_in(cmd)
        if node is victim and update is not None and not forged:
            fake = replace(update, peer=victim.peer, num_samples=1)
            h.inject(forger, None, fake)  # a direct message from the forger, in victim's name
            close = RoundClose(task_id, 1, forger.peer, (forger.peer,))
            h.inject(forger, None, close)
            forged.extend([fake, close])
        return cmd

    h.outgoing = forge
    h.run()
    machines = done(h, task_id)
    assert forged and machines[0].result.status == "succeeded"
    assert all(len(m.rounds.closes[1].included) == 5 for m in machines)
    assert all(m.rounds.updates[1][victim.peer].num_samples != 1 for m in machines)
    assert any(
        "claims" in line and "comes from" in line for line in h.logs("warning") + h.logs("debug")
    )


# --- Krum over slices ----------------------------------------------------------------------


def test_krum_over_slices_picks_what_whole_krum_picks() -> None:
    from p2pfl.fl.aggregate import krum_scores

    rng = np.random.default_rng(9)
    ups = [({"w": rng.standard_normal(40).astype(np.float32)}, 1.0) for _ in range(7)]
    ups[2] = ({"w": ups[2][0]["w"] * 50}, 1.0)  # an outlier
    layout = slices.layout(ups[0][0])
    partials = []
    for j in range(5):
        dist, bad = slices.slice_distances([slices.cut(w, 5)[j] for w, _ in ups], layout, 5, j)
        assert bad is None
        partials.append(dist)
    chosen = slices.krum_choice(partials, 7, 2)
    assert chosen == int(np.argmin(krum_scores(ups, 2)))
    with pytest.raises(slices.BadSlice):
        slices.krum_choice([*partials[:4], -partials[4]], 7, 2)


def test_krum_rounds_move_slices_and_end_bit_identical() -> None:
    n = 7
    h, task_id = run(n, rounds=2, aggregator="krum")
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    models = final_models(h, task_id)
    assert len(models) == 1
    kinds = {w.token.kind for w in h.slice_works}
    assert {"cut", "distances", "krum", "assemble"} <= kinds and "reduce" not in kinds
    # Krum returns one participant's update unchanged: the assembled model is one of them.
    model = h.model(next(iter(models)))
    last = [u.ref.cid for u in machines[0].rounds.updates[2].values()]
    assert any(all(np.array_equal(h.model(cid)[k], model[k]) for k in model) for cid in last)
    # The same task over all-gather: the same bytes.
    g, gid = run(n, rounds=2, aggregator="krum", aggregation={"kind": "allgather"})
    assert final_models(g, gid) == models


def test_owners_fetch_their_slices_while_the_round_is_open() -> None:
    """Each author offers slice j to participant j, which owns it under a close that
    includes everyone, as soon as it has cut its update: by the close every input is
    already asked for, and no offer is sent after it."""
    n = 6
    h = Harness(n)
    task_id = h.offer(rounds=1)
    fetched: list[tuple[float, int, str]] = []
    closed: list[float] = []
    late_offers: list[object] = []
    one = h._one

    def record(node: Node, cmd: object) -> None:
        if isinstance(cmd, FetchBlob):
            fetched.append((h.now, node.index, cmd.ref.cid))
        if isinstance(cmd, Publish) and isinstance(cmd.msg, RoundClose):
            closed.append(h.now)
        if closed and offer_in(cmd) is not None:
            late_offers.append(cmd)
        one(node, cmd)

    h._one = record  # type: ignore[method-assign]
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded" and len(final_models(h, task_id)) == 1
    order = machines[0].participants
    by_peer = {node.peer: node.index for node in h.nodes}
    inputs, own, offers = set(), set(), 0
    for m in machines:
        scatter = m.rounds.scatter
        i = by_peer[m.my_id]
        own |= {(i, r.cid) for r in scatter.mine[1]}
        for (author, j), ref in scatter.offers[1].items():
            if j == order.index(m.my_id) and author != m.my_id:
                inputs.add((i, ref.cid))
                offers += 1
    assert offers == n * (n - 1)  # every owner got every author's offer of its slice
    # (The harness's tiny model makes some slices equal blobs: a node holding a slice
    # of its own with those bytes fetches nothing.)
    early = {(i, cid) for t, i, cid in fetched if t <= closed[0]}
    assert inputs - own and inputs - own <= early  # all asked for before the close
    assert not late_offers


# --- stage messages: direct or gossip, and lost ones ----------------------------------------


def test_stage_messages_go_directly_to_connected_participants_else_by_gossip() -> None:
    n = 5
    h = Harness(n)
    # Node 0 holds no connection to node 1 (both still reach each other by gossip).
    h._feed(h.nodes[0], PeerDisconnected(h.nodes[1].peer))
    seen, _ = tap(h)
    task_id = h.offer(node=2, rounds=1)
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded" and len(final_models(h, task_id)) == 1
    how = {(i, way) for i, way, cmd in seen if isinstance(cmd.msg, SliceDone)}  # type: ignore[attr-defined]
    assert (0, "Publish") in how and (0, "Send") not in how
    assert {(i, "Send") for i in range(1, n)} <= how
    # A direct broadcast reaches every participant once, the sender included.
    to = [
        cmd.peer
        for i, way, cmd in seen
        if i == 1 and way == "Send" and isinstance(cmd.msg, SliceDone)
    ]  # type: ignore[attr-defined]
    assert sorted(to) == sorted(node.peer for node in h.nodes)


def test_a_lost_direct_stage_message_is_asked_for_again() -> None:
    n = 5
    h = Harness(n)
    seen, drop = tap(h)
    victim = h.nodes[3].peer
    lost: list[object] = []

    def lose_first(i: int, cmd: object) -> bool:
        if lost or not isinstance(cmd, Send) or cmd.peer != victim or i == 3:
            return False
        if isinstance(cmd.msg, SliceDone):
            lost.append(cmd)
            return True
        return False

    drop.append(lose_first)
    task_id = h.offer(rounds=1)
    h.run()
    machines = done(h, task_id)
    assert lost and machines[0].result.status == "succeeded"
    assert len(final_models(h, task_id)) == 1
    # Asked again and answered: nobody left out, no re-close.
    assert all(
        m.rounds.closes[1].attempt == 0 and len(m.rounds.closes[1].included) == n for m in machines
    )
    asks = [cmd for i, way, cmd in seen if i == 3 and isinstance(cmd.msg, StageAsk)]  # type: ignore[attr-defined]
    assert asks and {a.peer for a in asks} == {lost[0].msg.peer}  # type: ignore[attr-defined]


def test_stage_asks_are_answered_boundedly_and_only_for_the_current_close() -> None:
    n = 4
    h = Harness(n)
    task_id = h.offer(rounds=1)
    h.run()
    machine = done(h, task_id)[1]
    scatter = machine.rounds.scatter
    close = scatter.close
    asker = h.nodes[0].peer if h.nodes[0].peer != machine.my_id else h.nodes[2].peer
    ask = StageAsk(task_id, close.round, close.attempt, asker)
    answers = [scatter.on_stage_ask(h.now, ask) for _ in range(MAX_ANSWERS + 5)]
    assert all(answers[:MAX_ANSWERS]) and not any(answers[MAX_ANSWERS:])
    assert all(isinstance(c, Send) and c.peer == asker for a in answers for c in a)
    assert not scatter.on_stage_ask(
        h.now, replace(ask, attempt=close.attempt + 1, peer=h.nodes[3].peer)
    )
    stranger = Harness(1, seed=99).nodes[0].peer
    assert not scatter.on_stage_ask(h.now, replace(ask, peer=stranger))


def test_stage_asks_before_our_messages_exist_do_not_use_up_the_answers() -> None:
    """An asker early in the round (here: before our sketch existed) is answered once
    our messages are there: answers are bounded per message we add, not per ask (under
    lossy links an early asker used to exhaust them, and its round stalled)."""
    h = Harness(4)
    task_id = h.offer(rounds=1)
    h.run()
    machine = done(h, task_id)[1]
    scatter = machine.rounds.scatter
    close, told = scatter.close, list(scatter.told)
    assert len(told) >= 2  # our SliceDone and our sketch
    asker = next(n.peer for n in h.nodes if n.peer != machine.my_id)
    ask = StageAsk(task_id, close.round, close.attempt, asker)
    scatter.told, scatter.answered = [], {}
    assert not any(scatter.on_stage_ask(h.now, ask) for _ in range(MAX_ANSWERS + 2))
    scatter.told = told[:1]
    first = [scatter.on_stage_ask(h.now, ask) for _ in range(MAX_ANSWERS + 2)]
    assert all(len(a) == 1 for a in first[:MAX_ANSWERS]) and not any(first[MAX_ANSWERS:])
    scatter.told = told
    later = [scatter.on_stage_ask(h.now, ask) for _ in range(MAX_ANSWERS + 2)]
    assert all(len(a) == len(told) for a in later[:MAX_ANSWERS]) and not any(later[MAX_ANSWERS:])


def test_a_lost_slice_offer_is_asked_for_again_not_dropped() -> None:
    h = Harness(5)
    task_id = h.offer(rounds=1, aggregation=RS)
    lost: list[SliceOffer] = []

    def lose_one(node, cmd):  # noqa: ANN001, ANN202
        offer = offer_in(cmd)
        if offer is not None and not lost:
            lost.append(offer)
            return None  # a direct message lost on the way
        return cmd

    h.outgoing = lose_one
    h.run()
    machines = done(h, task_id)
    assert lost and machines[0].result.status == "succeeded"
    # Asked again and answered: nobody was left out, no re-close.
    assert all(
        m.rounds.closes[1].attempt == 0 and len(m.rounds.closes[1].included) == 5 for m in machines
    )
    assert len(final_models(h, task_id)) == 1


def test_an_offer_that_came_before_our_model_is_checked_against_it_before_any_fetch() -> None:
    """A node still initialising knows no model size yet and keeps an offer that is only
    within the update cap; before fetching it, the offer is checked against the model,
    and the owner reports its author (the round is re-closed without it)."""
    n = 5
    h = Harness(n)
    task_id = h.offer(rounds=1, aggregation=RS)
    liar = h.nodes[2]
    late = h.nodes[(liar.index + 1) % n]  # a slow start; it may own the inflated slice
    late.job_delay[JobStep.INIT] = 3.0
    fetched: list[int] = []
    one = h._one

    def record(node: Node, cmd: object) -> None:
        if isinstance(cmd, FetchBlob):
            fetched.append(cmd.ref.size)
        one(node, cmd)

    def inflate(node, cmd):  # noqa: ANN001, ANN202
        offer = offer_in(cmd)
        if node is liar and offer is not None:
            return with_offer(node, cmd, replace(offer, ref=replace(offer.ref, size=10**7)))
        return cmd

    h._one = record  # type: ignore[method-assign]
    h.outgoing = inflate
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded" and len(final_models(h, task_id)) == 1
    assert all(liar.peer not in m.rounds.closes[1].included for m in machines)
    late_logs = [text for level, text in late.logs if level == "warning"]
    assert any("refused: slice of 10000000 bytes" in line for line in late_logs)
    assert 10**7 not in fetched  # refused unread, before and after the model existed
