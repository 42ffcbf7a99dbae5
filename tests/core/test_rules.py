"""The task protocol's rules, one test each, over the in-memory harness (no torch, no
trio, no sockets): election, early roster, takeovers, re-close, reducer failover, local
failures, and every attack from the protocol v2 issue."""

from __future__ import annotations

import numpy as np

from p2pfl.core.messages import Volunteer
from p2pfl.core.phase import Phase
from p2pfl.core.tokens import JobStep
from p2pfl.wire.codec import type_name
from tests.core.harness import Harness, done, update_in


def test_fedavg_rounds_end_in_one_signed_result_and_identical_models():
    h = Harness(4)
    task_id = h.offer(rounds=2)
    h.run()
    machines = done(h, task_id)
    result = machines[0].result
    assert result.status == "succeeded" and result.rounds == 2
    assert sorted(result.participants) == sorted(n.peer for n in h.nodes)
    # Round 1: mean of 1..4 = 2.5; round 2: + 2.5 again.
    assert np.allclose(h.model(result.model.cid)["w"], 5.0)
    assert {m.global_ref.cid for m in machines} == {result.model.cid}
    # The reducer is the roster's best-ranked participant, and so is the coordinator.
    assert result.reducer == machines[0].roster.coordinator == machines[0].participants[0]
    assert all(m.phase is Phase.DONE for m in machines)


def _ranked(h: Harness, task_id: str) -> list[int]:
    """Node indices in the roster's rank order (from a finished run of the same seed)."""
    index = {n.peer: n.index for n in h.nodes}
    return [index[p] for p in h.machines(task_id)[0].participants]


def _order(n: int, **kw) -> list[int]:
    h = Harness(n)
    task_id = h.offer(**kw)
    h.run()
    return _ranked(h, task_id)


def test_early_roster_before_the_volunteer_deadline_on_a_full_mesh():
    h = Harness(3)
    task_id = h.offer(rounds=1)
    h.run(until=2.5)  # the volunteer window is 3 s
    assert all(m.roster is not None for m in h.machines(task_id))


def test_without_a_full_mesh_the_roster_waits_for_the_deadline():
    h = Harness(3, full_mesh=False)
    task_id = h.offer(rounds=1)
    h.run(until=2.5)
    assert all(m.roster is None for m in h.machines(task_id))
    h.run()
    done(h, task_id)


def test_ranks_are_not_chosen_by_the_offerer_nonces_change_them():
    """The same offer content with other volunteers' nonces ranks differently: the task id
    alone does not decide (the beacon mixes every revealed nonce)."""
    orders = {tuple(_order(5, rounds=1)) for _ in range(1)}
    seeds = set()
    for seed in (1, 2, 3, 4):
        h = Harness(5, seed=seed)
        task_id = h.offer(rounds=1)
        h.run()
        seeds.add(tuple(_ranked(h, task_id)))
    assert len(seeds | orders) > 1


def test_silent_best_ranked_volunteer_is_skipped_by_the_next_in_rank():
    order = _order(4, rounds=1)
    h = Harness(4)
    silent = h.nodes[order[0]]

    def mute_roster(node, cmd):
        from p2pfl.wire import Signed

        if node is silent and isinstance(cmd.msg, Signed) and cmd.msg.kind == "task.roster":
            return None
        return cmd

    h.outgoing = mute_roster
    task_id = h.offer(rounds=1)
    h.run()
    silent.alive = False  # it went on alone with the roster nobody saw; look at the rest
    machines = done(h, task_id)
    roster = machines[0].roster
    assert roster.coordinator == h.nodes[order[1]].peer and roster.epoch == 1
    assert silent.peer not in roster.participants


def test_coordinator_crash_mid_round_next_in_rank_closes():
    order = _order(4, rounds=3)
    h = Harness(4)
    task_id = h.offer(rounds=3)
    h.run(until=2.3)  # round 2 is training (a fake round takes about 1 s)
    assert all(m.round == 2 and m.result is None for m in h.machines(task_id))
    h.crash(order[0])
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert machines[0].result.reducer == h.nodes[order[1]].peer
    assert h.nodes[order[0]].peer not in machines[0].result.participants


def test_unfetchable_update_is_re_closed_without_its_author():
    allgather = {"kind": "allgather"}  # every node fetches every whole update
    order = _order(4, rounds=2, aggregation=allgather)
    h = Harness(4)
    victim = h.nodes[order[-1]]

    def vanish(node, cmd):
        # The victim announces its round-2 update, which nobody can copy; it dies once the
        # round is closed with that update in it (whatever the order of the announcements,
        # which follows from the task id), so the close has to be made again without it.
        from p2pfl.core.messages import RoundClose

        msg = cmd.msg
        update = update_in(cmd)
        if node is victim and update is not None and update.round == 2:
            del h.blobs[update.ref.cid]
        if isinstance(msg, RoundClose) and msg.round == 2 and victim.peer in msg.included:
            h.at(0.005, lambda: h.crash(victim.index))
        return cmd

    h.outgoing = vanish
    task_id = h.offer(rounds=2, aggregation=allgather)
    h.run()
    machines = done(h, task_id)
    closes = machines[0].rounds.closes
    assert closes[2].attempt == 1 and victim.peer not in closes[2].included
    assert machines[0].result.status == "succeeded"


