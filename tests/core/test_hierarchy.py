"""Hierarchical rounds (core/hierarchy.py) on the sans-IO harness: groups by rank,
leaders, bit-identical models, a leader killed mid-round, forged group models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from p2pfl.core.commands import Aggregate, Publish
from p2pfl.core.hierarchy import group_size, groups, leaders
from p2pfl.core.messages import TOPIC_TASKS
from p2pfl.core.round_messages import GroupDone
from tests.core.harness import Harness, done

HIER = {"kind": "hierarchical", "group_size": 3}


def models(h: Harness, task_id: str) -> set[str]:
    return {m.global_ref.cid for m in done(h, task_id) if m.global_ref is not None}


def test_groups_and_leaders_by_rank() -> None:
    peers = tuple("abcdefg")
    assert groups(peers, 3) == [("a", "b", "c"), ("d", "e", "f"), ("g",)]
    # b and d are left out of the close: the next in rank in their group leads.
    assert leaders(groups(peers, 3), ("a", "c", "e", "f", "g")) == {0: "a", 1: "e", 2: "g"}
    assert leaders(groups(peers, 3), ("b", "c")) == {0: "b"}


def test_group_size_rule() -> None:
    h = Harness(4)
    task_id = h.offer(rounds=1, aggregation=HIER)
    h.run()
    offer = h.machines(task_id)[0].offer
    assert group_size(offer) == 3
    assert group_size(replace(offer, params={"aggregation": {"kind": "hierarchical"}})) == 8
    assert group_size(replace(offer, params={})) == 0
    assert (
        group_size(
            replace(offer, params={"aggregation": {"kind": "hierarchical", "group_size": "x"}})
        )
        == 0
    )


def test_hierarchical_rounds_end_bit_identical() -> None:
    n = 9
    rows = [100 + 13 * i for i in range(n)]  # unequal: no group mean equals an update
    h = Harness(n, rows=rows)
    task_id = h.offer(rounds=3, aggregation=HIER)
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    found = models(h, task_id)
    assert len(found) == 1
    # Groups weighted by their sample counts: the global mean is the sample-weighted one.
    w = h.model(next(iter(found)))["w"]
    assert np.allclose(w, 3 * np.average(np.arange(1, n + 1), weights=rows), rtol=1e-5)
    # Members fetched no update: only leaders gather, and only their group's.
    order = machines[0].participants
    updates = {
        u.ref.cid: p for m in machines for rnd in m.rounds.updates.values() for p, u in rnd.items()
    }
    for node, cid in h.fetched:
        if cid in updates:
            me = h.nodes[node].peer
            assert order.index(me) % 3 == 0, "only a leader fetches updates"
            assert order.index(updates[cid]) // 3 == order.index(me) // 3, "of its own group"


def test_a_leader_killed_mid_round_is_replaced_by_the_next_in_rank() -> None:
    n = 9
    h = Harness(n)
    task_id = h.offer(rounds=2, aggregation=HIER)
    order: list[str] = []
    killed: list[int] = []

    # Kill the leader of group 1 as it starts combining its group's updates in round 1.
    def watch(node, cmd):  # noqa: ANN001, ANN202
        if not order:
            order.extend(h.machines(task_id)[0].participants)
        if isinstance(cmd, Publish) and isinstance(cmd.msg, GroupDone) and not killed:
            if cmd.msg.group == 1 and cmd.msg.stage == "group":
                killed.append(node.index)
                h.at(0, lambda: h.crash(node.index))
                return None
        return cmd

    h.outgoing = watch
    h.run()
    assert killed
    victim = h.nodes[killed[0]].peer
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert len(models(h, task_id)) == 1
    close = machines[0].rounds.closes[1]
    assert close.attempt == 1 and victim not in close.included
    heir = order[order.index(victim) + 1]
    assert leaders(groups(tuple(order), 3), close.included)[1] == heir


def test_a_group_model_from_a_non_leader_is_refused() -> None:
    h = Harness(6)
    task_id = h.offer(rounds=1, aggregation=HIER)
    forged: list[int] = []

    def forge(node, cmd):  # noqa: ANN001, ANN202
        if isinstance(cmd, Publish) and isinstance(cmd.msg, GroupDone) and not forged:
            order = h.machines(task_id)[0].participants
            member = h.nodes[next(i for i, x in enumerate(h.nodes) if x.peer == order[1])]
            forged.append(1)
            junk = h.put({"w": np.full(4, 99, np.float32), "id": np.zeros(2, np.float32)})
            h.inject(member, TOPIC_TASKS, replace(cmd.msg, peer=member.peer, group=0, ref=junk))
        return cmd

    h.outgoing = forge
    h.run()
    assert forged
    assert done(h, task_id)[0].result.status == "succeeded"
    found = models(h, task_id)
    assert len(found) == 1
    assert float(h.model(next(iter(found)))["w"][0]) < 99
    assert any("not its leader" in line for line in h.logs("warning"))


def test_robust_aggregator_runs_inside_groups() -> None:
    h = Harness(6)
    task_id = h.offer(rounds=1, aggregation=HIER, aggregator="median")
    seen: list[str] = []
    h.outgoing = None
    original = h._one

    def spy(node, cmd):  # noqa: ANN001, ANN202
        if isinstance(cmd, Aggregate):
            seen.append(f"{cmd.token.stage}:{cmd.method}")
        original(node, cmd)

    h._one = spy  # type: ignore[method-assign]
    h.run()
    assert done(h, task_id)[0].result.status == "succeeded"
    assert "group:median" in seen and "global:fedavg" in seen


def test_groups_by_a_site_label_from_the_signed_records() -> None:
    regions = ["eu", "us", "ap"]
    labels = {i: {"region": regions[i % 3]} for i in range(8)}  # node 8 has no label
    h = Harness(9, labels=labels)
    task_id = h.offer(rounds=2, aggregation={"kind": "hierarchical", "group_by": "region"})
    h.run()
    machines = done(h, task_id)
    assert machines[0].result.status == "succeeded"
    assert len(models(h, task_id)) == 1
    region = {n.peer: labels.get(n.index, {}).get("region", "") for n in h.nodes}
    for m in machines:
        found = m.rounds.hierarchy.groups
        assert found == machines[0].rounds.hierarchy.groups
        assert sorted(len(g) for g in found) == [1, 2, 3, 3]
        assert all(len({region[p] for p in g}) == 1 for g in found)
        order = m.participants
        assert all(list(g) == sorted(g, key=order.index) for g in found)


def test_bad_aggregation_parameters_are_refused_on_the_offer() -> None:
    from p2pfl.core.aggregation import aggregation_problem

    assert (
        aggregation_problem({"aggregation": {"kind": "hierarchical", "group_by": "region"}}) is None
    )
    assert "group_by" in aggregation_problem(
        {"aggregation": {"kind": "hierarchical", "group_by": "../x"}}
    )
    assert "group_by" in aggregation_problem(
        {"aggregation": {"kind": "allgather", "group_by": "region"}}
    )
    assert "group_size" in aggregation_problem(
        {"aggregation": {"kind": "hierarchical", "group_size": 10**9}}
    )
    assert "kind" in aggregation_problem({"aggregation": {"kind": "tree"}})
    assert "must be" in aggregation_problem({"aggregation": {"kind": "auto", "extra": 1}})
