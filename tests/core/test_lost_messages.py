"""Direct round messages that are lost on the way are asked for, or sent, again.

Updates go to the participants directly only (no gossip copy: task.to_participants), so a
participant that lacks one asks its author (UpdateAsk): under a close that includes it, or,
as the acting coordinator, while the round is open. A final partial goes to the reducer
candidates again while no result has come (final.py resend). Both are bounded.
"""

from __future__ import annotations

from typing import Any

import pytest

from p2pfl.core.commands import Publish, Send
from p2pfl.core.fedavg_rounds import MAX_UPDATE_ANSWERS
from p2pfl.core.final import PARTIAL_RESENDS
from p2pfl.core.messages import FinalPartial, RoundClose, RoundUpdate, UpdateAsk
from tests.core.harness import Harness, done, tap

KINDS = ("reduce-scatter", "allgather")


def _run_losing_one_update(kind: str, to_coordinator: bool) -> tuple[Harness, str, list[Any]]:
    """Five nodes, two rounds; node 2's first direct update copy to the victim is lost:
    the acting coordinator, or a participant that is not it."""
    h = Harness(5)
    seen, drop = tap(h)
    lost: list[Any] = []
    task_id = ""

    def victim() -> str:
        order = h.machines(task_id)[0].participants
        return order[0] if to_coordinator else order[-1]

    def lose(i: int, cmd: Any) -> bool:
        if lost or i != 2 or not isinstance(cmd, Send) or not isinstance(cmd.msg, RoundUpdate):
            return False
        if cmd.peer != victim() or cmd.peer == h.nodes[2].peer:
            return False
        lost.append(cmd)
        return True

    drop.append(lose)
    task_id = h.offer(rounds=2, aggregation={"kind": kind})
    h.run()
    return h, task_id, [lost, seen]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("to_coordinator", [False, True])
def test_a_lost_update_copy_is_asked_for_again(kind: str, to_coordinator: bool) -> None:
    h, task_id, (lost, seen) = _run_losing_one_update(kind, to_coordinator)
    machines = done(h, task_id)
    assert lost and machines[0].result.status == "succeeded"
    # Nobody was left out of any round, and no round was re-closed.
    for m in machines:
        assert all(c.attempt == 0 and len(c.included) == 5 for c in m.rounds.closes.values())
    assert len({m.global_ref.cid for m in machines}) == 1
    victim, rnd = lost[0].peer, lost[0].msg.round
    asks = [(h.nodes[i].peer, cmd) for i, way, cmd in seen if isinstance(cmd.msg, UpdateAsk)]
    # The victim asked the author it lacked, for that round, and the author answered.
    # (The acting coordinator may also ask a straggler -- the victim, late after its
    # wait -- for a later round; it stays silent until it has trained.)
    mine = [cmd for asker, cmd in asks if asker == victim and cmd.msg.round == rnd]
    assert mine and {cmd.peer for cmd in mine} == {h.nodes[2].peer}
    coordinator = machines[0].participants[0]
    assert {asker for asker, _ in asks} <= {victim, coordinator}
    again = [
        cmd
        for i, way, cmd in seen
        if i == 2
        and way == "Send"
        and cmd.peer == victim
        and isinstance(cmd.msg, RoundUpdate)
        and cmd.msg.round == lost[0].msg.round
    ]
    assert len(again) >= 2 and again[-1].msg == lost[0].msg


@pytest.mark.parametrize("kind", KINDS)
def test_updates_go_directly_without_a_gossip_copy(kind: str) -> None:
    """Every participant a connection away: an update is one direct frame per peer (its
    gossip copy's relays cost a round a third of its time over 8 hosts); the close keeps
    its gossip copy, which followers of the task read."""
    h = Harness(5)
    seen, _ = tap(h)
    task_id = h.offer(rounds=2, aggregation={"kind": kind})
    h.run()
    assert done(h, task_id)[0].result.status == "succeeded"
    updates = [(way, cmd) for _, way, cmd in seen if isinstance(cmd.msg, RoundUpdate)]
    assert updates and all(way == "Send" for way, _ in updates)
    assert len(updates) == 5 * 5 * 2  # to every participant, us included, each round
    closes = {way for _, way, cmd in seen if isinstance(cmd.msg, RoundClose)}
    assert closes == {"Send", "Publish"}
    # Nothing was lost, so nobody asked.
    assert not [cmd for _, _, cmd in seen if isinstance(cmd.msg, UpdateAsk)]