def test_reducer_failover_after_its_deadline():
    order = _order(4, rounds=1)
    h = Harness(4)
    reducer = h.nodes[order[0]]
    reducer.fail_jobs = {}

    def mute_result(node, cmd):
        from p2pfl.wire import Signed

        if node is reducer and isinstance(cmd.msg, Signed) and cmd.msg.kind == "task.result":
            return None
        return cmd

    h.outgoing = mute_result
    task_id = h.offer(rounds=1)
    h.run()
    others = [m for m in h.machines(task_id) if m.my_id != reducer.peer]
    assert {m.result.reducer for m in others} == {h.nodes[order[1]].peer}
    assert all(m.result.status == "succeeded" for m in others)


def test_local_aggregation_error_withdraws_that_node_only():
    order = _order(4, rounds=2)
    h = Harness(4)
    h.nodes[order[2]].fail_aggregate = True
    task_id = h.offer(rounds=2)
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert h.nodes[order[2]].peer not in machines[0].result.participants
    assert any("withdrew" in e["message"] for e in h.nodes[order[0]].events)


def test_every_node_declining_fails_at_once_with_their_reasons():
    h = Harness(3)
    for node in h.nodes:
        node.fail_jobs = {
            __import__("p2pfl.core.tokens").core.tokens.JobStep.VALIDATE: "SyntaxError: bad"
        }
    task_id = h.offer(rounds=1)
    h.run(until=2.0)  # before the 3 s volunteer deadline
    result = h.machines(task_id)[0].result
    assert result is not None and result.status == "failed"
    assert result.reason == "3 of 3 nodes declined: validate_inputs refused: SyntaxError: bad"


def test_every_participant_withdrawing_at_once_fails_the_task_with_their_reasons():
    # Each withdraws before it hears the others, so none is left with the duty to fail the
    # task: its publisher (which withdrew too) does, and every node ends with that result.
    h = Harness(3)
    for node in h.nodes:
        node.fail_jobs = {JobStep.TRAIN: "ValueError: The privacy budget is too low."}
    task_id = h.offer(rounds=2)
    h.run()
    machines = h.machines(task_id)
    assert {m.phase for m in machines} == {Phase.FAILED}
    result = machines[0].result
    assert result.reducer == h.nodes[0].peer  # the publisher
    assert result.reason == (
        "no participant is left; 3 withdrew: train failed: ValueError: The privacy budget "
        "is too low. (3 nodes)"
    )
    assert {m.result.reason for m in machines} == {result.reason}


def test_a_publisher_failure_is_held_while_a_participant_is_left():
    from p2pfl.core.messages import TOPIC_TASKS, TaskResult
    from p2pfl.wire import seal

    h = Harness(3)
    task_id = h.offer(rounds=3)
    h.run(until=2.3)
    publisher = h.nodes[0]
    machine = h.machines(task_id)[1]
    forged = TaskResult(
        task_id=task_id,
        status="failed",
        reason="mine to end",
        reducer=publisher.peer,
        participants=(),
        absent=(),
        rounds=1,
        metrics={},
        model=None,
        created=h.now,
    )
    h.inject(publisher, TOPIC_TASKS, seal(publisher.identity, forged))
    h.run(until=h.now + 0.1)
    assert machine.result is None and publisher.peer in machine.final.held
    h.run()
    assert all(m.result.status == "succeeded" for m in done(h, task_id))


def test_a_restarted_participant_rejoins_at_the_current_round():
    order = _order(4, rounds=4)
    h = Harness(4)
    victim = h.nodes[order[-1]]
    task_id = h.offer(rounds=4)
    h.run(until=2.3)  # round 2 is training; round 1's model is on "disk"
    assert victim.snapshots and h.machines(task_id)[0].round == 2
    h.crash(victim.index)
    h.at(0.3, lambda: h.restart(victim.index))
    h.run()
    machines = done(h, task_id)
    result = machines[0].result
    assert result.status == "succeeded" and victim.peer in result.participants
    # It trained again after the restart: it is in the last round's close.
    assert victim.peer in machines[0].rounds.closes[4].included
    assert not victim.snapshots  # the task is over: its snapshot is gone


def test_a_restarted_coordinator_resumes_its_duty():
    order = _order(4, rounds=4)
    h = Harness(4)
    coordinator = h.nodes[order[0]]
    task_id = h.offer(rounds=4)
    h.run(until=2.3)
    h.crash(coordinator.index)
    h.at(0.2, lambda: h.restart(coordinator.index))
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.reducer == coordinator.peer
    assert coordinator.peer in machines[0].result.participants


