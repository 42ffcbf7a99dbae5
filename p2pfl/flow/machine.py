"""The flow machine: a flow's state, derived from signed records only (sans-IO).

Every node can run one per flow it hears of. It takes the signed records of the flow's step
tasks (offers, rosters, results: exactly the bytes that travel on the network) and derives
which step runs, which succeeded, which failed and why. Nothing it holds comes from the
node that started the flow other than what that node signed, so the starting node is not a
server: a node that never talked to it derives the same state from the same records, and the
starter itself, restarted, derives it again from the records it persisted.

Only the flow's starter acts on the state: when a step succeeded and the next one has no
task yet, or when `Resume` asks for a failed step again, its machine returns `OfferStep`;
the node makes the offer (signed, carrying the flow record and step index) and feeds it back
as `StepOffered`. Every other node's machine returns no commands: it follows.

What counts (the same rule on every node, checked here, not trusted to the caller):
* an offer: signed by the flow's starter, its task id derived from its contents, its flow
  record this flow's, its cid/inputs the step's (core/flowrec.py), at most MAX_ATTEMPTS per
  step; a model hand-off must be the result model of the step the flow names;
* a roster: signed by its coordinator, carrying the signed volunteer records and reveals
  it lists, in the election's rank order (core/election.py), for a task this flow offered;
* a result: signed by its reducer, for a task this flow offered, and the reducer one of a
  valid roster's participants. A failed result before any roster counts only from the
  task's publisher (the rule of the task protocol).
Records that do not count are answered with `Refused` (and change nothing).

State is derived, never accumulated: `derive()` folds the steps in order, so the records
may arrive in any order and the outcome is the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from p2pfl.core.election import roster_problem
from p2pfl.core.flowrec import FlowRecord, FlowStep, flow_id_of
from p2pfl.core.messages import Roster, TaskOffer, TaskResult
from p2pfl.core.offer import offer_problem
from p2pfl.errors import RemoteProtocolError
from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Signed, decode, encode, unseal

MAX_ATTEMPTS = 16  # tasks per step (a step retried by resume)
MAX_ROSTERS = 4  # rosters per task (takeovers)
MAX_RESULTS = 4  # results per task (a duty taken over may publish again)


class FlowPhase(enum.Enum):
    PENDING = "pending"  # known, no step offered yet
    RUNNING = "running"  # a step is on the network
    FAILED = "failed"  # a step failed: the flow stops with its reason (resume retries it)
    SUCCEEDED = "succeeded"  # every step succeeded


class StepState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The starter begins the flow (offers step 0)."""


@dataclass(frozen=True)
class Resume:
    """The starter retries the failed step; finished steps are not redone."""


@dataclass(frozen=True)
class StepOffered:
    envelope: Signed  # Signed(TaskOffer)


@dataclass(frozen=True)
class StepRoster:
    envelope: Signed  # Signed(Roster)


@dataclass(frozen=True)
class StepResult:
    envelope: Signed  # Signed(TaskResult)


FlowEvent = Start | Resume | StepOffered | StepRoster | StepResult


# --- commands --------------------------------------------------------------------------


@dataclass(frozen=True)
class OfferStep:
    """Offer step `index` (a new task); `model` is the result model it is handed."""

    index: int
    step: FlowStep
    model: BlobRef | None
    attempt: int  # 0 for the first task of this step, k for the k-th resume


@dataclass(frozen=True)
class FlowEnded:
    status: str  # succeeded | failed
    reason: str


@dataclass(frozen=True)
class Refused:
    what: str  # the event's kind
    reason: str


FlowCommand = OfferStep | FlowEnded | Refused


class FlowProtocolError(Exception):
    """An event this phase does not take (our own misuse, e.g. resuming a running flow)."""


# --- what is known of one step's task --------------------------------------------------


