"""Flows over the sans-IO harness: each node has a FlowService fed after every event."""

from __future__ import annotations

import hashlib
from typing import Any

from p2pfl.core.flowrec import FlowRecord, FlowStep
from p2pfl.core.messages import TOPIC_TASKS
from p2pfl.flow.service import FlowService
from p2pfl.flow.store import FlowStore
from p2pfl.net.base import Message
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed, encode
from tests.core.harness import FED, Harness, Node


class FlowHarness(Harness):
    def __init__(self, n: int, *, store_root: Any = None, **kw: Any) -> None:
        self.services: dict[int, FlowService] = {}
        self.store_root = store_root
        super().__init__(n, **kw)
        for node in self.nodes:
            self._service(node)

    def _service(self, node: Node) -> FlowService:
        store = FlowStore(self.store_root / str(node.index)) if self.store_root else None

        def follow(envelope: Signed, n: Node = node) -> None:
            self._feed(n, Message(TOPIC_TASKS, n.peer, encode(envelope)))

        service = FlowService(
            node.core, lambda f, i, m, n=node: self._offer(n, f, i, m), store, follow
        )
        self.services[node.index] = service
        return service

    def _offer(self, node: Node, flow: FlowRecord, index: int, model: BlobRef | None) -> str:
        step = flow.steps[index]
        task_id, cmds = node.core.create_task(
            step.cid, {}, dict(FED), step.inputs, self.now, 3.0, flow=(flow, index, model)
        )
        self._execute(node, cmds)
        return task_id

    def _feed(self, node: Node, event: Any) -> None:
        super()._feed(node, event)
        service = self.services.get(node.index) if hasattr(self, "services") else None
        if node.alive and service is not None and service.core is node.core:
            service.sync()

    def restart(self, index: int) -> None:
        super().restart(index)
        service = self._service(self.nodes[index])
        service.load()

    def record(self, steps: int = 3, *, starter: int = 0, model_step: bool = True) -> FlowRecord:
        names = ["standardise", "train", "validate", "package"][:steps]
        flow_steps = []
        for i, name in enumerate(names):
            flow_steps.append(
                FlowStep(
                    name,
                    self.cid,
                    ("data",),
                    model=names[i - 1] if (model_step and i == 2) else "",
                    params={},
                )
            )
        nonce = hashlib.sha256(f"flow|{self.seed}|{steps}".encode()).digest()[:16]
        return FlowRecord(
            "heart", self.nodes[starter].peer, self.now, nonce, ("data",), tuple(flow_steps)
        )

    def start(self, record: FlowRecord, starter: int = 0) -> str:
        return self.services[starter].start(record)

    def flow(self, flow_id: str, index: int = 0) -> Any:
        return self.services[index].flows[flow_id]
