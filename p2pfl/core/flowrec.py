"""A flow as it travels inside every step's task offer: a small, signed-along record.

A flow is a list of steps (taskpack cid, inputs, output, model hand-off, parameters) that a
starter created once. Each step's `TaskOffer` carries the whole `FlowRecord` and the step's
index, so any node that sees any step knows the flow, and the offer's signature and task id
cover it. The flow id is derived from the record's encoding, never chosen nor taken from a
peer's string:

    flow_id = sha256("p2pfl/flow-id/v1|" + encode(FlowRecord))[:32 hex]

Every field is checked at decode time (names against fixed charsets, counts bounded), and
`flow_offer_problem` checks an offer against its flow by a rule every node evaluates alike:
the publisher is the flow's starter, the cid and inputs are the step's, a model is handed
over exactly when the step names one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from p2pfl.store.blobref import BlobRef
from p2pfl.wire import Json, encode, message, record

FLOW_ID_HEX = 32
MAX_FLOW_STEPS = 16
MAX_FLOW_DATASETS = 16
MAX_STEP_INPUTS = 8
# A flow or step name: letters, digits, - _ ., up to 64 characters.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A dataset name (a site's or a derived one): what sites pass to --dataset NAME=PATH.
DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DERIVED_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")  # as p2pfl.data.derived.NAME_RE
_FLOW_ID = re.compile(f"[0-9a-f]{{{FLOW_ID_HEX}}}")
_CID = re.compile(r"b[a-z2-7]{20,120}")


def check_flow_id(value: object) -> str:
    if type(value) is not str or not _FLOW_ID.fullmatch(value):
        raise ValueError(f"flow id must be {FLOW_ID_HEX} lowercase hex digits")
    return value


@record
@dataclass(frozen=True, slots=True)
class FlowStep:
    name: str
    cid: str  # the step's taskpack archive
    inputs: tuple[str, ...]  # dataset names (a site's, or an earlier step's output)
    output: str = ""  # the derived dataset this (preprocessing) step writes on each node
    model: str = ""  # the name of an earlier step whose result model this step evaluates
    params: Json = None  # {KEY: VALUE} overrides of the taskpack's parameters (strings)

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise ValueError(f"step name {self.name[:80]!r} is not a valid name")
        if not _CID.fullmatch(self.cid):
            raise ValueError(f"step {self.name}: cid is not a CIDv1")
        if not 1 <= len(self.inputs) <= MAX_STEP_INPUTS:
            raise ValueError(f"step {self.name}: 1 to {MAX_STEP_INPUTS} inputs")
        for name in self.inputs:
            if not DATASET_RE.fullmatch(name):
                raise ValueError(f"step {self.name}: input {name[:80]!r} is not a dataset name")
        if self.output and not DERIVED_RE.fullmatch(self.output):
            raise ValueError(f"step {self.name}: output {self.output[:80]!r} is not a valid name")
        if self.model and not NAME_RE.fullmatch(self.model):
            raise ValueError(f"step {self.name}: model {self.model[:80]!r} is not a step name")
        if self.params is not None and not (
            isinstance(self.params, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.params.items())
        ):
            raise ValueError(f"step {self.name}: params must map strings to strings")


@message("flow.record")
@dataclass(frozen=True, slots=True)
class FlowRecord:
    name: str
    starter: str  # the peer that created the flow: the one that offers its steps
    created: float
    nonce: bytes  # 16 fresh bytes: two runs of one flow file are two flows
    datasets: tuple[str, ...]
    steps: tuple[FlowStep, ...]

    def __post_init__(self) -> None:
        from p2pfl.core.messages import NONCE_BYTES, check_peer_id

        if not NAME_RE.fullmatch(self.name):
            raise ValueError(f"flow name {self.name[:80]!r} is not a valid name")
        check_peer_id(self.starter, "starter")
        if len(self.nonce) != NONCE_BYTES:
            raise ValueError(f"flow nonce must be {NONCE_BYTES} bytes")
        if len(self.datasets) > MAX_FLOW_DATASETS:
            raise ValueError(f"a flow names at most {MAX_FLOW_DATASETS} datasets")
        for name in self.datasets:
            if not DATASET_RE.fullmatch(name):
                raise ValueError(f"flow dataset {name[:80]!r} is not a dataset name")
        if not 1 <= len(self.steps) <= MAX_FLOW_STEPS:
            raise ValueError(f"a flow has 1 to {MAX_FLOW_STEPS} steps")
        problem = steps_problem(self.steps)
        if problem:
            raise ValueError(problem)

    def step_index(self, name: str) -> int:
        for i, step in enumerate(self.steps):
            if step.name == name:
                return i
        raise KeyError(name)


def steps_problem(steps: tuple[FlowStep, ...] | list[FlowStep]) -> str | None:
    """Names unique; a step reads only site datasets or outputs of earlier steps (checked
    by the flow file loader, which knows the site datasets); `model` names an earlier step."""
    seen: set[str] = set()
    outputs: set[str] = set()
    for i, step in enumerate(steps):
        if step.name in seen:
            return f"steps[{i}].name: {step.name!r} is used twice"
        if step.model and step.model not in seen:
            return f"steps[{i}].model: {step.model!r} is not an earlier step"
        if step.output and step.output in outputs:
            return f"steps[{i}].output: {step.output!r} is written twice"
        seen.add(step.name)
        if step.output:
            outputs.add(step.output)
    return None


def flow_id_of(flow: FlowRecord) -> str:
    return hashlib.sha256(b"p2pfl/flow-id/v1|" + encode(flow)).hexdigest()[:FLOW_ID_HEX]


def flow_offer_problem(offer: Any) -> str | None:
    """Why a step's offer does not fit its flow (None: it fits, or it is no flow step)."""
    flow: FlowRecord | None = offer.flow
    model: BlobRef | None = offer.model
    if flow is None:
        if offer.step != 0:
            return "a step index without a flow"
        return None
    if not 0 <= offer.step < len(flow.steps):
        return f"step {offer.step} outside the flow's {len(flow.steps)} steps"
    step = flow.steps[offer.step]
    if offer.publisher != flow.starter:
        return "only the flow's starter offers its steps"
    if offer.cid != step.cid:
        return f"step {step.name}: the offer's taskpack is not the step's"
    if tuple(offer.inputs) != tuple(step.inputs):
        return f"step {step.name}: the offer's inputs are not the step's"
    if bool(step.model) != (model is not None):
        return f"step {step.name}: a model is handed over exactly when the step names one"
    return None
