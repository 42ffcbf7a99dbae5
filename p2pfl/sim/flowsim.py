"""A whole flow on N simulated nodes: `p2pfl simulate` of a scenario that names `flow:`.

The nodes are SimCluster's (the node code of a deployment over the simulated hub); each
also keeps derived datasets (under the run's temporary directory, like a node's data dir)
and runs a FlowService, fed after every event of a step task, exactly as a real node. Node 0
publishes every step's taskpack and starts the flow; the others follow it. Round records
come from the flow's training steps (the report's rounds.csv); the run's result is the
flow's: its status, reason and every step's signed result.

Scenario params apply to the flow's training steps (`rounds`, `lr`, ...), and a key
`STEP.KEY` to that step only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from p2pfl.core.flowrec import FlowRecord, FlowStep
from p2pfl.data.derived import DerivedRegistry
from p2pfl.flow.service import FlowService
from p2pfl.flow.spec import apply_overrides, load_flow, resolve_flow
from p2pfl.sim.cluster import SimCluster
from p2pfl.sim.cluster_base import ClusterNode, ClusterSpec, RoundRecord, _flatten, _param_text
from p2pfl.store.blobref import BlobRef

VOLUNTEER_WINDOW_S = 10.0  # virtual seconds: waiting is free, and every node volunteers


class FlowSimCluster(SimCluster):
    def __init__(self, spec: ClusterSpec, flow: Path) -> None:
        self.flow_path = Path(flow)
        self.services: dict[int, FlowService] = {}
        self.flow_id: str | None = None
        self.flow_status: dict[str, Any] | None = None
        self._training: set[str] = set()  # task ids of the flow's training steps
        self._ended = False
        super().__init__(spec)
        self.warnings.append("a flow run: round rows come from its training steps")

    def _start_node(self, i: int, core: Any, *, add: bool) -> ClusterNode:
        node = super()._start_node(i, core, add=add)
        # The derived datasets survive a restart, as on a real node's disk.
        node.driver.attach_derived(DerivedRegistry(self._tmp / "derived" / str(i)))
        service = FlowService(core, partial(self._offer_step, i))
        service.listeners.append(self._on_flow)
        self.services[i] = service
        node.driver.listeners.append(partial(self._flow_event, i))
        return node

    # --- the flow's wiring -------------------------------------------------------------

    def _offer_step(
        self, index: int, flow: FlowRecord, step_index: int, model: BlobRef | None
    ) -> str:
        step = flow.steps[step_index]
        driver = self.nodes[index].driver
        entry = self.nodes[index].core.book.verified(step.cid)
        if entry is None:
            raise RuntimeError(f"taskpack of step {step.name} is not verified on node {index}")
        names = [x.name for x in entry.manifest.spec.inputs]
        overrides = dict(step.params or {})
        overrides.update({f"inputs.{n}": d for n, d in zip(names, step.inputs, strict=False)})
        created = driver.create_task(
            step.cid,
            overrides,
            volunteer_window_s=VOLUNTEER_WINDOW_S,
            flow=(flow, step_index, model),
        )
        task_id = str(created["task_id"])
        if entry.manifest.spec.type == "training":
            self._training.add(task_id)
            self.task_id = task_id  # records and faults follow the training step
            self._seen.clear()
        return task_id

    def _flow_event(self, index: int, event: dict[str, Any]) -> None:
        task_id = event.get("task_id")
        service = self.services.get(index)
        if (
            isinstance(task_id, str)
            and service is not None
            and service.core is self.nodes[index].core
        ):
            self._schedule(lambda: service.sync(task_id))

    def _on_flow(self, flow_id: str, event: dict[str, Any]) -> None:
        if event.get("kind") == "ended":
            self._ended = True

    def _on_event(self, index: int, event: dict[str, Any]) -> None:
        """Round records and faults follow the training step; the result is the flow's."""
        if event.get("task_id") not in self._training:
            return
        if event.get("kind") in ("result", "failed"):
            return  # the flow's result, not a step's, ends the run
        super()._on_event(index, event)

    def _overrides(self, spec: Any, resolved: list[Any]) -> dict[str, str]:
        params = _flatten(dict(self.spec.params))
        out: dict[str, str] = {}
        for item in resolved:
            name = item.step.name
            out[f"{name}.max_nodes"] = str(self.spec.nodes)
            out[f"{name}.min_nodes"] = str(min(2, self.spec.nodes))
            if item.type == "training":
                for key, value in params.items():
                    if "." not in key:
                        out[f"{name}.{key}"] = _param_text(value)
        for key, value in params.items():
            if "." in key and key.split(".", 1)[0] in {s.step.name for s in resolved}:
                out[key] = _param_text(value)
        return out

    # --- running -----------------------------------------------------------------------

    def _run(self) -> Iterator[RoundRecord]:
        node0 = self.nodes[0]
        self.hub.run(until=self.hub.now + 0.5)  # links come up
        spec = load_flow(self.flow_path)
        resolved = resolve_flow(spec)
        spec = apply_overrides(spec, self._overrides(spec, resolved))
        resolved = resolve_flow(spec)
        cids: dict[Path, str] = {}
        for item in resolved:
            where = item.directory.resolve()
            if where not in cids:
                info = node0.driver.publish_taskpack(where)
                node0.driver.announce_taskpack(info["announce"])
                cids[where] = str(info["cid"])
        self.hub.run(until=self.hub.now + 2.0)  # the taskpacks spread
        steps = tuple(
            FlowStep(
                r.step.name,
                cids[r.directory.resolve()],
                r.step.inputs,
                r.step.output,
                r.step.model,
                dict(r.step.params),
            )
            for r in resolved
        )
        nonce = random.Random(self.spec.seed).randbytes(16)  # a simulation: reproducible
        record = FlowRecord(
            spec.name, node0.identity.peer_id, self.hub.now, nonce, spec.datasets, steps
        )
        self.flow_id = self.services[0].start(record)
        horizon = self.hub.now + 3600.0 * len(steps)
        emitted = 0
        while not self._ended:
            state = self.hub.run(until=horizon, stop=partial(self._should_pause_flow, emitted))
            while emitted < len(self._records):
                yield self._records[emitted]
                emitted += 1
            if state in ("idle", "until") and not self._ended:
                break
        self._result_at = self.hub.now
        self.hub.run(until=self.hub.now + 5.0)  # the last result reaches every node
        for service in self.services.values():
            service.sync()
        yield from self._missing_records()
        self.flow_status = self.services[0].status(self.flow_id)
        status = self.flow_status
        stalled = not self._ended
        self.result = {
            "status": "failed" if stalled else status["status"],
            "reason": f"simulation stalled at t={self.hub.now:.1f}s ({status['status']})"
            if stalled
            else status["reason"],
            "flow_id": self.flow_id,
            "name": status["name"],
            "steps": {s["name"]: s["result"] for s in status["steps"]},
            "model_cid": None,
        }

    def _should_pause_flow(self, emitted: int) -> bool:
        return self._ended or len(self._records) > emitted

    def derived(self, index: int) -> DerivedRegistry:
        """Node `index`'s derived datasets (for reports and tests)."""
        return self.nodes[index].driver.derived
