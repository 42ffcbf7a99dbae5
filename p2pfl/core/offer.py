"""A task offer: built in one place, its id derived from its contents, checked by all.

`task_id = sha256("p2pfl/task-id/v2|" + canonical offer bytes with a zero id)[:32 hex]`:
it covers the taskpack cid, the parameters, the publisher and a fresh nonce (and every
other setting; for a flow's step also the flow record, the step index and the model ref),
so a receiver re-derives it and an offer cannot choose its own id.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from p2pfl.core.aggregation import aggregation_problem
from p2pfl.core.call import CALL_MODE_OVER, uses_call
from p2pfl.core.flowrec import FlowRecord, flow_offer_problem
from p2pfl.core.messages import NONCE_BYTES, TASK_ID_HEX, TaskOffer
from p2pfl.core.versions import Arm, arms_problem
from p2pfl.errors import RemoteProtocolError
from p2pfl.limits import MAX_RESULT_BYTES
from p2pfl.runtime.batching import run_options_problem
from p2pfl.store.blobref import BlobRef, validate_ref
from p2pfl.wire import encode

PROTOCOLS = ("fedavg", "fedprox", "gossip")
AGGREGATORS = ("fedavg", "median", "trimmed_mean", "krum")
MAX_ROUNDS = 100_000
MAX_NODES = 100_000
MAX_WINDOW_S = 7 * 24 * 3600.0  # longest volunteer window or round deadline accepted
_ZERO_ID = "0" * TASK_ID_HEX


def derive_task_id(offer: TaskOffer) -> str:
    body = encode(replace(offer, task_id=_ZERO_ID))
    return hashlib.sha256(b"p2pfl/task-id/v2|" + body).hexdigest()[:TASK_ID_HEX]


def offer_problem(offer: TaskOffer) -> str | None:
    """Why an offer is not acceptable from anyone, or None (checked on receipt)."""
    if derive_task_id(offer) != offer.task_id:
        return "task_id is not derived from the offer's contents"
    if not 1 <= offer.min_nodes <= offer.max_nodes <= MAX_NODES:
        return f"node counts min {offer.min_nodes} max {offer.max_nodes} are inconsistent"
    if offer.flow is not None and uses_call(offer.max_nodes):
        return f"a flow step asks for at most {CALL_MODE_OVER} nodes (max_nodes {offer.max_nodes})"
    if not 1 <= offer.rounds <= MAX_ROUNDS:
        return f"rounds {offer.rounds} outside [1, {MAX_ROUNDS}]"
    if offer.protocol not in PROTOCOLS:
        return f"unknown protocol {offer.protocol!r}"
    if offer.aggregator not in AGGREGATORS:
        return f"unknown aggregator {offer.aggregator!r}"
    if offer.fanout < 1 or offer.mu < 0 or offer.max_update_norm < 0:
        return "fanout must be >= 1, mu and max_update_norm >= 0"
    if not 0 < offer.volunteer_deadline - offer.created <= MAX_WINDOW_S:
        return "volunteer deadline is not after the offer's creation (or too far)"
    if not 0 < offer.round_timeout_s <= MAX_WINDOW_S:
        return f"round timeout {offer.round_timeout_s} s is not in (0, {MAX_WINDOW_S:g}]"
    if not offer.inputs or len(offer.inputs) > 64:
        return "an offer binds 1 to 64 input datasets"
    run_problem = run_options_problem(offer.run)
    if run_problem is not None:
        return run_problem
    problem = aggregation_problem(offer.params)
    if problem is not None:
        return problem
    dp = offer.dp
    if dp is not None:
        if not isinstance(dp, dict) or set(dp) != {"epsilon", "delta", "max_grad_norm"}:
            return "dp must be {epsilon, delta, max_grad_norm}"
        if not all(isinstance(v, int | float) and v > 0 for v in dp.values()):
            return "dp values must be positive numbers"
    problem = arms_problem(offer)
    if problem is not None:
        return problem
    if offer.model is not None:
        try:
            validate_ref(offer.model)
        except RemoteProtocolError as exc:
            return f"model: {exc}"
        if offer.model.size > MAX_RESULT_BYTES:
            return f"model of {offer.model.size} bytes, over {MAX_RESULT_BYTES}"
    return flow_offer_problem(offer)


def build_offer(
    *,
    cid: str,
    name: str,
    version: str,
    type: str,
    publisher: str,
    params: dict[str, Any],
    federated: dict[str, Any],
    inputs: tuple[str, ...],
    now: float,
    nonce: bytes,
    volunteer_window_s: float,
    range: str = "",
    rollout: tuple[Arm, ...] = (),
    flow: FlowRecord | None = None,
    step: int = 0,
    model: BlobRef | None = None,
    run: dict[str, Any] | None = None,
) -> TaskOffer:
    """The offer for a verified taskpack. `federated` is the manifest's federated section
    with the task's parameters applied (taskpack.params.effective_federated): the one set
    of defaults is the manifest schema's."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    dp = federated.get("differential_privacy") or {}
    offer = TaskOffer(
        task_id=_ZERO_ID,
        cid=cid,
        name=name,
        version=version,
        type=type,
        publisher=publisher,
        params=params,
        protocol=str(federated["protocol"]),
        aggregator=str(federated["aggregator"]),
        rounds=int(federated["rounds"]) if type == "training" else 1,
        min_nodes=int(federated["min_nodes"]),
        max_nodes=int(federated["max_nodes"]),
        fanout=int(federated["fanout"]),
        mu=float(federated["mu"]),
        dp=(
            {
                "epsilon": float(dp["epsilon"]),
                "delta": float(dp["delta"]),
                "max_grad_norm": float(dp["max_grad_norm"]),
            }
            if dp.get("enabled")
            else None
        ),
        inputs=inputs,
        created=now,
        volunteer_deadline=now + volunteer_window_s,
        round_timeout_s=float(federated["deadline_s"]),
        nonce=nonce,
        max_update_norm=float(params.get("max_update_norm", 0.0) or 0.0),
        range=range,
        rollout=[arm.wire() for arm in rollout] if rollout else None,
        flow=flow,
        step=step,
        model=model,
        run=run or None,
    )
    problem = run_options_problem(offer.run)
    if problem is not None:
        raise ValueError(problem)
    return replace(offer, task_id=derive_task_id(offer))