def test_the_publisher_cancels_a_task_for_everyone():
    h = Harness(3)
    task_id = h.offer(rounds=5)
    h.run(until=2.3)
    h._execute(h.nodes[0], h.nodes[0].core.cancel(task_id, "wrong parameters", h.now))
    h.run()
    machines = h.machines(task_id)  # each node records the cancel when it hears of it
    assert {(m.result.status, m.result.reason) for m in machines} == {
        ("failed", "cancelled by the publisher: wrong parameters")
    }
    assert all(m.round < 5 for m in machines)


def test_a_cancel_from_anyone_else_is_refused():
    import pytest

    from p2pfl.core.messages import TOPIC_TASKS, Cancel
    from p2pfl.errors import LocalProtocolError
    from p2pfl.wire import seal

    h = Harness(3)
    task_id = h.offer(rounds=2)
    h.run(until=1.5)
    with pytest.raises(LocalProtocolError, match="only its publisher"):
        h.nodes[1].core.cancel(task_id, "mine now", h.now)
    attacker = h.nodes[1]
    h.inject(attacker, TOPIC_TASKS, seal(attacker.identity, Cancel(task_id, attacker.peer, "x")))
    h.run()
    assert done(h, task_id)[0].result.status == "succeeded"


def test_an_operator_withdraws_its_node_and_the_others_go_on():
    order = _order(4, rounds=3)
    h = Harness(4)
    task_id = h.offer(rounds=3)
    h.run(until=2.3)
    leaver = h.nodes[order[-1]]
    h._execute(leaver, leaver.core.withdraw(task_id, h.now))
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert leaver.peer not in machines[0].result.participants


def test_gossip_push_sum_conserves_mass_and_ends_in_one_result():
    h = Harness(6, rows=[100, 50, 80, 120, 60, 90])
    task_id = h.offer(rounds=3, protocol="gossip", fanout=2)
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    # Push-sum only moves mass: the masses held at the end add up to the signed counts.
    assert abs(sum(m.rounds.mass for m in machines) - 500.0) < 1e-9
    assert all(isinstance(m.rounds.mass, float) for m in machines)


def test_a_push_before_the_roster_is_held_not_refused():
    from p2pfl.core.messages import GossipPush

    h = Harness(3, full_mesh=False)  # the roster waits for the volunteer deadline (3 s)
    task_id = h.offer(rounds=1, protocol="gossip")
    h.run(until=1.0)  # volunteered, no roster yet
    machine = h.nodes[1].core.tasks[task_id]
    assert machine.roster is None
    push = GossipPush(task_id, 1, h.nodes[2].peer, None, 1.0)
    h.inject(h.nodes[2], None, push, to=[1])
    h.run(until=1.05)
    assert machine.refused.get("GossipPush", 0) == 0 and len(machine.early) == 1
    h.run()
    done(h, task_id)


def test_a_node_whose_checks_end_after_the_window_declines_as_late():
    h = Harness(4)
    h.nodes[3].job_delay[JobStep.VALIDATE] = 5.0  # the volunteer window is 3 s
    task_id = h.offer(rounds=1)
    h.run()
    others = [m for m in h.machines(task_id)[:3]]
    assert all(m.phase is Phase.DONE for m in others)
    assert h.nodes[3].peer not in others[0].participants
    # Not stuck: it either saw the roster while checking, or declines as late; it never
    # volunteers after the window.
    ended = [e for e in h.nodes[3].ended if e.task_id == task_id]
    assert ended and ended[0].status in ("observing", "declined")
    assert not [t for _, t in h.nodes[3].logs if "volunteered" in t or "invalid roster" in t]


def test_checks_ending_after_the_deadline_before_any_roster_decline_as_late():
    h = Harness(4, full_mesh=False)
    h.nodes[3].job_delay[JobStep.VALIDATE] = 3.0
    # No roster reaches node 3 (the others' messages after the deadline are lost).
    h.outgoing = lambda node, cmd: None if node.index != 3 and h.now >= 2.9 else cmd
    task_id = h.offer(rounds=1)
    h.run(until=8.0)
    ended = [e for e in h.nodes[3].ended if e.task_id == task_id]
    assert ended and ended[0].status == "declined" and "too late" in ended[0].reason


def test_a_record_that_reached_the_others_after_their_reveals_leaves_its_node_observing():
    """A volunteer record sent just before the deadline but delivered after it is refused
    by peers that revealed; its node takes the roster without it instead of rejecting it
    and waiting forever."""
    h = Harness(4)
    h.nodes[3].job_delay[JobStep.VALIDATE] = 1.5  # it volunteers at about 2 s
    late_peer = h.nodes[3].peer

    def slow_volunteer(node, cmd):
        if node.index == 3 and getattr(cmd.msg, "kind", "") == type_name(Volunteer):
            h.at(1.5, lambda: h._one(node, cmd))
            return None
        return cmd

    h.outgoing = slow_volunteer
    task_id = h.offer(rounds=1)
    h.run()
    machines = h.machines(task_id)
    assert all(m.phase is Phase.DONE for m in machines[:3])
    assert late_peer not in machines[0].participants
    assert machines[3].phase in (Phase.OBSERVING, Phase.DONE)  # followed it to its result
    assert not [t for lvl, t in h.nodes[3].logs if "invalid roster" in t]
