"""What a flow step asks of the task protocol (sans-IO, over the harness): derived inputs
found in the flow's scope, their site's policy names, the k rule for preprocessing, a
handed-over model fetched before the one execution, and served to the later step's roster."""

from __future__ import annotations

import numpy as np

from p2pfl.core.flowrec import FlowRecord, FlowStep, flow_id_of
from p2pfl.core.tokens import JobStep
from p2pfl.store.blobref import make_blob_ref
from tests.core.harness import JOB_S, Harness
from tests.flow.flowharness import FED


def _flow(h: Harness, *, inputs: tuple[str, ...] = ("data",), model: bool = False) -> FlowRecord:
    steps = [FlowStep("make", h.cid, ("data",), output="data_std")]
    steps.append(FlowStep("use", h.cid, inputs, model="make" if model else ""))
    return FlowRecord("f", h.nodes[0].peer, 0.0, b"\x01" * 16, ("data",), tuple(steps))


def test_a_derived_input_is_found_in_its_flow_and_stands_for_its_source() -> None:
    h = Harness(2)
    flow = _flow(h, inputs=("data_std",))
    local = h.nodes[1].core.local
    _id, cmds = h.nodes[0].core.create_task(
        h.cid, {}, dict(FED), ("data_std",), 0.0, 3.0, flow=(flow, 1, None)
    )
    offer = h.nodes[0].core.tasks[_id].offer
    assert local.records(offer, "data_std") is None  # not derived here yet
    local.derived[(flow_id_of(flow), "data_std")] = (42, ("data",))
    assert local.records(offer, "data_std") == 42
    assert local.policy_datasets(offer) == ("data",)
    # Another flow's table of the same name is not this flow's.
    other = FlowRecord("g", flow.starter, 1.0, b"\x02" * 16, ("data",), flow.steps)
    local.derived = {(flow_id_of(other), "data_std"): (42, ("data",))}
    assert local.records(offer, "data_std") is None


def test_nodes_without_the_derived_input_decline_the_step() -> None:
    h = Harness(3)
    flow = _flow(h, inputs=("data_std",))
    # Only nodes 0 and 1 completed the step that writes data_std.
    for node in h.nodes[:2]:
        node.core.local.derived[(flow_id_of(flow), "data_std")] = (100, ("data",))
    task_id, cmds = h.nodes[0].core.create_task(
        h.cid, {}, dict(FED), ("data_std",), 0.0, 3.0, flow=(flow, 1, None)
    )
    h._execute(h.nodes[0], cmds)
    h.run()
    machines = h.machines(task_id)
    assert machines[0].result is not None and machines[0].result.status == "succeeded"
    assert sorted(machines[0].result.participants) == sorted(n.peer for n in h.nodes[:2])
    assert "no local dataset named data_std" in machines[2].declines[h.nodes[2].peer]


def test_preprocessing_needs_k_records() -> None:
    h = Harness(3, taskpack="standardize", rows=[100, 100, 5])
    task_id = h.offer(0, rounds=1)
    h.run()
    machines = h.machines(task_id)
    assert machines[0].is_training  # its "model" is the transform's statistics
    small = h.nodes[2].peer
    assert "k policy" in machines[0].declines[small]
    assert machines[0].result.status == "succeeded"
    assert small not in machines[0].result.participants


def test_a_handed_over_model_is_fetched_before_the_execution() -> None:
    h = Harness(2, taskpack="federated-stats")
    weights = {"w": np.arange(4, dtype=np.float32)}
    model = h.put(weights)
    flow = FlowRecord("f", h.nodes[0].peer, 0.0, b"\x03" * 16, ("data",), (
        FlowStep("train", h.cid, ("data",)),
        FlowStep("eval", h.cid, ("data",), model="train"),
    ))  # fmt: skip
    seen: list[dict] = []
    original = h._job

    def job(node, cmd):
        if cmd.token.step is JobStep.TRAIN:
            seen.append(cmd.job)
            return original(node, type(cmd)(cmd.task_id, {**cmd.job, "weights": None}, cmd.token))
        return original(node, cmd)

    h._job = job  # type: ignore[method-assign]
    task_id, cmds = h.nodes[0].core.create_task(
        h.cid, {}, dict(FED), ("data",), 0.0, 3.0, flow=(flow, 1, model)
    )
    h._execute(h.nodes[0], cmds)
    h.run()
    assert seen and all(j["weights"] == model for j in seen)
    assert all(m.result.status == "succeeded" for m in h.machines(task_id))


def test_an_unfetchable_model_withdraws_the_node() -> None:
    h = Harness(2, taskpack="federated-stats")
    missing = make_blob_ref(b"a model nobody holds" * 100)
    flow = FlowRecord("f", h.nodes[0].peer, 0.0, b"\x04" * 16, ("data",), (
        FlowStep("train", h.cid, ("data",)),
        FlowStep("eval", h.cid, ("data",), model="train"),
    ))  # fmt: skip
    task_id, cmds = h.nodes[0].core.create_task(
        h.cid, {}, dict(FED), ("data",), 0.0, 3.0, flow=(flow, 1, missing)
    )
    h._execute(h.nodes[0], cmds)
    h.run(until=60 * JOB_S)
    h.run()
    machines = h.machines(task_id)
    assert any("cannot fetch the model" in r for m in machines for r in m.withdrawn.values())
    assert machines[0].result is None or machines[0].result.status == "failed"


def test_the_model_is_served_to_the_later_steps_roster_only() -> None:
    h = Harness(3)
    train_id = h.offer(0, rounds=1)
    h.run()
    result = h.machines(train_id)[0].result
    assert result.model is not None
    cid = result.model.cid
    flow = FlowRecord("f", h.nodes[0].peer, 0.0, b"\x05" * 16, ("data",), (
        FlowStep("train", h.cid, ("data",)),
        FlowStep("eval", h.cid, ("data",), model="train"),
    ))  # fmt: skip
    holder = h.nodes[1].core
    outsider = "12D3KooW" + "x" * 44
    assert not holder.may_serve(outsider, cid)
    eval_id, cmds = h.nodes[0].core.create_task(
        h.cid, {}, dict(FED), ("data",), h.now, 3.0, flow=(flow, 1, result.model)
    )
    h._execute(h.nodes[0], cmds)
    h.run()
    machine = holder.tasks[eval_id]
    assert machine.participants
    for peer in machine.participants:
        assert holder.may_serve(peer, cid)
    assert not holder.may_serve(outsider, cid)
