"""Every attack from the task protocol v2 issue, played by one peer against honest nodes
over the in-memory harness. Each must fail, and the honest nodes must end with the honest
model and result."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from p2pfl.core.messages import TOPIC_TASKS, Roster, RoundClose, RoundUpdate, TaskOffer, TaskResult
from p2pfl.core.offer import derive_task_id
from p2pfl.errors import RemoteProtocolError
from p2pfl.wire import Signed, decode, encode, seal
from tests.core.harness import Harness, as_sent, done, update_in, with_update


def _honest(rounds: int, n: int = 4) -> np.ndarray:
    """The model the harness's honest nodes reach: each round adds mean(1..n)."""
    return np.full(4, rounds * (n + 1) / 2, np.float32)


def _order(h: Harness, task_id: str) -> list[int]:
    index = {n.peer: n.index for n in h.nodes}
    return [index[p] for p in h.machines(task_id)[0].participants]


def _reference_order(n: int = 4, rounds: int = 2) -> list[int]:
    h = Harness(n)
    task_id = h.offer(rounds=rounds)
    h.run()
    return _order(h, task_id)


def test_a_participant_closing_a_round_with_only_its_own_update_is_ignored():
    order = _reference_order()
    h = Harness(4)
    attacker = h.nodes[order[-1]]  # the worst-ranked participant: never its duty

    def own_close(node, cmd):
        update = update_in(cmd)
        if node is attacker and update is not None:
            close = RoundClose(update.task_id, update.round, attacker.peer, (attacker.peer,))
            h.inject(attacker, TOPIC_TASKS, close)
        return cmd

    h.outgoing = own_close
    task_id = h.offer(rounds=2)
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert np.allclose(h.model(machines[0].result.model.cid)["w"], _honest(2))
    assert all(attacker.peer != c.peer for m in machines for c in m.rounds.closes.values())


def test_a_result_before_the_elected_reducer_does_not_win():
    order = _reference_order(rounds=1)
    h = Harness(4)
    attacker = h.nodes[order[-1]]

    def early_result(node, cmd):
        update = update_in(cmd)
        if node is attacker and update is not None:
            forged = TaskResult(
                update.task_id,
                "succeeded",
                "",
                attacker.peer,
                (attacker.peer,),
                1,
                {"accuracy": 1.0},
                update.ref,
                0.0,
            )
            h.inject(attacker, TOPIC_TASKS, seal(attacker.identity, forged))
        return cmd

    h.outgoing = early_result
    task_id = h.offer(rounds=1)
    h.run()
    machines = done(h, task_id)
    result = machines[0].result
    assert result.reducer == h.nodes[order[0]].peer
    assert np.allclose(h.model(result.model.cid)["w"], _honest(1))


def test_claiming_10e15_samples_does_not_dominate_the_average():
    order = _reference_order()
    h = Harness(4)
    attacker = h.nodes[order[-1]]

    def inflate(node, cmd):
        update = update_in(cmd)
        if node is attacker and update is not None:
            return with_update(node, cmd, replace(update, num_samples=10**15))
        return cmd

    h.outgoing = inflate
    task_id = h.offer(rounds=2, deadline_s=5.0)
    h.run()
    machines = done(h, task_id)
    result = machines[0].result
    assert result.status == "succeeded" and attacker.peer not in {
        p for m in machines for c in m.rounds.closes.values() for p in c.included
    }
    # The three honest nodes' mean (1, 2, 3 without the attacker's index) per round.
    honest = [n.index + 1 for n in h.nodes if n is not attacker]
    assert np.allclose(h.model(result.model.cid)["w"], 2 * np.mean(honest))
    assert any("claims 1000000000000000 samples" in line for line in h.logs("warning"))


def test_a_roster_leaving_out_a_better_ranked_volunteer_is_rejected():
    order = _reference_order(rounds=1)
    h = Harness(4)
    attacker = h.nodes[order[-1]]

    def grab(node, cmd):
        # As soon as everyone revealed, the attacker publishes a roster that puts itself
        # first and leaves out everyone who ranks better.
        if node is attacker and isinstance(cmd.msg, Signed) and cmd.msg.kind == "task.reveal":

            def forge() -> None:
                machine = attacker.core.tasks[task_id[0]]
                roster = Roster(
                    machine.task_id,
                    attacker.peer,
                    0,
                    (attacker.peer,),
                    (encode(machine.volunteers[attacker.peer]),),
                    (machine.nonces[attacker.peer],),
                )
                h.inject(attacker, TOPIC_TASKS, seal(attacker.identity, roster))

            h.at(0.001, forge)
        return cmd

    task_id: list[str] = []
    h.outgoing = grab
    task_id.append(h.offer(rounds=1, min_nodes=1))
    h.run()
    honest = [m for m in h.machines(task_id[0]) if m.my_id != attacker.peer]
    assert all(m.roster.coordinator == h.nodes[order[0]].peer for m in honest)
    assert all(len(m.participants) == 4 for m in honest)
    assert any("invalid roster from" in line for line in h.logs("warning"))