def test_update_asks_are_answered_boundedly_and_only_to_participants() -> None:
    h = Harness(4)
    task_id = h.offer(rounds=2)
    h.run()
    machine = done(h, task_id)[1]
    rounds = machine.rounds
    last = max(rounds.closes)
    asker = next(p for p in machine.participants if p != machine.my_id)
    ask = UpdateAsk(task_id, last, asker)
    answers = [rounds.on_update_ask(h.now, ask) for _ in range(MAX_UPDATE_ANSWERS + 3)]
    assert all(answers[:MAX_UPDATE_ANSWERS]) and not any(answers[MAX_UPDATE_ANSWERS:])
    for answer in answers[:MAX_UPDATE_ANSWERS]:
        assert len(answer) == 1 and isinstance(answer[0], Send) and answer[0].peer == asker
        assert answer[0].msg.peer == machine.my_id and answer[0].msg.round == last
    # A stranger, ourselves, or a round we hold no update of: nothing.
    stranger = Harness(1, seed=99).nodes[0].peer
    assert not rounds.on_update_ask(h.now, UpdateAsk(task_id, last, stranger))
    assert not rounds.on_update_ask(h.now, UpdateAsk(task_id, last, machine.my_id))
    other = next(p for p in machine.participants if p not in (asker, machine.my_id))
    assert not rounds.on_update_ask(h.now, UpdateAsk(task_id, last + 5, other))


def test_an_update_ask_naming_another_asker_is_refused_on_the_wire() -> None:
    """The ask names its asker; a peer naming another is dropped before any task sees it
    (NodeCore checks `peer` against the transport's sender), so nobody can make an author
    send its update to a third peer."""
    h = Harness(4)
    task_id = h.offer(rounds=1)
    h.run()
    target, sender, named = h.nodes[1], h.nodes[3], h.nodes[0]
    before = target.core.bad_messages
    h.inject(sender, None, UpdateAsk(task_id, 1, named.peer), to=[target.index])
    h.run()
    assert target.core.bad_messages == before + 1


def test_a_lost_final_partial_is_sent_again() -> None:
    h = Harness(5)
    seen, drop = tap(h)
    lost: list[Any] = []
    task_id = ""

    def lose(i: int, cmd: Any) -> bool:
        if lost or not isinstance(cmd, Send) or not isinstance(cmd.msg, FinalPartial):
            return False
        if cmd.peer != h.machines(task_id)[0].participants[0] or cmd.msg.peer == cmd.peer:
            return False
        lost.append(cmd)
        return True

    drop.append(lose)
    task_id = h.offer(rounds=1)
    h.run()
    machines = done(h, task_id)
    result = machines[0].result
    assert lost and result.status == "succeeded", result
    assert lost[0].msg.peer in result.participants and not result.absent
    # Sent again at most PARTIAL_RESENDS times by anyone, and not once a result is here.
    for node in h.nodes:
        partials = [
            cmd
            for i, way, cmd in seen
            if i == node.index and way == "Send" and isinstance(cmd.msg, FinalPartial)
        ]
        assert len(partials) <= 3 * (1 + PARTIAL_RESENDS)
    for m in machines:
        assert m.final.resend(h.now) == []


def test_publish_is_kept_for_updates_when_a_participant_is_out_of_reach() -> None:
    """Not connected to every participant: the update goes by gossip, as before."""
    from p2pfl.net.base import PeerDisconnected

    h = Harness(5)
    h._feed(h.nodes[0], PeerDisconnected(h.nodes[1].peer))
    seen, _ = tap(h)
    task_id = h.offer(node=2, rounds=1)
    h.run()
    assert done(h, task_id)[0].result.status == "succeeded"
    how = {way for i, way, cmd in seen if i == 0 and isinstance(cmd.msg, RoundUpdate)}
    assert how == {"Publish"}
    assert all(isinstance(cmd, Send | Publish) for _, _, cmd in seen)
