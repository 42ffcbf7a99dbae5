"""A scripted stand-in for the node's NodeAPI, and a ControlServer running it in a thread."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import trio

from p2pfl.control import ControlServer
from p2pfl.errors import TaskFailed, TaskNotFinished, ValidationError
from p2pfl.identity import peer_id_from_public_bytes
from p2pfl.policy import PolicyError

PEER_A = "12D3KooWA" + "a" * 43
PEER_B = "12D3KooWB" + "b" * 43
SELF_ID = "12D3KooWS" + "s" * 43
MODEL = b"\x00model-bytes\xff" * 1000
REAL_PEER = peer_id_from_public_bytes(b"\x07" * 32)  # a valid Ed25519 peer id (policy checks)


def summary(task_id: str, status: str, rnd: int, reason: str = "") -> dict[str, Any]:
    return {
        "task_id": task_id,
        "cid": "bafycid" + task_id,
        "name": "wages",
        "version": "1.0.0",
        "type": "training",
        "status": status,
        "reason": reason,
        "publisher": SELF_ID,
        "coordinator": PEER_A,
        "reducer": PEER_A,
        "participants": [PEER_A, PEER_B],
        "round": rnd,
        "rounds": 2,
        "nodes": {
            PEER_A: {
                "state": "training",
                "round": rnd,
                "loss": 0.5,
                "accuracy": 0.8,
                "epsilon": None,
            },
            PEER_B: {
                "state": "training",
                "round": rnd,
                "loss": 0.6,
                "accuracy": None,
                "epsilon": 1.5,
            },
        },
        "created": 1700000000.0,
    }


def event(
    kind: str,
    task: dict[str, Any],
    peer: str | None = None,
    rnd: int | None = None,
    message: str = "",
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "t": 1700000000.0 + (rnd or 0),
        "kind": kind,
        "peer": peer,
        "round": rnd,
        "message": message,
        "metrics": metrics or {},
        "task": task,
    }


def script(task_id: str, ok: bool) -> list[dict[str, Any]]:
    evs = [
        event("state", summary(task_id, "pending", 0), message="offered"),
        event("roster", summary(task_id, "running", 0), message="2 participants"),
        event("node", summary(task_id, "running", 1), PEER_A, 1, "trained", {"loss": 0.5}),
        event("round", summary(task_id, "running", 1), None, 1, "round 1 done", {"loss": 0.55}),
    ]
    if ok:
        evs.append(event("result", summary(task_id, "succeeded", 2), PEER_A, 2, "done"))
    else:
        evs.append(
            event("failed", summary(task_id, "failed", 1, "no quorum"), None, 1, "no quorum")
        )
    return evs


class FakeNodeAPI:
    """Tasks: "good1" succeeds, "bad1" fails, "slow1" never ends (for timeouts)."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict[str, Any]]] = {
            "good1": script("good1", True),
            "bad1": script("bad1", False),
            "slow1": script("slow1", True)[:3],
        }
        self.published: list[tuple[str, bool, dict[str, str]]] = []
        self.rollouts: list[str] = []  # the --rollout of each publish / create_task
        self.watchers_closed = 0

    def info(self) -> dict[str, Any]:
        return {
            "peer_id": SELF_ID,
            "addrs": ["/ip4/127.0.0.1/tcp/4001"],
            "version": "0.1.0",
            "data_dir": Path("/tmp/x"),
            "datasets": [{"name": "wages", "rows": 100, "columns": 3}],
            "trusted": frozenset({PEER_A}),
        }

    def peers(self) -> list[dict[str, Any]]:
        return [
            {
                "peer_id": PEER_A,
                "addrs": ["/ip4/127.0.0.1/tcp/4002"],
                "capabilities": {"datasets": [{"name": "wages"}], "cpus": 2},
            },
            {"peer_id": PEER_B, "addrs": ["/ip4/127.0.0.1/tcp/4003"], "capabilities": None},
        ]

    async def publish(
        self, path: str, run: bool, params: dict[str, str], rollout: str = ""
    ) -> dict[str, Any]:
        await trio.sleep(0)
        if not (Path(path) / "manifest.yaml").exists():
            raise ValidationError([f"{path}/manifest.yaml: missing"], "taskpack")
        self.published.append((path, run, params))
        self.rollouts.append(rollout)
        out = {"cid": "bafycidgood1", "name": "wages", "version": "1.0.0", "publisher": SELF_ID}
        if run:
            out["task_id"] = "good1"
        return out

    def taskpacks(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "wages",
                "version": "1.0.0",
                "cid": "bafycidgood1",
                "publisher": SELF_ID,
                "status": "verified",
                "reason": "",
            },
            {
                "name": "wages",
                "version": "1.1.0",
                "model_schema": "wages@1",
                "cid": "bafycidgood2",
                "publisher": SELF_ID,
                "status": "verified",
                "reason": "",
            },
            {
                "name": "evil",
                "version": "0.1.0",
                "cid": "bafyevil",
                "publisher": PEER_B,
                "status": "rejected",
                "reason": "publisher not trusted",
            },
        ]

    async def create_task(
        self, ref: str, params: dict[str, str], rollout: str = ""
    ) -> dict[str, Any]:
        if ref not in ("wages", "wages@1.0.0", "wages@^1", "bafycidgood1"):
            raise KeyError(ref)
        self.rollouts.append(rollout)
        return {"task_id": "good1", "cid": "bafycidgood1"}

    def _id(self, task_id: str) -> str:
        hits = [t for t in self.events if t.startswith(task_id)]
        if len(hits) != 1:
            raise KeyError(task_id)
        return hits[0]

    def tasks(self) -> list[dict[str, Any]]:
        return [evs[-1]["task"] for evs in self.events.values()]

    def task(self, task_id: str) -> dict[str, Any]:
        return self.events[self._id(task_id)][-1]["task"]

    def cancel_task(self, task_id: str, reason: str = "") -> dict[str, Any]:
        task = dict(self.task(task_id))
        task.update(status="failed", reason=f"cancelled by the publisher: {reason}")
        return task

    def withdraw_task(self, task_id: str) -> dict[str, Any]:
        return dict(self.task(task_id))

    async def watch_task(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        tid = self._id(task_id)
        try:
            for ev in self.events[tid]:
                await trio.sleep(0)
                yield copy.deepcopy(ev)
            if tid == "slow1":
                await trio.sleep_forever()
        finally:
            self.watchers_closed += 1

    def result(self, task_id: str) -> dict[str, Any]:
        tid = self._id(task_id)
        last = self.events[tid][-1]
        if last["kind"] == "failed":
            raise TaskFailed(f"task {tid} failed: no quorum")
        if last["kind"] != "result":
            raise TaskNotFinished(f"task {tid} is still running (round 1/2)")
        return {
            "task_id": tid,
            "status": "succeeded",
            "participants": [PEER_A, PEER_B],
            "rounds": 2,
            "metrics": {"loss": 0.4, "accuracy": 0.9},
            "model_cid": "bafymodel",
            "reducer": PEER_A,
            "signature_ok": True,
        }

    def read_blob(self, cid: str) -> bytes | None:
        return MODEL if cid == "bafymodel" else None

    # --- site policy and audit --------------------------------------------------------------

    policy_valid = True  # tests flip it to see a reload refused

    def policy_show(self) -> dict[str, Any]:
        from p2pfl.policy import parse_policy

        doc = {
            "requesters": {"lab-a": [REAL_PEER]},
            "datasets": {
                "wages": {
                    "allow": ["lab-a"],
                    "types": ["analysis"],
                    "k": 10,
                    "dp": {"required": True, "max_epsilon_per_task": 2.0, "budget": 10.0},
                    "limits": {"max_rounds": 50, "memory": "2Gi"},
                }
            },
        }
        policy = parse_policy(doc, own_peer=REAL_PEER, source="/tmp/x/policy.yaml")
        ledger = {"wages": {"spent": 4.0, "tasks": {"good1": 4.0}}}
        return {"policy": policy.as_dict(), "ledger": ledger}

    def policy_reload(self) -> dict[str, Any]:
        if not self.policy_valid:
            raise PolicyError(
                ["datasets.wages.k: must be >= 1", "extra: unknown field"], "/tmp/x/policy.yaml"
            )
        return {"digest": "ab" * 32, "changed": True, "source": "/tmp/x/policy.yaml"}

    def policy_check(self, task_id: str) -> dict[str, Any]:
        tid = self._id(task_id)
        if tid == "bad1":
            return {
                "task_id": tid,
                "allowed": False,
                "rule": "datasets.wages.allow",
                "reason": f"dataset wages: requester {PEER_B} is not in allow [lab-a]",
            }
        return {
            "task_id": tid,
            "allowed": True,
            "rule": "policy",
            "reason": "allowed: requester ... may run federated-stats@1.0.0 (analysis) on wages",
            "datasets": ["wages"],
            "k": 10,
            "dp_epsilon": 1.0,
            "dp_delta": 1e-5,
            "max_rounds": 50,
            "memory_bytes": 2 * 2**30,
            "extremes": False,
            "metrics": "withhold",
        }

    def audit(self, task: str | None = None) -> list[dict[str, Any]]:
        entries = [
            {"t": 1700000000.0, "kind": "policy", "action": "load", "digest": "ab" * 32},
            {
                "t": 1700000001.0,
                "kind": "offer",
                "task": "bad1",
                "requester": PEER_B,
                "decision": "declined",
                "rule": "datasets.wages.allow",
                "reason": f"dataset wages: requester {PEER_B} is not in allow [lab-a]",
            },
            {
                "t": 1700000002.0,
                "kind": "release",
                "task": "good1",
                "round": 1,
                "what": "partial",
                "bytes": 321,
                "dp_spend": 1.0,
            },
        ]
        return [e for e in entries if task is None or e.get("task") == task]


@contextlib.contextmanager
def running_server(data_dir: Path, api: Any | None = None) -> Iterator[FakeNodeAPI]:
    """A ControlServer for `api` (default FakeNodeAPI) in a background trio thread."""
    api = api or FakeNodeAPI()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        with trio.CancelScope() as scope:
            state["scope"], state["token"] = scope, trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(ControlServer(data_dir / "control.sock", api).serve)
                started.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # surface startup failures to the test
            state["error"] = exc
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    if "error" in state:
        raise state["error"]
    try:
        yield api
    finally:
        trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
        thread.join(30)
