"""The flow machine over the sans-IO harness: ordering, failure, resume, derivation by any
node, restart of the starter, and forged records that must not move a flow."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest

from p2pfl.core.commands import Publish
from p2pfl.core.messages import TaskResult
from p2pfl.core.tokens import JobStep
from p2pfl.flow.machine import (
    FlowMachine,
    FlowPhase,
    FlowProtocolError,
    Refused,
    Resume,
    StepOffered,
    StepResult,
)
from p2pfl.identity import Identity
from p2pfl.wire import Signed, decode, seal
from tests.flow.flowharness import FlowHarness


def _states(machine: FlowMachine) -> list[str]:
    return [v.state.value for v in machine.steps()]


def test_steps_run_in_order_and_every_node_derives_success():
    h = FlowHarness(3)
    record = h.record()
    flow_id = h.start(record)
    h.run()
    for i in range(3):
        machine = h.flow(flow_id, i)
        assert machine.phase is FlowPhase.SUCCEEDED, (i, _states(machine), machine.reason)
        assert _states(machine) == ["succeeded"] * 3
    starter = h.flow(flow_id)
    offers = [starter.latest(i).offer for i in range(3)]
    results = [starter.latest(i).outcome() for i in range(3)]
    # Each step was offered only after the step before it had its result.
    for before, after in zip(results, offers[1:], strict=False):
        assert after.created >= before.created
    # The validate step was handed the train step's result model, by its blob.
    assert offers[2].model == results[1].model and offers[2].model is not None
    assert [o.step for o in offers] == [0, 1, 2]
    assert all(o.flow == record for o in offers)


def test_resume_is_refused_while_running_and_on_another_node():
    h = FlowHarness(2)
    flow_id = h.start(h.record())
    h.run(until=1.0)
    with pytest.raises(FlowProtocolError, match="running"):
        h.flow(flow_id).handle(Resume())
    h.run()
    with pytest.raises(FlowProtocolError):
        h.flow(flow_id, 1).handle(Resume())


def _fail_step_two(h: FlowHarness) -> None:
    def outgoing(node, cmd):
        return cmd

    h.outgoing = outgoing
    original = h._job

    def job(node, cmd):
        task = node.core.tasks.get(cmd.task_id)
        if task is not None and task.offer.step == 1 and task.offer.flow is not None:
            attempts = h.flow(next(iter(h.services[0].flows))).attempts[1]
            if len(attempts) == 1 and cmd.token.step is JobStep.VALIDATE:
                from p2pfl.core.commands import JobFailed

                return JobFailed(cmd.token, "ValueError: no column 'age'")
        return original(node, cmd)

    h._job = job  # type: ignore[method-assign]


def test_fail_at_step_two_then_resume_without_redoing_step_one():
    h = FlowHarness(3)
    _fail_step_two(h)
    flow_id = h.start(h.record())
    h.run()
    starter = h.flow(flow_id)
    assert starter.phase is FlowPhase.FAILED
    assert _states(starter) == ["succeeded", "failed", "pending"]
    assert "no column 'age'" in starter.reason
    done_task = starter.latest(0).task_id
    h.services[0].resume(flow_id)
    h.run()
    for i in range(3):
        assert h.flow(flow_id, i).phase is FlowPhase.SUCCEEDED
    assert list(starter.attempts[0]) == [done_task]
    assert len(starter.attempts[1]) == 2


def test_state_is_derived_by_a_node_that_did_not_start_it_in_any_order():
    h = FlowHarness(3)
    record = h.record()
    flow_id = h.start(record)
    h.run()
    follower = h.flow(flow_id, 2)
    assert follower.phase is FlowPhase.SUCCEEDED
    # A node that only holds the signed records (in any order) derives the same state.
    records = list(follower.records)
    for seed in range(3):
        random.Random(seed).shuffle(records)
        outsider = Identity.from_seed(b"o" * 32).peer_id
        fresh = FlowMachine(record, outsider)
        for raw in _ordered_for_refs(records):
            fresh.handle(_event(raw))
        assert fresh.phase is FlowPhase.SUCCEEDED
        assert [v.task_id for v in fresh.steps()] == [v.task_id for v in follower.steps()]


def _ordered_for_refs(records: list[bytes]) -> list[bytes]:
    """Offers before the records that name their task (a node hears an offer first)."""
    return sorted(records, key=lambda r: 0 if decode(r).kind == "task.offer" else 1)


def _event(raw: bytes):
    from p2pfl.flow.machine import StepRoster

    env = decode(raw, expected=Signed)
    return {"task.offer": StepOffered, "task.roster": StepRoster}.get(env.kind, StepResult)(env)


def test_the_starter_restarts_between_steps_and_the_flow_goes_on(tmp_path):
    h = FlowHarness(3, store_root=tmp_path)
    flow_id = h.start(h.record())
    # Run until step 1 has its result, then crash the starter before it offers step 2.
    original = h.services[0].offer_step
    crashed = []

    def offer_step(flow, index, model):
        if index == 1 and not crashed:
            crashed.append(True)
            raise RuntimeError("node went down")
        return original(flow, index, model)

    h.services[0].offer_step = offer_step
    h.run()
    assert crashed and _states(h.flow(flow_id)) == ["succeeded", "pending", "pending"]
    h.crash(0)
    h.restart(0)  # a fresh core; the flow comes back from DATA_DIR/flows
    h.run()
    for i in range(3):
        assert h.flow(flow_id, i).phase is FlowPhase.SUCCEEDED, (i, h.flow(flow_id, i).reason)
    assert len(h.flow(flow_id).attempts[0]) == 1


# --- attacks ---------------------------------------------------------------------------


def _finished(n: int = 3) -> tuple[FlowHarness, str]:
    h = FlowHarness(n)
    _fail_step_two(h)
    flow_id = h.start(h.record())
    h.run()
    return h, flow_id


def test_a_forged_or_unsigned_result_does_not_advance_a_flow():
    h, flow_id = _finished()
    machine = h.flow(flow_id, 1)
    assert machine.phase is FlowPhase.FAILED
    attempt = machine.latest(1)
    failed = attempt.outcome()
    forged = replace(failed, status="succeeded", reason="", created=failed.created + 1)
    reducer = next(n for n in h.nodes if n.peer == failed.reducer)
    genuine = seal(reducer.identity, failed)
    # The reducer's name on a body it did not sign: the signature does not verify.
    tampered = Signed(
        genuine.signer, genuine.kind, seal(reducer.identity, forged).body[:-1] + b"\0", genuine.sig
    )
    out = machine.handle(StepResult(tampered))
    assert isinstance(out[0], Refused) and "signature" in out[0].reason
    assert machine.phase is FlowPhase.FAILED and _states(machine)[1] == "failed"


def test_a_result_from_a_non_participant_does_not_advance_a_flow():
    h, flow_id = _finished()
    machine = h.flow(flow_id, 2)
    outsider = Identity.from_seed(hashlib.sha256(b"outsider").digest())
    # Step 1 had a roster: a result signed by someone not on it is refused.
    done = machine.latest(0).outcome()
    forged = replace(done, status="failed", reason="sabotage", reducer=outsider.peer_id)
    out = machine.handle(StepResult(seal(outsider, forged)))
    assert isinstance(out[0], Refused) and "not a participant" in out[0].reason
    # Step 2 failed before any roster: a success from an outsider does not count.
    failed = machine.latest(1).outcome()
    forged = replace(failed, status="succeeded", reason="", reducer=outsider.peer_id)
    machine.handle(StepResult(seal(outsider, forged)))
    assert machine.phase is FlowPhase.FAILED
    assert _states(machine) == ["succeeded", "failed", "pending"]
    # Signed by someone else than the reducer it names: refused.
    other = replace(done, status="failed", reason="x", reducer=h.nodes[2].peer)
    out = machine.handle(StepResult(seal(h.nodes[1].identity, other)))
    assert isinstance(out[0], Refused) and "reducer" in out[0].reason
    assert _states(machine) == ["succeeded", "failed", "pending"]


def test_a_step_offered_by_someone_else_than_the_starter_is_refused():
    h, flow_id = _finished()
    machine = h.flow(flow_id, 2)
    genuine = machine.latest(1)
    attacker = h.nodes[1]
    offer = _rederive(
        replace(genuine.offer, publisher=attacker.peer, created=genuine.offer.created + 5)
    )
    out = machine.handle(StepOffered(seal(attacker.identity, offer)))
    assert isinstance(out[0], Refused) and "starter" in out[0].reason
    assert machine.latest(1).task_id == genuine.task_id
    # Signed by the attacker but naming the starter as publisher: not the starter's signature.
    offer = _rederive(replace(genuine.offer, created=genuine.offer.created + 6))
    out = machine.handle(StepOffered(seal(attacker.identity, offer)))
    assert isinstance(out[0], Refused) and "starter" in out[0].reason
    assert machine.phase is FlowPhase.FAILED and len(machine.attempts[1]) == 1


def _rederive(offer):
    from p2pfl.core.offer import derive_task_id

    return replace(offer, task_id=derive_task_id(offer))


def test_a_forged_result_on_the_wire_leaves_every_flow_machine_as_it_was():
    h, flow_id = _finished()
    failed = h.flow(flow_id).latest(1).outcome()
    outsider = Identity.from_seed(hashlib.sha256(b"wire outsider").digest())
    forged = replace(failed, status="succeeded", reason="", reducer=outsider.peer_id)
    from p2pfl.core.messages import TOPIC_TASKS

    fake = type(h.nodes[0])(99, outsider, h.nodes[0].core)
    h.inject(fake, TOPIC_TASKS, seal(outsider, forged))
    h.run()
    for i in range(3):
        assert h.flow(flow_id, i).phase is FlowPhase.FAILED


def test_an_offer_must_fit_its_flow():
    h = FlowHarness(2)
    record = h.record()
    flow_id = h.start(record)
    h.run(until=0.5)
    offer = h.flow(flow_id).latest(0).offer
    from p2pfl.core.offer import offer_problem

    assert offer_problem(offer) is None
    assert "inputs" in offer_problem(_rederive(replace(offer, inputs=("other",))))
    assert "model" in offer_problem(_rederive(replace(offer, step=2)))
    assert "taskpack" in offer_problem(_rederive(replace(offer, cid="b" + "a" * 58)))
    assert "not derived" in offer_problem(replace(offer, inputs=("other",)))
    with pytest.raises(ValueError, match="step"):
        replace(offer, step=99)


def test_publish_commands_carry_the_flow():
    """Every step offer on the wire carries the flow record (so any node can follow)."""
    h = FlowHarness(2)
    seen = []

    def outgoing(node, cmd):
        if (
            isinstance(cmd, Publish)
            and isinstance(cmd.msg, Signed)
            and cmd.msg.kind == "task.offer"
        ):
            seen.append(cmd.msg)
        return cmd

    h.outgoing = outgoing
    flow_id = h.start(h.record())
    h.run()
    from p2pfl.core.flowrec import flow_id_of
    from p2pfl.wire import unseal

    offers = {unseal(s).task_id: unseal(s) for s in seen}
    assert len(offers) == 3
    assert {flow_id_of(o.flow) for o in offers.values()} == {flow_id}
    assert isinstance(next(iter(offers.values())), object) and TaskResult


def test_a_starter_that_restarts_mid_step_follows_the_step_again(tmp_path):
    """The starter takes no part in the steps (its dry runs refuse); it goes down while
    step 2 trains and comes back: it follows step 2 again and offers step 3 itself."""
    h = FlowHarness(3, store_root=tmp_path)
    h.nodes[0].fail_jobs[JobStep.VALIDATE] = "no data here"
    flow_id = h.start(h.record())
    step_two = []

    def rostered() -> bool:
        machine = h.flow(flow_id)
        attempt = machine.latest(1)
        if attempt is not None and attempt.rosters:
            step_two.append(attempt.task_id)
            return True
        return False

    t = 0.0
    for _ in range(2000):  # bounded: step 2's roster comes within seconds of virtual time
        if rostered():
            break
        t += 0.05
        h.run(until=t)
    assert step_two, "step 2 never got a roster"
    assert h.nodes[0].peer not in h.flow(flow_id).latest(1).participants
    h.crash(0)
    h.restart(0)  # no snapshot (not a participant): the flow file brings it back
    h.nodes[0].fail_jobs[JobStep.VALIDATE] = "no data here"
    assert step_two[0] in h.nodes[0].core.tasks  # following step 2 again
    h.run()
    for i in range(3):
        assert h.flow(flow_id, i).phase is FlowPhase.SUCCEEDED, (i, h.flow(flow_id, i).reason)
    assert [len(a) for a in h.flow(flow_id).attempts] == [1, 1, 1]


def test_a_step_that_ends_while_the_starter_is_down_reaches_it_when_it_is_back(tmp_path):
    """The starter is down when step 2's result goes out: when it reconnects, the reducer
    sends it the signed result, and the flow goes on to step 3."""
    h = FlowHarness(3, store_root=tmp_path)
    h.nodes[0].fail_jobs[JobStep.VALIDATE] = "no data here"
    flow_id = h.start(h.record())
    t = 0.0
    for _ in range(2000):
        attempt = h.flow(flow_id).latest(1)
        if attempt is not None and attempt.rosters:
            break
        t += 0.05
        h.run(until=t)
    step_two = h.flow(flow_id).latest(1).task_id
    h.crash(0)
    h.run()  # step 2 ends without the starter; nothing more happens
    assert all(m.result is not None for m in h.machines(step_two))
    assert _states(h.flow(flow_id, 1))[:2] == ["succeeded", "succeeded"]
    h.restart(0)
    h.nodes[0].fail_jobs[JobStep.VALIDATE] = "no data here"
    h.run()
    for i in range(3):
        assert h.flow(flow_id, i).phase is FlowPhase.SUCCEEDED, (i, h.flow(flow_id, i).reason)
    assert [len(a) for a in h.flow(flow_id).attempts] == [1, 1, 1]
