"""The parent <-> worker protocol: length-prefixed msgpack frames over the worker's pipes.

A frame is a 4-byte big-endian length and one msgpack map. No pickle: every dataclass is
encoded field by field here, bytes stay bytes. The conversation::

    parent -> {"op": "open", "spec": {...}, "workdir": str, "state": {...}, "sandbox": bool}
    worker -> {"ok": true, "sandbox": {...}}            | an error reply, then it exits
    parent -> {"op": "job", "job": {"type": "Train", ...}}
    worker -> {"ok": true, "result": ..., "logs": [...], "state": {...} | nil}
            | {"ok": false, "reason": str, "kind": str, "logs": [...], "state": {...} | nil}
    ...     (EOF on the worker's stdin: it exits)

`state` in a reply is ctx.state if the job changed it, else nil: the parent persists it,
so the worker never needs write access to the node's state file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack

from p2pfl.runtime.jobs import (
    Evaluate,
    Finalize,
    InitialWeights,
    Job,
    Limits,
    Plan,
    Reduce,
    RunBatch,
    TaskSpec,
    Train,
    TrainResult,
    Transform,
    TransformResult,
    Validate,
)
from p2pfl.taskpack.sdk import DPConfig, Partial

LENGTH = struct.Struct(">I")
MAX_FRAME = 2**31  # weights of a large model fit; the length prefix is 4 bytes anyway


class ProtocolError(Exception):
    """A frame that does not follow this protocol."""


def pack(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) >= MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes is too large")
    return LENGTH.pack(len(body)) + body


def unpack(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"undecodable frame: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a map")
    return obj


# --- TaskSpec ----------------------------------------------------------------------


def encode_spec(spec: TaskSpec) -> dict[str, Any]:
    dp = spec.dp
    return {
        "task_id": spec.task_id,
        "node": spec.node,
        "taskpack_dir": str(spec.taskpack_dir),
        "params": spec.params,
        "inputs": {k: str(v) for k, v in spec.inputs.items()},
        "seed": str(spec.seed),  # a decimal string: seeds may exceed msgpack's 64 bits
        "rounds": spec.rounds,
        "protocol": spec.protocol,
        "mu": float(spec.mu),
        "dp": None
        if dp is None
        else {"epsilon": dp.epsilon, "delta": dp.delta, "max_grad_norm": dp.max_grad_norm},
        "limits": {
            "timeout_s": spec.limits.timeout_s,
            "memory_bytes": spec.limits.memory_bytes,
            "cpu_seconds": spec.limits.cpu_seconds,
            "nproc": spec.limits.nproc,
        },
    }


def decode_spec(d: dict[str, Any]) -> TaskSpec:
    """The worker's copy of the spec (state_path stays with the parent)."""
    try:
        dp = d["dp"]
        return TaskSpec(
            task_id=d["task_id"],
            node=d["node"],
            taskpack_dir=Path(d["taskpack_dir"]),
            params=d["params"],
            inputs={k: Path(v) for k, v in d["inputs"].items()},
            seed=int(d["seed"]),
            rounds=d["rounds"],
            protocol=d["protocol"],
            mu=d["mu"],
            dp=None if dp is None else DPConfig(**dp),
            state_path=None,
            limits=Limits(**d["limits"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ProtocolError(f"bad spec: {type(e).__name__}: {e}") from None


# --- jobs --------------------------------------------------------------------------


def encode_partial(p: Partial) -> dict[str, Any]:
    return {
        "node": p.node,
        "num_samples": p.num_samples,
        "metrics": p.metrics,
        "aggregates": p.aggregates,
    }


def decode_partial(d: dict[str, Any]) -> Partial:
    return Partial(
        node=d["node"],
        num_samples=d["num_samples"],
        metrics=d["metrics"],
        aggregates=d["aggregates"],
    )


def encode_job(job: Job) -> dict[str, Any]:
    match job:
        case Validate() | InitialWeights() | Plan():
            return {"type": type(job).__name__}
        case RunBatch():
            return {
                "type": "RunBatch",
                "index": job.index,
                "total": job.total,
                "keys": list(job.keys),
                "weights": job.weights,
            }
        case (
            Train(round=rnd, weights=w)
            | Evaluate(round=rnd, weights=w)
            | Transform(round=rnd, weights=w)
        ):
            return {"type": type(job).__name__, "round": rnd, "weights": w}
        case Finalize():
            return {
                "type": "Finalize",
                "num_samples": job.num_samples,
                "metrics": job.metrics,
                "aggregates": job.aggregates,
            }
        case Reduce():
            return {"type": "Reduce", "partials": [encode_partial(p) for p in job.partials]}
    raise TypeError(f"not a job: {job!r}")


def decode_job(d: dict[str, Any]) -> Job:
    try:
        kind = d["type"]
        if kind == "Validate":
            return Validate()
        if kind == "InitialWeights":
            return InitialWeights()
        if kind == "Train":
            return Train(round=d["round"], weights=d["weights"])
        if kind == "Evaluate":
            return Evaluate(round=d["round"], weights=d["weights"])
        if kind == "Transform":
            return Transform(round=d["round"], weights=d["weights"])
        if kind == "Finalize":
            return Finalize(d["num_samples"], d["metrics"], d["aggregates"])
        if kind == "Reduce":
            return Reduce([decode_partial(p) for p in d["partials"]])
        if kind == "Plan":
            return Plan()
        if kind == "RunBatch":
            return RunBatch(d["index"], d["total"], list(d["keys"]), d["weights"])
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"bad job: {type(e).__name__}: {e}") from None
    raise ProtocolError(f"unknown job type {kind!r}")


# --- results -----------------------------------------------------------------------


def encode_result(job: Job, result: Any) -> Any:
    if isinstance(job, Train):
        return {
            "update": result.update,
            "num_samples": result.num_samples,
            "metrics": result.metrics,
            "aggregates": result.aggregates,
        }
    if isinstance(job, Finalize):
        return encode_partial(result)
    if isinstance(job, Transform):
        return {"table": result.table, "records": result.records, "columns": result.columns}
    return result  # None, bytes or a plain dict


def decode_result(job: Job, r: Any) -> Any:
    """The result of `job` from a worker reply, type-checked (ProtocolError if wrong)."""
    try:
        if isinstance(job, Validate):
            if r is not None:
                raise TypeError("Validate returns nil")
            return None
        if isinstance(job, InitialWeights):
            if r is not None and not isinstance(r, bytes):
                raise TypeError("InitialWeights returns bytes or nil")
            return r
        if isinstance(job, Train):
            if not (r["update"] is None or isinstance(r["update"], bytes)):
                raise TypeError("update must be bytes or nil")
            if not isinstance(r["num_samples"], int):
                raise TypeError("num_samples must be an int")
            return TrainResult(r["update"], r["num_samples"], r["metrics"], r["aggregates"])
        if isinstance(job, Finalize):
            return decode_partial(r)
        if isinstance(job, Plan):
            return check_plan(r)
        if isinstance(job, RunBatch):
            return check_batch(r)
        if isinstance(job, Transform):
            if not isinstance(r["table"], bytes) or type(r["records"]) is not int:
                raise TypeError("Transform returns table bytes and an int record count")
            if not isinstance(r["columns"], list) or not all(
                isinstance(c, str) for c in r["columns"]
            ):
                raise TypeError("Transform returns a list of column names")
            return TransformResult(r["table"], r["records"], r["columns"])
        if not isinstance(r, dict):
            raise TypeError(f"{type(job).__name__} returns a map")
        return r
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"bad {type(job).__name__} result: {e}") from None


MAX_PLAN_RECORDS = 5_000_000  # records one node may list for one task
MAX_KEY = 512  # characters of a record key (p2pfl.taskpack.batch.MAX_KEY_CHARS)
MAX_DIGEST = 128
MAX_CELL = 1024  # characters of one value in a batch's row


def check_plan(r: Any) -> list[tuple[str, str]] | None:
    """A Plan result: None, or [(key, digest)] with string keys and digests, bounded (the
    task's code made it: its size must not become the node's problem)."""
    if r is None:
        return None
    if isinstance(r, list) and len(r) > MAX_PLAN_RECORDS:
        raise TypeError(f"Plan lists {len(r)} records (at most {MAX_PLAN_RECORDS})")
    if not isinstance(r, list) or not all(
        isinstance(x, list | tuple)
        and len(x) == 2
        and isinstance(x[0], str)
        and isinstance(x[1], str)
        for x in r
    ):
        raise TypeError("Plan returns nil or a list of [key, digest] strings")
    if any(len(k) > MAX_KEY or len(d) > MAX_DIGEST for k, d in r):
        raise TypeError(f"a record key is over {MAX_KEY} or a digest over {MAX_DIGEST} chars")
    if len({k for k, _ in r}) != len(r):
        raise TypeError("Plan lists a record key twice")
    return [(str(k), str(d)) for k, d in r]


def check_batch(r: Any) -> dict[str, Any]:
    """A RunBatch result: {"rows": [dict with a str "key"], "failed": [[key, reason]]}."""
    if not isinstance(r, dict) or not isinstance(r.get("rows"), list):
        raise TypeError("RunBatch returns a map with a list of rows")
    failed = r.get("failed", [])
    if not isinstance(failed, list) or not all(
        isinstance(f, list | tuple) and len(f) == 2 and all(isinstance(x, str) for x in f)
        for f in failed
    ):
        raise TypeError("RunBatch failed must be a list of [key, reason]")
    if len(r["rows"]) + len(failed) > 1_000_000:
        raise TypeError("RunBatch returned more rows than a batch can hold")
    for row in r["rows"]:
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise TypeError("every RunBatch row is a map with a str key")
        if len(row) > 64 or any(
            not isinstance(v, str | int | float | bool)
            or (isinstance(v, str) and len(v) > MAX_CELL)
            for v in row.values()
        ):
            raise TypeError(f"a RunBatch row holds at most 64 plain values of {MAX_CELL} chars")
    return {"rows": r["rows"], "failed": [(str(k), str(why)) for k, why in failed]}