def test_a_takeover_roster_leaving_out_the_best_ranked_is_rejected_by_it():
    from p2pfl.core.election import beacon, ranked

    ref = Harness(4)
    tid = ref.offer(rounds=1)
    ref.run()
    nonces = dict(ref.machines(tid)[0].nonces)
    index = {n.peer: n.index for n in ref.nodes}
    best = ref.machines(tid)[0].participants[0]
    # Without the best-ranked volunteer the beacon changes; whoever then ranks first
    # forges a roster without it (claiming the epoch its position allows).
    rest = {p: n for p, n in nonces.items() if p != best}
    seed = beacon(rest)
    new_order = ranked(tid, rest, seed)
    epoch = ranked(tid, nonces, seed).index(new_order[0])
    h = Harness(4)
    attacker, victim = h.nodes[index[new_order[0]]], h.nodes[index[best]]
    order = [index[p] for p in new_order]

    def grab(node, cmd):
        if node is attacker and isinstance(cmd.msg, Signed) and cmd.msg.kind == "task.reveal":

            def forge() -> None:
                machine = attacker.core.tasks[task_id[0]]
                rest = [h.nodes[i].peer for i in order]
                roster = Roster(
                    machine.task_id,
                    attacker.peer,
                    epoch,
                    tuple(rest),
                    tuple(encode(machine.volunteers[p]) for p in rest),
                    tuple(machine.nonces[p] for p in rest),
                )
                h.inject(attacker, TOPIC_TASKS, seal(attacker.identity, roster))

            h.at(0.05, forge)
        # The victim's first roster is slow (its republish comes 1 s later).
        if node is victim and isinstance(cmd.msg, Signed) and cmd.msg.kind == "task.roster":
            if not slowed:
                slowed.append(True)
                return None
        return cmd

    task_id: list[str] = []
    slowed: list[bool] = []
    h.outgoing = grab
    task_id.append(h.offer(rounds=1))
    h.run()
    honest = [m for m in h.machines(task_id[0]) if m.my_id != attacker.peer]
    assert all(m.roster.coordinator == victim.peer for m in honest)
    warnings = h.logs("warning")
    assert any("leaves out volunteer" in line for line in warnings), warnings


def test_an_offer_cannot_choose_its_task_id():
    h = Harness(3)
    task_id = h.offer(rounds=1)
    offer = h.nodes[0].core.tasks[task_id].offer
    ground = replace(offer, task_id="f" * 32)  # a task id that would rank us first
    attacker = h.nodes[2]
    h.inject(
        attacker, TOPIC_TASKS, seal(attacker.identity, replace(ground, publisher=attacker.peer))
    )
    h.run()
    assert "f" * 32 not in h.nodes[0].core.tasks
    assert any("task_id is not derived" in line for line in h.logs("warning"))
    # And a derived id is what the receivers recompute.
    assert derive_task_id(offer) == task_id


def test_a_path_as_task_id_is_refused_at_decode_time():
    h = Harness(2)
    task_id = h.offer(rounds=1)
    offer = h.nodes[0].core.tasks[task_id].offer
    raw = encode(offer).replace(task_id.encode(), b"../../../x" + b"a" * 22)
    with pytest.raises(RemoteProtocolError, match="task_id"):
        decode(raw, expected=TaskOffer)


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"w": np.full(4, np.nan, np.float32), "id": np.zeros(2, np.float32)}, "NaN"),
        ({"w": np.zeros(5, np.float32), "id": np.zeros(2, np.float32)}, "float32[5]"),
        ({"v": np.zeros(4, np.float32), "id": np.zeros(2, np.float32)}, "tensors"),
        ({"w": np.full(4, 1000.0, np.float32), "id": np.zeros(2, np.float32)}, "norm"),
    ],
)
def test_a_bad_update_is_left_out_and_the_round_goes_on(bad, why):
    order = _reference_order()
    h = Harness(4)
    attacker = h.nodes[order[-1]]

    def poison(node, cmd):
        update = update_in(cmd)
        if node is attacker and update is not None:
            from p2pfl.store.blobref import make_blob_ref
            from p2pfl.wire import encode_tensors

            if why == "NaN":  # our encoder refuses NaN: write it into a valid blob's data
                marker = np.full(4, 7.25, np.float32)
                good = bytes(encode_tensors({"w": marker, "id": bad["id"]}))
                data = good.replace(marker.tobytes(), bad["w"].tobytes())
            else:
                data = bytes(encode_tensors(bad))
            ref = make_blob_ref(data)
            h.blobs[ref.cid] = data
            return with_update(node, cmd, replace(update, ref=ref))
        return cmd

    h.outgoing = poison
    task_id = h.offer(rounds=2, max_update_norm=100.0)
    h.run()
    machines = done(h, task_id)
    result = machines[0].result
    assert result.status == "succeeded"
    honest = [n.index + 1 for n in h.nodes if n is not attacker]
    assert np.allclose(h.model(result.model.cid)["w"], 2 * np.mean(honest))
    dropped = [line for line in h.logs("warning") if "left out update" in line]
    assert dropped and all(why in line for line in dropped), dropped