@dataclass
class Attempt:
    offer: TaskOffer
    envelope: Signed
    participants: set[str] = field(default_factory=set)  # of every valid roster
    rosters: list[Signed] = field(default_factory=list)  # the valid rosters, as signed
    results: list[tuple[TaskResult, Signed]] = field(default_factory=list)
    held: list[StepResult] = field(default_factory=list)  # results that came before a roster

    @property
    def task_id(self) -> str:
        return self.offer.task_id

    def outcome(self) -> TaskResult | None:
        """The result that counts: a success if any, else a failure; ties by encoding."""
        if not self.results:
            return None
        ranked = sorted(self.results, key=lambda r: (r[0].status != "succeeded", encode(r[1])))
        return ranked[0][0]


@dataclass(frozen=True)
class StepView:
    index: int
    name: str
    state: StepState
    task_id: str | None  # the latest attempt's task
    attempts: int
    reason: str
    result: TaskResult | None


class FlowMachine:
    def __init__(self, flow: FlowRecord, me: str) -> None:
        self.flow = flow
        self.flow_id = flow_id_of(flow)
        self.me = me
        self.phase = FlowPhase.PENDING
        self.reason = ""
        self.started = False  # Start taken (by the starter) or a step seen
        self.attempts: list[dict[str, Attempt]] = [{} for _ in flow.steps]
        self.asked: set[tuple[int, int]] = set()  # (step, attempt) offers we asked for
        self.ended: str | None = None  # the status FlowEnded was last emitted for
        self.records: list[bytes] = []  # every counted record, in order (persistence)

    @property
    def is_starter(self) -> bool:
        return self.me == self.flow.starter

    # --- the one entry point ---------------------------------------------------------

    def handle(self, event: FlowEvent) -> list[FlowCommand]:
        kind = type(event)
        if kind not in ACCEPTS[self.phase]:
            if kind in (Start, Resume):
                raise FlowProtocolError(f"flow {self.flow_id[:12]} is {self.phase.value}")
            return [Refused(kind.__name__, f"flow is {self.phase.value}")]
        try:
            out = HANDLERS[kind](self, event)
        except RemoteProtocolError as exc:
            return [Refused(kind.__name__, str(exc))]
        return out + self._advance()

    # --- handlers --------------------------------------------------------------------

    def _on_start(self, event: Start) -> list[FlowCommand]:
        if not self.is_starter:
            raise FlowProtocolError("only the flow's starter starts it")
        self.started = True
        return []

    def _on_resume(self, event: Resume) -> list[FlowCommand]:
        if not self.is_starter:
            raise FlowProtocolError("only the flow's starter resumes it")
        failed = next(v for v in self.steps() if v.state is StepState.FAILED)
        attempt = len(self.attempts[failed.index])
        if attempt >= MAX_ATTEMPTS:
            raise FlowProtocolError(f"step {failed.name} was tried {MAX_ATTEMPTS} times")
        self.ended = None
        self.asked.add((failed.index, attempt))
        return [
            OfferStep(
                failed.index, self.flow.steps[failed.index], self._model_for(failed.index), attempt
            )
        ]

    def _on_offer(self, event: StepOffered) -> list[FlowCommand]:
        offer = _open(event.envelope, TaskOffer)
        if event.envelope.signer != self.flow.starter:
            raise RemoteProtocolError("a step offer not signed by the flow's starter")
        problem = offer_problem(offer)
        if problem is not None:
            raise RemoteProtocolError(f"step offer: {problem}")
        if offer.flow is None or flow_id_of(offer.flow) != self.flow_id:
            raise RemoteProtocolError("an offer of another flow")
        known = self.attempts[offer.step]
        if offer.task_id in known:
            return []
        if len(known) >= MAX_ATTEMPTS:
            raise RemoteProtocolError(f"step {offer.step} already has {MAX_ATTEMPTS} tasks")
        known[offer.task_id] = Attempt(offer, event.envelope)
        self.started = True
        self.records.append(encode(event.envelope))
        return []

    def _on_roster(self, event: StepRoster) -> list[FlowCommand]:
        roster = _open(event.envelope, Roster)
        attempt = self._attempt(roster.task_id)
        if event.envelope.signer != roster.coordinator:
            raise RemoteProtocolError("a roster not signed by its coordinator")
        if len(attempt.rosters) >= MAX_ROSTERS:
            raise RemoteProtocolError(f"task {roster.task_id[:12]} has {MAX_ROSTERS} rosters")
        from p2pfl.core.node_core import _roster_carried

        carried, _samples = _roster_carried(roster.task_id, roster.volunteers, roster.nonces)
        offer = attempt.offer
        problem = roster_problem(
            roster.task_id,
            roster.coordinator,
            roster.epoch,
            roster.participants,
            carried,
            (),
            offer.min_nodes,
            offer.max_nodes,
        )
        if problem is not None:
            raise RemoteProtocolError(f"roster of {roster.task_id[:12]}: {problem}")
        if set(roster.participants) <= attempt.participants:
            return []
        attempt.participants |= set(roster.participants)
        attempt.rosters.append(event.envelope)
        self.records.append(encode(event.envelope))
        held, attempt.held = attempt.held, []
        out: list[FlowCommand] = []
        for waiting in held:
            try:
                out += self._on_result(waiting)
            except RemoteProtocolError as exc:
                out.append(Refused("StepResult", str(exc)))
        return out

    def _on_result(self, event: StepResult) -> list[FlowCommand]:
        result = _open(event.envelope, TaskResult)
        attempt = self._attempt(result.task_id)
        signer = event.envelope.signer
        if signer != result.reducer:
            raise RemoteProtocolError("a result not signed by its reducer")
        if attempt.participants:
            if signer not in attempt.participants:
                raise RemoteProtocolError(f"a result from {signer[-8:]}, not a participant")
        elif not (result.status == "failed" and signer == attempt.offer.publisher):
            # Before any roster only the publisher may fail a task; anything else waits
            # (bounded) for a roster that makes its signer a participant.
            if len(attempt.held) >= MAX_RESULTS:
                raise RemoteProtocolError("a result before any roster")
            attempt.held.append(event)
            return []
        if any(encode(env) == encode(event.envelope) for _, env in attempt.results):
            return []
        if len(attempt.results) >= MAX_RESULTS:
            raise RemoteProtocolError(f"task {result.task_id[:12]} has {MAX_RESULTS} results")
        attempt.results.append((result, event.envelope))
        self.records.append(encode(event.envelope))
        return []

    # --- derivation ------------------------------------------------------------------

    def _attempt(self, task_id: str) -> Attempt:
        for known in self.attempts:
            if task_id in known:
                return known[task_id]
        raise RemoteProtocolError(f"task {task_id[:12]} is not a step of this flow")

    def latest(self, index: int) -> Attempt | None:
        """The step's most recent task (by offer time, then id): a resume supersedes."""
        known = self.attempts[index]
        if not known:
            return None
        return max(known.values(), key=lambda a: (a.offer.created, a.task_id))

    def _model_for(self, index: int) -> BlobRef | None:
        name = self.flow.steps[index].model
        if not name:
            return None
        source = self.latest(self.flow.step_index(name))
        result = source.outcome() if source else None
        return result.model if result is not None else None

    def steps(self) -> list[StepView]:
        """Each step's state, folded in order: a step counts only once the one before it
        succeeded (and, if it is handed a model, the model is that step's result's)."""
        out: list[StepView] = []
        blocked = False
        for i, step in enumerate(self.flow.steps):
            latest = self.latest(i)
            result = latest.outcome() if latest else None
            if blocked or latest is None:
                state, reason = StepState.PENDING, ""
            elif step.model and latest.offer.model != self._model_for(i):
                state, reason = StepState.PENDING, "offered with a model that is not its step's"
            elif result is None:
                state, reason = StepState.RUNNING, ""
            elif result.status == "succeeded":
                state, reason = StepState.SUCCEEDED, ""
            else:
                state, reason = StepState.FAILED, result.reason
            out.append(
                StepView(
                    i,
                    step.name,
                    state,
                    latest.task_id if latest else None,
                    len(self.attempts[i]),
                    reason,
                    result if state in (StepState.SUCCEEDED, StepState.FAILED) else None,
                )
            )
            blocked = blocked or state is not StepState.SUCCEEDED
        return out

    def derive(self) -> tuple[FlowPhase, str]:
        views = self.steps()
        for view in views:
            if view.state is StepState.FAILED:
                return FlowPhase.FAILED, f"step {view.name} failed: {view.reason}"
            if view.state is StepState.RUNNING:
                return FlowPhase.RUNNING, ""
            if view.state is StepState.PENDING:
                started = self.started or any(self.attempts)
                return (FlowPhase.RUNNING if started and view.index else FlowPhase.PENDING), ""
        return FlowPhase.SUCCEEDED, ""

    def _advance(self) -> list[FlowCommand]:
        """Re-derive; the starter offers the next step that is due; report an end once."""
        self.phase, self.reason = self.derive()
        out: list[FlowCommand] = []
        if self.phase in (FlowPhase.FAILED, FlowPhase.SUCCEEDED):
            status = self.phase.value
            if self.ended != status:
                self.ended = status
                out.append(FlowEnded(status, self.reason))
            return out
        self.ended = None  # running (again, after a resume): the next end is reported
        if not self.is_starter or not self.started:
            return out
        for view in self.steps():
            if view.state is StepState.PENDING and view.attempts == 0:
                key = (view.index, 0)
                if key not in self.asked:
                    self.asked.add(key)
                    out.append(
                        OfferStep(
                            view.index, self.flow.steps[view.index], self._model_for(view.index), 0
                        )
                    )
                break
            if view.state is not StepState.SUCCEEDED:
                break
        return out

    # --- persistence -----------------------------------------------------------------

    @classmethod
    def replay(cls, flow: FlowRecord, me: str, records: list[bytes], started: bool) -> FlowMachine:
        """A machine rebuilt from the records an earlier run counted (each re-verified)."""
        machine = cls(flow, me)
        for raw in records:
            envelope = decode(raw, expected=Signed)
            kind = envelope.kind
            event: FlowEvent
            if kind.endswith("task.offer"):
                event = StepOffered(envelope)
            elif kind.endswith("task.roster"):
                event = StepRoster(envelope)
            else:
                event = StepResult(envelope)
            machine.handle(event)
        # Only what was offered counts as asked: a step due when the node went down is
        # offered by the next `_advance` (the caller's).
        machine.started = machine.started or started
        machine.asked = {
            (i, n) for i, known in enumerate(machine.attempts) for n in range(len(known))
        }
        machine.ended = (
            machine.phase.value
            if machine.phase in (FlowPhase.FAILED, FlowPhase.SUCCEEDED)
            else None
        )
        return machine


def _open(envelope: Signed, expected: type) -> Any:
    """The record inside a signed envelope (signature checked); RemoteProtocolError else."""
    if not isinstance(envelope, Signed):
        raise RemoteProtocolError("not a signed record")
    return unseal(envelope, expected=expected)


ACCEPTS: dict[FlowPhase, frozenset[type]] = {
    FlowPhase.PENDING: frozenset({Start, StepOffered, StepRoster, StepResult}),
    FlowPhase.RUNNING: frozenset({StepOffered, StepRoster, StepResult}),
    FlowPhase.FAILED: frozenset({Resume, StepOffered, StepRoster, StepResult}),
    # Late rosters and results of finished steps are harmless; no new step is taken.
    FlowPhase.SUCCEEDED: frozenset({StepRoster, StepResult}),
}
HANDLERS: dict[type, Any] = {
    Start: FlowMachine._on_start,
    Resume: FlowMachine._on_resume,
    StepOffered: FlowMachine._on_offer,
    StepRoster: FlowMachine._on_roster,
    StepResult: FlowMachine._on_result,
}
