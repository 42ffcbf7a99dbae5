"""A node's flows: the flow machines, fed from the node's task machines, and persisted.

The service sits beside the core (it is not part of the sans-IO protocol: it reads the
core's task machines and asks the node to offer tasks). After anything happens to a task
that belongs to a flow, `sync` hands the flow machine the signed records the core accepted
for it (the offer, the roster, the result, as signed), and carries out what the machine
returns: `OfferStep` becomes a task offer of this node (only the starter's machine ever
asks), `FlowEnded` is logged and told to whoever waits. Every flow this node started or
followed is saved after each change (p2pfl/flow/store.py), so a restarted node derives the
same state again and its starter goes on with the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from p2pfl.core.flowrec import FlowRecord, flow_id_of
from p2pfl.core.view import result_fields
from p2pfl.flow.machine import (
    FlowEnded,
    FlowMachine,
    FlowPhase,
    OfferStep,
    Refused,
    Resume,
    Start,
    StepOffered,
    StepResult,
    StepRoster,
    StepState,
)
from p2pfl.flow.store import FlowStore, SavedFlow
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed

log = logging.getLogger("p2pfl.flow")

MAX_FLOWS = 256  # flows one node follows (a peer could otherwise make it hold any number)

OfferFn = Callable[[FlowRecord, int, BlobRef | None], str]
FollowFn = Callable[[Signed], None]


class FlowService:
    def __init__(
        self,
        core: Any,
        offer_step: OfferFn,
        store: FlowStore | None = None,
        follow: FollowFn | None = None,
    ) -> None:
        self.core = core
        self.offer_step = offer_step
        self.store = store
        # Hands a saved signed record back to the node as if it came from the network, so
        # that after a restart the node follows a step task that is still running.
        self.follow = follow
        self.flows: dict[str, FlowMachine] = {}
        self.started: set[str] = set()  # flows this node started
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._fed: dict[str, set[bytes]] = {}  # flow id -> signatures already handed over
        self._saved: dict[str, int] = {}  # flow id -> records saved
        self._flow_of: dict[str, str] = {}  # task id -> flow id
        self.refused = 0

    # --- life cycle --------------------------------------------------------------------

    def load(self) -> None:
        """Rebuild every saved flow (signatures re-checked); the starter goes on."""
        if self.store is None:
            return
        for flow_id in self.store.ids():
            saved = self.store.load(flow_id)
            if saved is None:
                log.warning("flow %s: unreadable file, ignored", flow_id[:12])
                continue
            machine = FlowMachine.replay(
                saved.flow, self.core.me, list(saved.records), saved.started
            )
            self.flows[flow_id] = machine
            self._saved[flow_id] = len(saved.records)
            self._fed[flow_id] = set()
            if saved.started:
                self.started.add(flow_id)
            for known in machine.attempts:
                for task_id in known:
                    self._flow_of[task_id] = flow_id
        for flow_id in list(self.flows):
            self._refollow(self.flows[flow_id])
            self._execute(flow_id, self.flows[flow_id]._advance())

    def _refollow(self, machine: FlowMachine) -> None:
        """A step still running when the node went down: its offer and rosters go back into
        the node, so its task machine follows the task again and takes its result."""
        if self.follow is None:
            return
        for view in machine.steps():
            if view.state is not StepState.RUNNING or view.task_id in self.core.tasks:
                continue
            attempt = machine.latest(view.index)
            if attempt is None:
                continue
            for envelope in [attempt.envelope, *attempt.rosters]:
                self.follow(envelope)

    def start(self, record: FlowRecord) -> str:
        flow_id = flow_id_of(record)
        machine = FlowMachine(record, self.core.me)
        self.flows[flow_id] = machine
        self._fed[flow_id] = set()
        self.started.add(flow_id)
        self._execute(flow_id, machine.handle(Start()))
        self._save(flow_id, force=True)
        return flow_id

    def resume(self, flow_id: str) -> dict[str, Any]:
        machine = self._machine(flow_id)
        self._execute(flow_id, machine.handle(Resume()))
        return self.status(flow_id)

    # --- feeding ----------------------------------------------------------------------

    def sync(self, task_id: str | None = None) -> None:
        """Hand every flow machine what the core accepted for its step tasks (one task,
        or all of them)."""
        tasks = self.core.tasks
        machines = (
            [tasks[task_id]] if task_id in tasks else ([] if task_id else list(tasks.values()))
        )
        for task in machines:
            offer = task.offer
            if offer.flow is None:
                continue
            flow_id = self._flow_of.get(task.task_id) or flow_id_of(offer.flow)
            self._flow_of[task.task_id] = flow_id
            machine = self.flows.get(flow_id)
            if machine is None:
                if len(self.flows) >= MAX_FLOWS and not self._evict():
                    continue
                machine = self.flows[flow_id] = FlowMachine(offer.flow, self.core.me)
                self._fed[flow_id] = set()
            events: list[Any] = []
            if task.offer_envelope is not None:
                events.append(StepOffered(task.offer_envelope))
            if task.roster_envelope is not None:
                events.append(StepRoster(task.roster_envelope))
            if task.result_envelope is not None:
                events.append(StepResult(task.result_envelope))
            for event in events:
                self.feed(flow_id, event)
        for flow_id in list(self.flows):
            self._save(flow_id)

    def _evict(self) -> bool:
        """Make room: forget the oldest finished flow this node only followed (its file
        too). False when every flow here is unfinished or our own."""
        done = [
            (m.flow.created, fid)
            for fid, m in self.flows.items()
            if fid not in self.started and m.phase in (FlowPhase.SUCCEEDED, FlowPhase.FAILED)
        ]
        if not done:
            return False
        _created, victim = min(done)
        del self.flows[victim]
        self._fed.pop(victim, None)
        self._saved.pop(victim, None)
        for task_id in [t for t, f in self._flow_of.items() if f == victim]:
            del self._flow_of[task_id]
        if self.store is not None:
            self.store.remove(victim)
        return True

    def feed(self, flow_id: str, event: StepOffered | StepRoster | StepResult) -> None:
        fed = self._fed.setdefault(flow_id, set())
        key = event.envelope.sig
        if key in fed:
            return
        fed.add(key)
        self._execute(flow_id, self.flows[flow_id].handle(event))

    def _execute(self, flow_id: str, commands: list[Any]) -> None:
        machine = self.flows[flow_id]
        for cmd in commands:
            if isinstance(cmd, OfferStep):
                if not machine.is_starter:
                    continue
                try:
                    task_id = self.offer_step(machine.flow, cmd.index, cmd.model)
                except Exception as exc:  # the node could not offer: the flow waits for resume
                    log.error("flow %s: cannot offer step %s: %s", flow_id[:12], cmd.step.name, exc)
                    self._notify(
                        flow_id,
                        {"kind": "error", "message": f"cannot offer step {cmd.step.name}: {exc}"},
                    )
                    continue
                self._flow_of[task_id] = flow_id
                log.info(
                    "flow %s: step %s offered as task %s", flow_id[:12], cmd.step.name, task_id[:12]
                )
                self._notify(flow_id, {"kind": "step", "step": cmd.step.name, "task_id": task_id})
                self.sync(task_id)
            elif isinstance(cmd, FlowEnded):
                log.info(
                    "flow %s %s%s",
                    flow_id[:12],
                    cmd.status,
                    f": {cmd.reason}" if cmd.reason else "",
                )
                self._notify(flow_id, {"kind": "ended", "status": cmd.status, "reason": cmd.reason})
            elif isinstance(cmd, Refused):
                self.refused += 1
                log.info("flow %s: %s refused: %s", flow_id[:12], cmd.what, cmd.reason)
        self._save(flow_id)

    def _notify(self, flow_id: str, event: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener(flow_id, event)

    def _save(self, flow_id: str, force: bool = False) -> None:
        machine = self.flows.get(flow_id)
        if self.store is None or machine is None:
            return
        if not force and self._saved.get(flow_id) == len(machine.records):
            return
        saved = SavedFlow(machine.flow, flow_id in self.started, tuple(machine.records))
        try:
            self.store.save(saved)
        except (OSError, ValueError) as exc:
            log.error("flow %s: cannot save: %s", flow_id[:12], exc)
            return
        self._saved[flow_id] = len(machine.records)

    # --- views ------------------------------------------------------------------------

    def _machine(self, flow_id: str) -> FlowMachine:
        machine = self.flows.get(flow_id)
        if machine is None:
            raise KeyError(f"flow {flow_id} is not known on this node")
        return machine

    def list(self) -> list[dict[str, Any]]:
        out = []
        for flow_id, machine in self.flows.items():
            views = machine.steps()
            done = sum(v.state is StepState.SUCCEEDED for v in views)
            out.append(
                {
                    "flow_id": flow_id,
                    "name": machine.flow.name,
                    "status": machine.phase.value,
                    "reason": machine.reason,
                    "steps": len(views),
                    "done": done,
                    "starter": machine.flow.starter,
                    "created": machine.flow.created,
                }
            )
        return sorted(out, key=lambda f: f["created"])

    def status(self, flow_id: str) -> dict[str, Any]:
        """The flow as one tree: each step's state and %, its task, and per node the task
        state, round r/R, loss and records (what this node's task machine follows)."""
        machine = self._machine(flow_id)
        steps = []
        for view in machine.steps():
            step = machine.flow.steps[view.index]
            task = self.core.tasks.get(view.task_id) if view.task_id else None
            summary = task.summary() if task is not None else None
            nodes = []
            if task is not None:
                for peer, state in sorted(task.nodes.items()):
                    nodes.append(
                        {
                            "peer": peer,
                            **state.as_dict(),
                            "rounds": task.offer.rounds,
                            "records": task.samples.get(peer),
                        }
                    )
            result = view.result
            steps.append(
                {
                    "index": view.index,
                    "name": view.name,
                    "state": view.state.value,
                    "percent": _percent(view.state, summary),
                    "task_id": view.task_id,
                    "attempts": view.attempts,
                    "taskpack": summary["name"] if summary else None,
                    "type": summary["type"] if summary else None,
                    "input": list(step.inputs),
                    "output": step.output or None,
                    "model_from": step.model or None,
                    "reason": view.reason,
                    "task": summary,
                    "nodes": nodes,
                    "result": _result(result),
                }
            )
        last = machine.latest(len(machine.flow.steps) - 1)
        final = (
            last.outcome() if last is not None and machine.phase is FlowPhase.SUCCEEDED else None
        )
        return {
            "flow_id": flow_id,
            "name": machine.flow.name,
            "status": machine.phase.value,
            "reason": machine.reason,
            "starter": machine.flow.starter,
            "started_here": flow_id in self.started,
            "created": machine.flow.created,
            "datasets": list(machine.flow.datasets),
            "steps": steps,
            "result": _result(final),
        }

    def result(self, flow_id: str) -> dict[str, Any]:
        """The flow's outcome: every step's signed result (metrics, model cid)."""
        status = self.status(flow_id)
        return {
            "flow_id": flow_id,
            "name": status["name"],
            "status": status["status"],
            "reason": status["reason"],
            "steps": {s["name"]: s["result"] for s in status["steps"]},
            "result": status["result"],
        }


def _percent(state: StepState, summary: dict[str, Any] | None) -> int:
    if state is StepState.SUCCEEDED:
        return 100
    if state is not StepState.RUNNING or summary is None:
        return 0
    rounds = max(1, int(summary.get("rounds") or 1))
    return min(99, int(100 * max(0, int(summary.get("round") or 0) - 1) / rounds))


def _result(result: Any) -> dict[str, Any] | None:
    return None if result is None else result_fields(result)