def test_re_announcing_another_participants_update_is_refused():
    order = _reference_order()
    h = Harness(4)
    attacker, victim = h.nodes[order[-1]], h.nodes[order[0]]

    def copy(node, cmd):
        # The attacker sees the victim's announcement, then announces the same blob.
        update = update_in(cmd)
        if node is victim and update is not None:
            forged = as_sent(attacker, cmd.msg, replace(update, peer=attacker.peer))
            h.at(0.05, lambda: h.inject(attacker, TOPIC_TASKS, forged))
        if node is attacker and update is not None:
            return None
        return cmd

    h.outgoing = copy
    task_id = h.offer(rounds=2, deadline_s=5.0)
    h.run()
    done(h, task_id)
    assert any("was announced by" in line for line in h.logs("warning"))


def test_updates_are_served_only_to_the_roster():
    h = Harness(4)
    task_id = h.offer(rounds=1, max_nodes=3)
    h.run()
    machines = [m for m in h.machines(task_id) if m.participating]
    member = machines[0]
    outsider = next(n for n in h.nodes if n.peer not in member.participants)
    core = next(n.core for n in h.nodes if n.peer == member.my_id)
    update = next(iter(member.rounds.owner))  # a round-1 update this node holds
    assert core.may_serve(member.participants[1], update)
    assert outsider.peer not in member.participants
    assert not core.may_serve(outsider.peer, update)
    assert core.may_serve(outsider.peer, h.cid)  # the taskpack itself is public code
    assert not core.may_serve(outsider.peer, "bafkreiunknown")  # nothing unclaimed leaves


def test_a_flood_of_junk_logs_one_line_per_peer():
    from p2pfl.net.base import Message

    h = Harness(2)
    attacker, victim = h.nodes[1], h.nodes[0]
    lines = []
    for i in range(500):
        lines += victim.core.handle(Message(TOPIC_TASKS, attacker.peer, b"junk%d" % i), h.now)
    assert len(lines) == 1 and "(1 bad from this peer so far)" in lines[0].text
    assert victim.core.bad_by_peer[attacker.peer] == 500


def test_large_offers_and_unknown_task_messages_are_bounded():
    from p2pfl.limits import MAX_OFFER_BYTES, PENDING_BYTES
    from p2pfl.net.base import Message

    h = Harness(2)
    attacker, victim = h.nodes[1], h.nodes[0]
    task_id = h.offer(rounds=1)
    offer = victim.core.tasks[task_id].offer
    big = replace(offer, params={"pad": "x" * MAX_OFFER_BYTES}, publisher=attacker.peer)
    big = replace(big, task_id=derive_task_id(big))
    victim.core.handle(
        Message(TOPIC_TASKS, attacker.peer, encode(seal(attacker.identity, big))), 0.0
    )
    assert big.task_id not in victim.core.tasks
    # Round messages for tasks nobody offered are held only up to PENDING_BYTES.
    update = RoundUpdate("a" * 32, 1, attacker.peer, None, 0, {"pad": "y" * 200_000})
    for i in range(200):
        msg = replace(update, task_id=f"{i:032x}")
        victim.core.handle(Message(TOPIC_TASKS, attacker.peer, encode(msg)), 0.0)
    assert victim.core._pending_bytes <= PENDING_BYTES


def test_a_reveal_or_roster_nonce_that_its_record_does_not_commit_to_is_refused():
    from p2pfl.core.messages import Reveal
    from p2pfl.net.base import Message

    h = Harness(3, full_mesh=False)  # reveals wait for the 3 s volunteer deadline
    task_id = h.offer(rounds=1)
    h.run(until=1.0)
    attacker, victim = h.nodes[2], h.nodes[0]
    machine = victim.core.tasks[task_id]
    forged = seal(attacker.identity, Reveal(task_id, attacker.peer, b"\1" * 16))
    victim.core.handle(Message(TOPIC_TASKS, attacker.peer, encode(forged)), h.now)
    assert attacker.peer not in machine.nonces
    assert machine.refused["Reveal"] == 1
    # A roster carrying a nonce the record does not commit to is dropped at decode.
    h.run()
    roster = machine.roster
    bad = replace(roster, nonces=(b"\2" * 16,) + roster.nonces[1:])
    signer = next(n for n in h.nodes if n.peer == roster.coordinator)
    lines = victim.core.handle(
        Message(TOPIC_TASKS, signer.peer, encode(seal(signer.identity, bad))), h.now
    )
    assert any("does not commit to" in line.text for line in lines), lines
