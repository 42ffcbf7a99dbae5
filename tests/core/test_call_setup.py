"""Large tasks set up through the publisher's call (core/call.py), over the harness.

The threshold and the committee are protocol constants; the tests lower them (every
harness node shares the module, so every node evaluates the same rule) to exercise the
large-task path with a dozen nodes."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from p2pfl.core import call
from p2pfl.core.messages import TOPIC_TASKS, CallPart, Reveal, Roster, Volunteer
from p2pfl.wire import Signed, seal, unseal
from tests.core.harness import Harness, done

N = 12


@pytest.fixture(autouse=True)
def small_large_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(call, "CALL_MODE_OVER", 4)
    monkeypatch.setattr(call, "COMMITTEE", 3)
    call.call_view.cache_clear()
    call.call_order.cache_clear()
    call.call_participants.cache_clear()


def _body(cmd):
    return unseal(cmd.msg) if isinstance(cmd.msg, Signed) else cmd.msg


def _counting(h: Harness) -> Counter:
    sent: Counter = Counter()

    def count(node, cmd):
        kind = type(_body(cmd)).__name__
        sent[(kind, "publish" if cmd.__class__.__name__ == "Publish" else "send")] += 1
        return cmd

    h.outgoing = count
    return sent


def test_a_large_task_sets_up_without_all_to_all_messages():
    h = Harness(N)
    sent = _counting(h)
    task_id = h.offer(rounds=2, max_nodes=1000)
    h.run()
    machines = done(h, task_id)
    everyone = {n.peer for n in h.nodes}
    # Records go to the publisher only; only the committee reveals; one call, one roster.
    assert sent[("Volunteer", "publish")] == 0
    assert sent[("Volunteer", "send")] == N - 1
    assert sent[("Reveal", "publish")] == 3
    assert sent[("CallPart", "publish")] == 1
    assert sent[("Roster", "publish")] >= 1
    # Every node derived the same participants from the compact roster.
    assert {m.participants for m in machines} == {machines[0].participants}
    assert set(machines[0].participants) == everyone
    assert all(m.large and m.call is not None for m in machines)
    assert all(m.roster.call == machines[0].call.digest for m in machines)
    # The result names its absentees (none) instead of 12 contributors.
    result = machines[0].result
    assert result.status == "succeeded" and result.participants == () and result.absent == ()
    assert machines[0].contributors(result) == everyone
    assert sorted(machines[0].result_dict()["participants"]) == sorted(everyone)
    # Round 1: mean of 1..12 = 6.5 (equal rows); round 2: + 6.5 again.
    assert np.allclose(h.model(result.model.cid)["w"], 13.0)


def test_the_call_decides_the_committee_and_the_committee_the_beacon():
    h = Harness(N)
    task_id = h.offer(rounds=1, max_nodes=1000)
    h.run()
    m = done(h, task_id)[0]
    keys = sorted(m.call.peers, key=lambda p: call.committee_key(task_id, p))
    assert m.call.committee == tuple(keys[:3])
    assert set(m.nonces) == set(m.call.committee)
    seed = call.committee_seed(m.call, m.nonces)
    assert m.participants == call.call_order(task_id, m.call, seed)[0]


def test_a_volunteer_left_out_of_the_call_declines_and_the_rest_go_on():
    h = Harness(N)
    dropped = h.nodes[5]

    def lose_record(node, cmd):
        if node is dropped and isinstance(_body(cmd), Volunteer):
            return None
        return cmd

    h.outgoing = lose_record
    task_id = h.offer(rounds=1, max_nodes=1000)
    h.run()
    machines = done(h, task_id)
    mine = dropped.core.tasks[task_id]
    assert "left out of the call" in mine.declines[dropped.peer]
    assert dropped.peer not in machines[0].participants
    assert len(machines[0].participants) == N - 1
    assert machines[0].result.status == "succeeded"


def test_a_call_part_signed_by_anyone_but_the_publisher_is_refused():
    h = Harness(N, full_mesh=False)  # the call waits for the volunteer deadline (3 s)
    task_id = h.offer(rounds=1, max_nodes=1000)
    h.run(until=1.0)  # records are on their way; no call yet
    rogue = h.nodes[3]
    record = seal(rogue.identity, Volunteer(task_id, rogue.peer, 100, b"\0" * 32))
    from p2pfl.wire import encode

    forged = CallPart(task_id, rogue.peer, 0, 1, (encode(record),))
    h.inject(rogue, TOPIC_TASKS, seal(rogue.identity, forged))
    h.run(until=1.5)
    assert all(m.call is None for m in h.machines(task_id))
    assert all(m.refused["CallPart"] == 1 for m in h.machines(task_id))
    h.run()
    machines = done(h, task_id)
    assert len(machines[0].participants) == N


def _coordinator_order(task_id_seed: int = 1) -> list[int]:
    h = Harness(N, seed=task_id_seed)
    task_id = h.offer(rounds=1, max_nodes=1000)
    h.run()
    index = {n.peer: n.index for n in h.nodes}
    return [index[p] for p in h.machines(task_id)[0].participants]


@pytest.mark.parametrize(
    "tamper, reason",
    [
        ("drop_reveal", "leaves out the reveal of committee member"),
        ("other_call", "roster names another call"),
        ("bad_nonce", "does not match its record"),
    ],
)
def test_a_tampered_compact_roster_is_refused_and_the_next_in_rank_takes_over(tamper, reason):
    order = _coordinator_order()
    h = Harness(N)
    rogue = h.nodes[order[0]]

    def tampered(node, cmd):
        body = _body(cmd)
        if node is not rogue or not isinstance(body, Roster):
            return cmd
        if tamper == "drop_reveal":
            committee = tuple(b"" if i == 0 else n for i, n in enumerate(body.committee))
            if all(body.committee):
                body = dataclasses.replace(body, committee=committee)
        elif tamper == "other_call":
            body = dataclasses.replace(body, call=b"\1" * 32)
        else:
            committee = tuple(b"\7" * 16 if n else n for n in body.committee)
            body = dataclasses.replace(body, committee=committee)
        return dataclasses.replace(cmd, msg=seal(node.identity, body))

    h.outgoing = tampered
    task_id = h.offer(rounds=1, max_nodes=1000)
    h.run()
    rogue.alive = False  # it went on with its own roster; look at the others
    machines = done(h, task_id)
    assert any(reason in text for text in h.logs("warning")), h.logs("warning")[:5]
    roster = machines[0].roster
    assert roster.coordinator == h.nodes[order[1]].peer and roster.epoch >= 1
    assert machines[0].result.status == "succeeded"


def test_a_silent_committee_member_does_not_stop_the_setup():
    h = Harness(N)
    task_id0 = h.offer(rounds=1, max_nodes=1000)
    h.run()
    committee = h.machines(task_id0)[0].call.committee
    # The same offer again in a fresh run, with one committee member never revealing.
    h = Harness(N)
    index = {n.peer: n.index for n in h.nodes}
    mute = h.nodes[index[committee[1]]]

    def no_reveal(node, cmd):
        if node is mute and isinstance(_body(cmd), Reveal):
            return None
        return cmd

    h.outgoing = no_reveal
    task_id = h.offer(rounds=1, max_nodes=1000)
    assert task_id == task_id0
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert set(machines[0].nonces) == set(committee) - {mute.peer}
    assert machines[0].roster.committee.count(b"") == 1


def test_a_restarted_participant_of_a_large_task_resumes_from_its_snapshot():
    order = _coordinator_order()
    h = Harness(N)
    victim = h.nodes[order[-1]]
    task_id = h.offer(rounds=4, max_nodes=1000)
    h.run(until=2.3)
    assert victim.snapshots
    h.crash(victim.index)
    h.at(0.3, lambda: h.restart(victim.index))
    h.run()
    machines = done(h, task_id)
    resumed = victim.core.tasks[task_id]
    assert resumed.call is not None and resumed.participants == machines[0].participants
    assert victim.peer in machines[0].contributors(machines[0].result)
    assert victim.peer in machines[0].rounds.closes[4].included


def test_a_small_task_keeps_the_all_to_all_setup():
    h = Harness(N)
    sent = _counting(h)
    task_id = h.offer(rounds=1, max_nodes=4)
    h.run()
    machines = done(h, task_id)
    assert sent[("Volunteer", "publish")] == N and sent[("CallPart", "publish")] == 0
    assert not machines[0].large and len(machines[0].participants) == 4


@pytest.mark.parametrize("epoch", [0, 1])
def test_a_volunteer_skipping_the_best_ranked_to_coordinate_does_not_displace_it(epoch):
    """The second in rank publishes a compact roster that skips the first as gone: at
    epoch 0 it is refused outright; at epoch 1 it is held until the first's grace is over,
    and the first's genuine roster (epoch 0) comes before that and stands."""
    order = _coordinator_order()
    h = Harness(N)
    first, second = h.nodes[order[0]], h.nodes[order[1]]

    def usurp(node, cmd):
        body = _body(cmd)
        if node is first and isinstance(body, Roster) and body.epoch == 0:
            fake = dataclasses.replace(
                body, coordinator=second.peer, epoch=epoch, skipped=(first.peer,)
            )
            h.inject(second, TOPIC_TASKS, seal(second.identity, fake))
        return cmd

    h.outgoing = usurp
    task_id = h.offer(rounds=1, max_nodes=1000)
    h.run()
    machines = done(h, task_id)
    assert machines[0].roster.coordinator == first.peer and machines[0].roster.epoch == 0
    assert first.peer in machines[0].participants
    if epoch == 0:
        assert any("claims takeover epoch 0" in t for t in h.logs("warning"))


