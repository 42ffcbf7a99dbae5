"""The site policy in the protocol: decided before any code runs, declines name their
rule, the DP budget spans tasks, metrics stay home when the policy says so."""

from __future__ import annotations

from p2pfl.core.commands import Audit
from p2pfl.policy import parse_policy
from tests.core.harness import Harness, done


def _policy(index: int, datasets: dict, requesters: dict | None = None):
    def make(peers: list[str]):
        doc = {"requesters": {k: [peers[i] for i in v] for k, v in (requesters or {}).items()}}
        doc["datasets"] = datasets
        return parse_policy(doc, own_peer=peers[index])

    return make


def test_a_requester_outside_allow_is_declined_with_the_rule():
    # Node 2 lets only lab-a (node 0) use its data; node 1 offers.
    sites = {2: _policy(2, {"data": {"allow": ["lab-a"]}}, {"lab-a": [0]})}
    h = Harness(3, sites=sites)
    task_id = h.offer(node=1, rounds=1)
    h.run()
    machines = done(h, task_id)
    assert h.nodes[2].peer not in machines[0].result.participants
    refused = h.nodes[2].core.tasks[task_id]
    assert refused.declines[refused.my_id] == (
        f"dataset data: requester {h.nodes[1].peer} is not in allow [lab-a]"
    )
    assert h.nodes[2].core.policy_decision(task_id)["rule"] == "datasets.data.allow"
    # ... while lab-a's own offer is welcome.
    task2 = h.offer(node=0, rounds=1)
    h.run()
    assert h.nodes[2].peer in done(h, task2)[0].result.participants


def test_an_unlisted_dataset_serves_only_its_own_operator():
    sites = {1: _policy(1, {})}
    h = Harness(2, sites=sites)
    task_id = h.offer(node=0, rounds=1)
    h.run()
    machine = h.nodes[1].core.tasks[task_id]
    assert "only this node's own tasks" in machine.declines[machine.my_id]
    own = h.offer(node=1, rounds=1)
    h.run()
    assert h.nodes[1].peer in done(h, own)[0].result.participants


def test_a_dp_budget_spent_over_two_tasks_refuses_the_third():
    data = {"data": {"allow": ["lab"], "dp": {"required": True, "budget": 5.0}}}
    sites = {1: _policy(1, data, {"lab": [0]})}
    h = Harness(2, sites=sites)
    dp = {"enabled": True, "epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0}
    for _ in range(2):
        task_id = h.offer(node=0, rounds=1, differential_privacy=dp)
        h.run()
        assert h.nodes[1].peer in done(h, task_id)[0].result.participants
    assert h.nodes[1].core.privacy_spent == {"data": 4.0}
    third = h.offer(node=0, rounds=1, differential_privacy=dp)
    h.run()
    refused = h.nodes[1].core.tasks[third]
    why = refused.declines[refused.my_id]
    assert "remaining 1" in why and "budget" in why, why


def test_dp_off_where_the_policy_requires_it_is_declined():
    data = {"data": {"allow": ["lab"], "dp": {"required": True}}}
    h = Harness(2, sites={1: _policy(1, data, {"lab": [0]})})
    task_id = h.offer(node=0, rounds=1)
    h.run()
    machine = h.nodes[1].core.tasks[task_id]
    assert "DP is required" in machine.declines[machine.my_id]


def test_too_many_rounds_are_declined():
    data = {"data": {"allow": ["lab"], "limits": {"max_rounds": 3}}}
    h = Harness(2, sites={1: _policy(1, data, {"lab": [0]})})
    task_id = h.offer(node=0, rounds=100)
    h.run()
    machine = h.nodes[1].core.tasks[task_id]
    assert machine.declines[machine.my_id] == "dataset data: 100 rounds > max_rounds 3"


def test_every_offer_decision_is_audited():
    sites = {1: _policy(1, {"data": {"allow": ["lab"]}}, {"lab": [0]})}
    h = Harness(2, sites=sites)
    audits: list[Audit] = []
    original = h._one

    def spy(node, cmd):
        if isinstance(cmd, Audit) and node.index == 1:
            audits.append(cmd)
        original(node, cmd)

    h._one = spy  # type: ignore[method-assign]
    task_id = h.offer(node=0, rounds=2)
    h.run()
    done(h, task_id)
    offers = [a.fields for a in audits if a.kind == "offer"]
    assert offers == [
        {
            "task": task_id,
            "requester": h.nodes[0].peer,
            "taskpack": "fedavg-mlp-digits@1.0.0",
            "datasets": ["data"],
            "decision": "allowed",
            "rule": "policy",
            "reason": offers[0]["reason"],
        }
    ]
    releases = [a.fields for a in audits if a.kind == "release"]
    assert [r["round"] for r in releases] == [1, 2]


def test_withheld_metrics_do_not_leave():
    data = {"data": {"allow": ["lab"], "metrics": "withhold"}}
    h = Harness(2, sites={1: _policy(1, data, {"lab": [0]})})
    task_id = h.offer(node=0, rounds=2)
    h.run()
    done(h, task_id)
    publisher_view = h.nodes[0].core.tasks[task_id]
    assert publisher_view.nodes[h.nodes[1].peer].loss is None
    assert publisher_view.nodes[h.nodes[0].peer].loss == 1.0


def test_a_reloaded_policy_that_refuses_a_running_task_makes_the_node_leave_it():
    sites = {2: _policy(2, {"data": {"allow": ["lab"]}}, {"lab": [0]})}
    h = Harness(3, sites=sites)
    task_id = h.offer(node=0, rounds=4)
    h.run(until=2.3)  # round 2 is training everywhere
    machine = h.nodes[2].core.tasks[task_id]
    assert machine.participating
    stricter = _policy(2, {"data": {"allow": ["lab"], "limits": {"max_rounds": 2}}}, {"lab": [0]})
    h._execute(h.nodes[2], h.nodes[2].core.set_site(stricter(h.peer_ids), h.now))
    h.run()
    result = done(h, task_id)[0].result
    assert result.status == "succeeded" and h.nodes[2].peer not in result.participants
    assert machine.withdrawn[machine.my_id] == (
        "the site policy changed: dataset data: 4 rounds > max_rounds 2"
    )
