"""Flows on a real node: the control-socket face of its FlowService.

`flow_run` reads a flow file on the node's machine (like `publish` reads a taskpack
directory), checks it (every problem by path), publishes each step's taskpack, builds the
flow record (a fresh CSPRNG nonce: two runs of one file are two flows) and starts it. The
other ops answer from the flow machines: status as one tree, resume, result, and a stream
of status snapshots for `trace`/`wait`.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from p2pfl.core.flowrec import FlowRecord, FlowStep, check_flow_id
from p2pfl.core.messages import TOPIC_TASKS
from p2pfl.errors import LocalProtocolError, TaskFailed, TaskNotFinished
from p2pfl.flow.machine import FlowPhase
from p2pfl.flow.service import FlowService
from p2pfl.flow.store import FlowStore
from p2pfl.net.base import Message
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed, encode

_END = ("succeeded", "failed")


class FlowAPI:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.driver = node.driver
        self.core = node.core
        store = FlowStore(Path(node.config.data_dir) / "flows")
        self.service = FlowService(self.core, self._offer_step, store, self._follow)
        self._watchers: dict[str, set[trio.MemorySendChannel[dict[str, Any]]]] = defaultdict(set)
        self.driver.listeners.append(self._on_task_event)
        self.service.listeners.append(self._on_flow_event)
        self._rng = random.SystemRandom()

    def start(self) -> None:
        """Load saved flows (a restarted starter goes on) and follow what the core knows."""
        self.service.load()
        self.service.sync()

    # --- wiring ------------------------------------------------------------------------

    def _offer_step(self, flow: FlowRecord, index: int, model: BlobRef | None) -> str:
        step = flow.steps[index]
        entry = self.core.book.verified(step.cid)
        if entry is None:
            raise LocalProtocolError(
                f"taskpack {step.cid} of step {step.name} is not verified here"
            )
        names = [i.name for i in entry.manifest.spec.inputs]
        overrides = dict(step.params or {})
        overrides.update({f"inputs.{n}": d for n, d in zip(names, step.inputs, strict=False)})
        created = self.driver.create_task(step.cid, overrides, flow=(flow, index, model))
        return str(created["task_id"])

    def _follow(self, envelope: Signed) -> None:
        """A saved record, handed to the node as a message (checked like any other)."""
        self.driver.on_event(Message(TOPIC_TASKS, self.core.me, encode(envelope)))

    def _on_task_event(self, event: dict[str, Any]) -> None:
        task_id = event.get("task_id")
        machine = self.core.tasks.get(task_id) if isinstance(task_id, str) else None
        if machine is None or machine.offer.flow is None:
            return
        tid = str(task_id)
        # After the driver has carried out this event's commands (no re-entry).
        self.driver.io.call_soon(lambda: self._after(tid))

    def _after(self, task_id: str) -> None:
        self.service.sync(task_id)
        flow_id = self.service._flow_of.get(task_id)
        if flow_id is not None:
            self._push(flow_id)

    def _on_flow_event(self, flow_id: str, event: dict[str, Any]) -> None:
        self._push(flow_id)

    def _push(self, flow_id: str) -> None:
        watchers = self._watchers.get(flow_id)
        if not watchers:
            return
        event = {"kind": "flow", "t": time.time(), "flow": self.service.status(flow_id)}
        for channel in list(watchers):
            try:
                channel.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                watchers.discard(channel)

    # --- ops ---------------------------------------------------------------------------

    async def flow_run(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        from p2pfl.flow.spec import apply_overrides, load_flow, resolve_flow

        spec = apply_overrides(load_flow(path), dict(params))
        resolved = await trio.to_thread.run_sync(resolve_flow, spec)
        cids: dict[Path, str] = {}
        for item in resolved:
            where = item.directory.resolve()
            if where not in cids:
                info = await self.node.publish(str(where), False, {})
                cids[where] = str(info["cid"])
        steps = tuple(
            FlowStep(
                item.step.name,
                cids[item.directory.resolve()],
                item.step.inputs,
                item.step.output,
                item.step.model,
                dict(item.step.params),
            )
            for item in resolved
        )
        record = FlowRecord(
            spec.name,
            self.core.me,
            self.driver.io.now(),
            self._rng.randbytes(16),
            spec.datasets,
            steps,
        )
        flow_id = self.service.start(record)
        return {
            "flow_id": flow_id,
            "name": spec.name,
            "steps": [{"name": s.name, "cid": s.cid} for s in steps],
        }

    def _flow_id(self, flow_id: str) -> str:
        known = list(self.service.flows)
        if flow_id in known:
            return flow_id
        matches = [f for f in known if flow_id and f.startswith(flow_id)]
        if len(matches) == 1:
            return matches[0]
        raise KeyError(flow_id)

    def flows(self) -> list[dict[str, Any]]:
        return self.service.list()

    def flow(self, flow_id: str) -> dict[str, Any]:
        return self.service.status(self._flow_id(flow_id))

    def flow_resume(self, flow_id: str) -> dict[str, Any]:
        from p2pfl.flow.machine import FlowProtocolError

        fid = self._flow_id(flow_id)
        try:
            return self.service.resume(fid)
        except FlowProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None

    def flow_result(self, flow_id: str) -> dict[str, Any]:
        fid = self._flow_id(flow_id)
        machine = self.service.flows[fid]
        if machine.phase is FlowPhase.FAILED:
            raise TaskFailed(f"flow {fid} failed: {machine.reason}")
        if machine.phase is not FlowPhase.SUCCEEDED:
            steps = machine.steps()
            done = sum(v.state.value == "succeeded" for v in steps)
            raise TaskNotFinished(
                f"flow {fid} is {machine.phase.value} ({done}/{len(steps)} steps done)"
            )
        return self.service.result(fid)

    async def watch_flow(self, flow_id: str) -> AsyncIterator[dict[str, Any]]:
        fid = self._flow_id(flow_id)
        check_flow_id(fid)
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._watchers[fid].add(send)
        try:
            status = self.service.status(fid)
            yield {"kind": "flow", "t": time.time(), "flow": status}
            if status["status"] in _END:
                return
            async with receive:
                async for event in receive:
                    yield event
                    if event["flow"]["status"] in _END:
                        return
        finally:
            self._watchers[fid].discard(send)


def control_ops(api: FlowAPI) -> dict[str, tuple[Any, dict[str, Any], str]]:
    """name -> (function, argument types, kind) for the control server."""
    return {
        "flow_run": (api.flow_run, {"path": str, "params": dict}, "async"),
        "flows": (api.flows, {}, "sync"),
        "flow": (api.flow, {"flow_id": str}, "sync"),
        "flow_resume": (api.flow_resume, {"flow_id": str}, "sync"),
        "flow_result": (api.flow_result, {"flow_id": str}, "sync"),
        "watch_flow": (api.watch_flow, {"flow_id": str}, "stream"),
    }