# --- the call's pure rules ---------------------------------------------------------------


def _records(task_id: str, n: int) -> list[tuple[str, bytes]]:
    from p2pfl.identity import Identity
    from p2pfl.wire import encode

    out = []
    for i in range(n):
        me = Identity.from_seed(bytes([i % 256, i // 256]) * 16)
        vol = Volunteer(task_id, me.peer_id, 10 + i, bytes([i % 256]) * 32)
        out.append((me.peer_id, encode(seal(me, vol))))
    return sorted(out)


def test_call_parts_fit_a_gossip_message_and_keep_every_record():
    from p2pfl.limits import MAX_GOSSIP_BYTES
    from p2pfl.wire import encode

    task_id = "ab" * 16
    records = [raw for _, raw in _records(task_id, 3000)]
    parts = call.split_records(records)
    assert len(parts) > 1 and [r for p in parts for r in p] == records
    from p2pfl.identity import Identity

    me = Identity.from_seed(b"p" * 32)
    for i, chunk in enumerate(parts):
        envelope = seal(me, CallPart(task_id, me.peer_id, i, len(parts), chunk))
        assert len(encode(envelope)) <= MAX_GOSSIP_BYTES
    view = call.call_view(task_id, tuple(parts), 3000)
    assert len(view.peers) == 3000 and view.samples[view.peers[0]] >= 10
    assert len(view.committee) == 3  # the fixture's committee size


def test_a_call_out_of_order_duplicated_over_full_or_for_another_task_is_refused():
    from p2pfl.errors import RemoteProtocolError

    task_id = "cd" * 16
    records = [raw for _, raw in _records(task_id, 5)]
    with pytest.raises(RemoteProtocolError, match="strict peer order"):
        call.call_view(task_id, (tuple(reversed(records)),), 10)
    with pytest.raises(RemoteProtocolError, match="strict peer order"):
        call.call_view(task_id, ((records[0], records[0]),), 10)
    with pytest.raises(RemoteProtocolError, match="over max_nodes 4"):
        call.call_view(task_id, (tuple(records),), 4)
    with pytest.raises(RemoteProtocolError, match="someone else"):
        call.call_view("ef" * 16, (tuple(records),), 10)


def test_call_part_fields_are_bounded():
    from p2pfl.identity import Identity

    me = Identity.from_seed(b"q" * 32)
    with pytest.raises(ValueError, match="parts are 1 to"):
        CallPart("ab" * 16, me.peer_id, 0, 10_000, (b"x",))
    with pytest.raises(ValueError, match="part 3 of 2"):
        CallPart("ab" * 16, me.peer_id, 3, 2, (b"x",))
    with pytest.raises(ValueError, match="1 to"):
        CallPart("ab" * 16, me.peer_id, 0, 1, ())
    with pytest.raises(ValueError, match="longer than 1024"):
        CallPart("ab" * 16, me.peer_id, 0, 1, (b"x" * 2048,))
    with pytest.raises(ValueError, match="committee"):
        Roster("ab" * 16, me.peer_id, 0, (), (), (), call=b"\0" * 32, committee=(b"short",))


@pytest.mark.parametrize(
    "aggregation",
    [
        {"kind": "hierarchical", "group_size": 4},
        {"kind": "hierarchical", "group_by": "region"},
        {"kind": "auto"},  # verified reduce-scatter at n >= 4
        {"kind": "allgather"},
    ],
)
def test_every_aggregation_kind_runs_on_a_large_task(aggregation):
    """Group labels come from the call's records (a compact roster carries none)."""
    labels = {i: {"region": "eu" if i % 2 else "us"} for i in range(N)}
    h = Harness(N, labels=labels)
    task_id = h.offer(rounds=2, max_nodes=1000, aggregation=aggregation)
    h.run()
    machines = done(h, task_id)
    result = machines[0].result
    assert machines[0].large and result.status == "succeeded"
    assert machines[0].contributors(result) == {n.peer for n in h.nodes}
    if aggregation.get("group_by"):
        groups = machines[0].rounds.hierarchy.groups
        assert len(groups) == 2 and all(len(g) == N // 2 for g in groups)


# --- peers breaking the call's rules ---------------------------------------------------


def test_a_publisher_cannot_make_nodes_hold_more_call_records_than_max_nodes():
    h = Harness(N, full_mesh=False)  # the call waits for the deadline: the flood comes first
    task_id = h.offer(rounds=1, max_nodes=10)  # over the (lowered) threshold: a large task
    h.run(until=0.5)
    publisher = h.nodes[0]
    junk = tuple(bytes([i]) * 300 for i in range(11))
    flood = CallPart(task_id, publisher.peer, 0, 2, junk)
    h.inject(publisher, TOPIC_TASKS, seal(publisher.identity, flood))
    h.run(until=0.7)
    machines = h.machines(task_id)
    assert all(m.refused["CallPart"] == 1 for m in machines)
    # What each node holds is the genuine call (full at max_nodes: the publisher sent it
    # early), never the flood's records on top of it.
    assert all(sum(len(p.records) for p in m.call_parts.values()) <= 10 for m in machines)
    assert all(m.call is not None and len(m.call.peers) == 10 for m in machines)


def test_a_volunteer_record_sent_to_anyone_but_the_publisher_is_refused():
    h = Harness(N)

    def misdirect(node, cmd):
        if isinstance(_body(cmd), Volunteer) and node is h.nodes[4]:
            return dataclasses.replace(cmd, peer=h.nodes[7].peer)
        return cmd

    h.outgoing = misdirect
    task_id = h.offer(rounds=1, max_nodes=1000)
    h.run()
    assert h.nodes[7].core.tasks[task_id].refused["Volunteer"] == 1
    machines = done(h, task_id)
    assert h.nodes[4].peer not in machines[0].participants


def test_a_result_naming_an_absentee_outside_the_roster_is_refused():
    from p2pfl.core.messages import TaskResult
    from p2pfl.identity import Identity

    order = _coordinator_order()
    h = Harness(N)
    reducer = h.nodes[order[0]]
    outsider = Identity.from_seed(b"o" * 32).peer_id

    def forge(node, cmd):
        body = _body(cmd)
        if node is reducer and isinstance(body, TaskResult) and body.status == "succeeded":
            return dataclasses.replace(
                cmd, msg=seal(node.identity, dataclasses.replace(body, absent=(outsider,)))
            )
        return cmd

    h.outgoing = forge
    task_id = h.offer(rounds=1, max_nodes=1000)
    h.run()
    reducer.alive = False  # it took its own forged result; look at the others
    machines = done(h, task_id)
    assert all(m.refused["TaskResult"] >= 1 for m in machines)
    result = machines[0].result
    assert result.reducer != reducer.peer and outsider not in result.absent


def test_a_reveal_from_outside_the_committee_is_refused_and_leaves_the_beacon_alone():
    h0 = Harness(N)
    task_id = h0.offer(rounds=1, max_nodes=1000)
    h0.run()
    committee = h0.machines(task_id)[0].call.committee
    h = Harness(N)  # the same offer again, now with a reveal from outside the committee
    assert h.offer(rounds=1, max_nodes=1000) == task_id
    outsider = next(n for n in h.nodes if n.peer not in committee)
    # Before the call it is held; once the call names the committee it is refused.
    reveal = Reveal(task_id, outsider.peer, b"\5" * 16)
    h.inject(outsider, TOPIC_TASKS, seal(outsider.identity, reveal))
    h.run()
    machines = done(h, task_id)
    assert all(outsider.peer not in m.nonces for m in machines)
    assert all(m.refused["Reveal"] == 1 for m in machines if m.my_id != outsider.peer)
    assert {tuple(sorted(m.nonces)) for m in machines} == {tuple(sorted(committee))}
