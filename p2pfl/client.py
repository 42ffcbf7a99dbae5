"""`Client`: the Python API of a running node, over its control socket.

Synchronous on purpose (plain sockets, no trio), so that scripts, notebooks and the CLI can
use it without an event loop::

    from p2pfl import Client
    c = Client("~/.p2pfl")
    task_id = c.create_task("./taskpacks/wages", params={"rounds": "3"})
    result = c.wait(task_id, timeout=600)

Each call opens its own connection, so one Client may be shared between threads.
"""

from __future__ import annotations

import json as _json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from p2pfl import errors
from p2pfl.config import CONTROL_SOCKET
from p2pfl.control.framing import (
    BLOB_CHUNK,
    HEADER,
    decode_body,
    encode_frame,
    frame_length,
    unix_address,
)
from p2pfl.errors import NodeNotRunning, P2PFLError, TaskFailed, ValidationError

DATA_DIR_ENV = "P2PFL_DATA_DIR"
# How long a plain request may take before the node counts as not answering. Publishing packs
# and hashes a directory, so it gets longer.
DEFAULT_TIMEOUT = 60.0
SLOW_TIMEOUT = 600.0
CONNECT_TIMEOUT = 5.0


def default_data_dir() -> Path:
    """$P2PFL_DATA_DIR, or ~/.p2pfl."""
    return Path(os.environ.get(DATA_DIR_ENV) or "~/.p2pfl").expanduser()


class ControlError(P2PFLError):
    """The node refused a request; `kind` is the class name of the error on the node."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


class NotFound(ControlError, KeyError):
    """The node does not know the task, taskpack or blob asked for."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


# Error kinds re-raised as themselves; any other kind becomes a ControlError.
_KINDS: dict[str, type[Exception]] = {
    "TaskFailed": errors.TaskFailed,
    "TaskNotFinished": errors.TaskNotFinished,
    "LocalProtocolError": errors.LocalProtocolError,
    "RemoteProtocolError": errors.RemoteProtocolError,
    "NodeNotRunning": errors.NodeNotRunning,
    "ValueError": ValueError,
    "FileNotFoundError": FileNotFoundError,
    "NotADirectoryError": NotADirectoryError,
    "PermissionError": PermissionError,
    "TimeoutError": TimeoutError,
}


def _raise_for(reply: dict[str, Any]) -> None:
    message = str(reply.get("error", "request failed"))
    kind = str(reply.get("kind", ""))
    if kind == "KeyError":
        raise NotFound(message, kind)
    if kind in ("ValidationError", "PolicyError"):  # PolicyError: policy.yaml's problems
        problems = [str(p) for p in reply.get("problems") or [message]]
        head = message.split(":", 1)[0]
        what = head[len("invalid ") :] if head.startswith("invalid ") else "document"
        raise ValidationError(problems, what)
    cls = _KINDS.get(kind)
    if cls is not None:
        raise cls(message)
    raise ControlError(message, kind)


class _Connection:
    """One blocking connection to the control socket."""

    def __init__(self, client: Client, timeout: float | None) -> None:
        self.client = client
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CONNECT_TIMEOUT)
        path = client.socket_path
        if not path.exists():
            self.sock.close()
            raise NodeNotRunning(f"no node is running in {client.data_dir} (no control socket)")
        try:
            with unix_address(path) as addr:
                self.sock.connect(addr)
        except OSError as exc:
            self.sock.close()
            reason = exc.strerror or type(exc).__name__
            raise NodeNotRunning(
                f"the node in {client.data_dir} is not answering ({reason})"
            ) from None
        self.sock.settimeout(timeout)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.sendall(encode_frame(msg))
        except OSError as exc:
            raise self._lost(exc) from None

    def receive(self, deadline: float | None = None) -> dict[str, Any]:
        header = self._read(HEADER.size, deadline)
        return decode_body(self._read(frame_length(header), deadline), strict_keys=False)

    def _read(self, n: int, deadline: float | None) -> bytes:
        while len(self.buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(max(65536, n - len(self.buf)), 1 << 20))
            except TimeoutError:
                if deadline is not None:
                    raise
                raise NodeNotRunning(
                    f"the node in {self.client.data_dir} is not answering"
                ) from None
            except OSError as exc:
                raise self._lost(exc) from None
            if not chunk:
                raise self._lost(None)
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _lost(self, exc: OSError | None) -> NodeNotRunning:
        why = f" ({exc.strerror or type(exc).__name__})" if exc is not None else ""
        return NodeNotRunning(f"the node in {self.client.data_dir} closed the connection{why}")


class Client:
    """The API of the node running in `data_dir` (default: $P2PFL_DATA_DIR or ~/.p2pfl).

    Nothing is contacted until the first call, which raises `NodeNotRunning` when no node
    answers. Errors from the node come back as `NotFound` (a KeyError), `TaskFailed`,
    `TaskNotFinished`, `ValidationError`, ... or `ControlError` (with `.kind`).
    """

    def __init__(
        self, data_dir: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        self.socket_path = self.data_dir / CONTROL_SOCKET
        self.timeout = timeout
        self._next_id = 0

    def __repr__(self) -> str:
        return f"Client({str(self.data_dir)!r})"

    # -- plumbing --------------------------------------------------------------------------

    def _rid(self) -> int:
        self._next_id += 1
        return self._next_id

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """One request, one reply: the reply's result, or the node's error raised here."""
        rid = self._rid()
        with _Connection(self, timeout if timeout is not None else self.timeout) as conn:
            conn.send({"id": rid, "op": op, "args": args})
            while True:
                reply = conn.receive()
                if reply.get("id") == rid and "ok" in reply:
                    break
        if not reply["ok"]:
            _raise_for(reply)
        return reply.get("result")

    # -- the API ---------------------------------------------------------------------------

    def ping(self) -> bool:
        """True when the node answers (raises NodeNotRunning otherwise)."""
        return self.call("ping") == "pong"

    def info(self) -> dict[str, Any]:
        """{"peer_id", "addrs", "version", "data_dir", "datasets", "trusted"}."""
        return self.call("info")

    def peers(self) -> list[dict[str, Any]]:
        """[{"peer_id", "addrs", "capabilities"}] of the peers this node knows."""
        return self.call("peers")

    def taskpacks(self) -> list[dict[str, Any]]:
        return self.call("taskpacks")

    def tasks(self) -> list[dict[str, Any]]:
        return self.call("tasks")

    def task(self, task_id: str) -> dict[str, Any]:
        """A task summary; `task_id` may be a unique prefix. NotFound if unknown."""
        return self.call("task", task_id=task_id)

    def cancel(self, task_id: str, reason: str = "") -> dict[str, Any]:
        """End a task this node published, for every participant."""
        return self.call("cancel_task", task_id=task_id, reason=reason)

    def withdraw(self, task_id: str) -> dict[str, Any]:
        """Take this node out of a task; the others go on without it."""
        return self.call("withdraw_task", task_id=task_id)

    def publish(
        self,
        path: str | os.PathLike[str],
        run: bool = False,
        params: dict[str, Any] | None = None,
        rollout: str = "",
    ) -> dict[str, Any]:
        """Pack, sign, store and announce the taskpack directory at `path` (on this machine).

        Returns {"cid", "name", "version", "publisher"}, plus "task_id" when `run`.
        `rollout` (with `run`): run several versions of its name side by side, e.g.
        ``"1.0.0=0.8,1.1.0=0.2"`` (the other versions must be verified on the node).
        """
        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"no taskpack directory at {path}")
        if rollout and not run:
            raise ValueError("rollout only makes sense with run=True")
        return self.call(
            "publish",
            timeout=max(self.timeout, SLOW_TIMEOUT),
            path=str(p.resolve()),
            run=bool(run),
            params=_params(params),
            **({"rollout": rollout} if rollout else {}),
        )

    def create_task(
        self,
        taskpack: str | os.PathLike[str],
        params: dict[str, Any] | None = None,
        rollout: str = "",
    ) -> str:
        """Offer a task and return its id.

        `taskpack` is a directory (published first, then run), or the cid, name or
        name@range (``federated-stats@^1``) of a taskpack the node already verified, signed
        by any publisher it trusts (the offer is signed by this node, the requester).
        `rollout` runs several verified versions of that name side by side, each on its
        fraction of the participants: ``"1.0.0=0.8,1.1.0=0.2"`` (docs/taskpacks.md).
        """
        if _is_path(taskpack):
            return str(self.publish(taskpack, run=True, params=params, rollout=rollout)["task_id"])
        reply = self.call(
            "create_task",
            timeout=max(self.timeout, SLOW_TIMEOUT),
            ref=str(taskpack),
            params=_params(params),
            **({"rollout": rollout} if rollout else {}),
        )
        return str(reply["task_id"])

    def run(self, ref: str, params: dict[str, Any] | None = None, rollout: str = "") -> str:
        """Offer a task on a taskpack the node already verified, by cid, name or
        name@range (e.g. ``federated-stats@^1``), whoever published it; its id.

        The offer is signed by this node: site policies judge it as this node's request."""
        if _is_path(ref):
            raise ValueError(f"{ref} is a directory: publish it (Client.publish(..., run=True))")
        return self.create_task(ref, params, rollout)

    # -- site policy and audit -------------------------------------------------------------

    def policy_show(self) -> dict[str, Any]:
        """{"policy": the effective site policy, "ledger": epsilon spent per dataset}."""
        return self.call("policy_show")

    def policy_reload(self) -> dict[str, Any]:
        """Re-read DATA_DIR/policy.yaml. ValidationError (every problem) if it is invalid;
        the node then keeps its current policy."""
        return self.call("policy_reload")

    def policy_check(self, task_id: str) -> dict[str, Any]:
        """The node's policy decision on a task it has seen (allowed, rule, reason, terms)."""
        return self.call("policy_check", task_id=task_id)

    def audit(self, task: str | None = None) -> list[dict[str, Any]]:
        """Entries of the node's audit log (DATA_DIR/audit.jsonl), oldest first."""
        return self.call("audit", task=task)

    # -- flows (p2pfl/flow): multi-step workflows, followed as one tree --------------------

    def create_flow(
        self, path: str | os.PathLike[str], params: dict[str, Any] | None = None
    ) -> str:
        """Start the flow in the flow file at `path` (on this machine): every step's
        taskpack is published and the first step offered. `params` are STEP.KEY overrides.
        Returns the flow id (ValidationError lists every problem of a bad flow file)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"no flow file at {path}")
        reply = self.call(
            "flow_run",
            timeout=max(self.timeout, SLOW_TIMEOUT),
            path=str(p.resolve()),
            params=_params(params),
        )
        return str(reply["flow_id"])

    def flows(self) -> list[dict[str, Any]]:
        return self.call("flows")

    def flow(self, flow_id: str) -> dict[str, Any]:
        """The flow as one tree: each step's state, %, task and per-node progress."""
        return self.call("flow", flow_id=flow_id)

    def resume_flow(self, flow_id: str) -> dict[str, Any]:
        """Retry a failed flow from its failed step (finished steps are not redone)."""
        return self.call("flow_resume", flow_id=flow_id)

    def is_flow(self, ref: str) -> bool:
        """Whether `ref` (an id or a unique prefix) names a flow this node knows."""
        try:
            self.call("flow", flow_id=ref)
        except NotFound:
            return False
        except errors.RemoteProtocolError as exc:  # a node without flows
            if "unknown op" in str(exc):
                return False
            raise
        return True

    def flow_events(self, flow_id: str, deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """Snapshots of the flow ({"kind": "flow", "flow": status}) as it changes; ends
        once it succeeded or failed."""
        yield from self._stream("watch_flow", {"flow_id": flow_id}, deadline)

    def events(self, task_id: str, deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """The task's events, past ones first, then live ones; ends after the final event.

        `deadline` (time.monotonic()) bounds the whole stream: TimeoutError past it.
        """
        yield from self._stream("watch_task", {"task_id": task_id}, deadline)

    def _stream(
        self, op: str, args: dict[str, Any], deadline: float | None
    ) -> Iterator[dict[str, Any]]:
        rid = self._rid()
        # No per-read timeout: a round may take longer than any fixed figure.
        with _Connection(self, None) as conn:
            conn.send({"id": rid, "op": op, "args": args})
            while True:
                msg = conn.receive(deadline)
                if msg.get("id") != rid:
                    continue
                if "event" in msg:
                    yield msg["event"]
                elif "ok" in msg:
                    if not msg["ok"]:
                        _raise_for(msg)
                    return

    def trace(self, task_id: str, out: TextIO | None = None, json: bool = False) -> bool:
        """Print the task's events to `out` (default stdout) until it ends.

        One line per event, or one JSON object per line with `json=True`.
        Returns True when the task succeeded.
        """
        out = out if out is not None else sys.stdout
        last: dict[str, Any] | None = None
        if self.is_flow(task_id):
            from p2pfl.flow.render import flow_tree_text

            for event in self.flow_events(task_id):
                last = event
                out.write((_json.dumps(event) if json else flow_tree_text(event["flow"])) + "\n")
                out.flush()
            return last is not None and last["flow"]["status"] == "succeeded"
        for event in self.events(task_id):
            last = event
            out.write((_json.dumps(event) if json else format_event(event)) + "\n")
            out.flush()
        return last is not None and event_succeeded(last)

    def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the task ends; its result. TimeoutError / TaskFailed otherwise.

        `on_event` sees each event as it comes (for progress displays).
        """
        deadline = time.monotonic() + timeout if timeout is not None else None
        last: dict[str, Any] | None = None
        if self.is_flow(task_id):
            return self._wait_flow(task_id, deadline, timeout, on_event)
        try:
            for event in self.events(task_id, deadline):
                last = event
                if on_event is not None:
                    on_event(event)
        except TimeoutError:
            raise TimeoutError(f"task {task_id} did not finish within {timeout:g} s") from None
        if last is not None and event_failed(last):
            raise TaskFailed(failure_reason(last))
        # Succeeded, or the stream ended early (node stopping): the result, or TaskNotFinished.
        return self.get_result(task_id)

    def _wait_flow(
        self,
        flow_id: str,
        deadline: float | None,
        timeout: float | None,
        on_event: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        last: dict[str, Any] | None = None
        try:
            for event in self.flow_events(flow_id, deadline):
                last = event
                if on_event is not None:
                    on_event(event)
        except TimeoutError:
            raise TimeoutError(f"flow {flow_id} did not finish within {timeout:g} s") from None
        if last is not None and last["flow"]["status"] == "failed":
            raise TaskFailed(f"flow {flow_id} failed: {last['flow']['reason']}")
        return self.get_result(flow_id)

    def get_result(self, task_id: str) -> dict[str, Any]:
        """The task's (or flow's) result; TaskNotFinished while it runs, TaskFailed if it
        failed. A flow's result holds every step's signed result."""
        if self.is_flow(task_id):
            return self.call("flow_result", flow_id=task_id)
        return self.call("result", task_id=task_id)

    def load_model(self, task_id: str) -> dict[str, Any]:
        """The final model of a finished task, as {name: numpy array}, in one call (for a
        torch module: ``p2pfl.fl.torch_utils.load_numpy_into(module, weights)``).
        TaskNotFinished / TaskFailed as `get_result`; ValueError if it made no model."""
        from p2pfl.wire import decode_tensors

        result = self.get_result(task_id)
        cid = result.get("model_cid")
        if not cid:
            raise ValueError(f"task {task_id} produced no model (model_cid is empty)")
        return {k: v.copy() for k, v in decode_tensors(self.read_blob(str(cid))).items()}

    def read_blob(self, cid: str) -> bytes:
        """A blob stored on the node (e.g. a result's model_cid). NotFound if absent."""
        parts: list[bytes] = []
        offset, size = 0, None
        while size is None or offset < size:
            reply = self.call("read_blob", cid=cid, offset=offset, length=BLOB_CHUNK)
            data, size = bytes(reply["data"]), int(reply["size"])
            if not data and offset < size:
                raise ControlError(f"blob {cid} shrank while being read")
            parts.append(data)
            offset += len(data)
        return b"".join(parts)


# -- helpers shared with the CLI ---------------------------------------------------------------


def event_succeeded(event: dict[str, Any]) -> bool:
    """Whether a task's final event means success."""
    if event.get("kind") == "failed":
        return False
    task = event.get("task") or {}
    status = task.get("status")
    if status is not None:
        return status == "succeeded"
    return event.get("kind") == "result"


def event_failed(event: dict[str, Any]) -> bool:
    """Whether an event says the task failed (as opposed to succeeded or still running)."""
    task = event.get("task") or {}
    return event.get("kind") == "failed" or task.get("status") == "failed"


def failure_reason(event: dict[str, Any]) -> str:
    task = event.get("task") or {}
    reason = task.get("reason") or event.get("message") or "no reason given"
    return f"task {task.get('task_id', '?')} failed: {reason}"


def format_event(event: dict[str, Any]) -> str:
    """One readable line for an event: time, kind, peer, round, message, metrics."""
    t = event.get("t")
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "--"
    parts = [stamp, f"{event.get('kind', '?'):<6}"]
    if event.get("peer"):
        parts.append(short_id(str(event["peer"])))
    if event.get("round") is not None:
        parts.append(f"r{event['round']}")
    if event.get("message"):
        parts.append(str(event["message"]))
    metrics = event.get("metrics") or {}
    if metrics:
        parts.append(" ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    return " ".join(parts)


def short_id(peer_id: str, n: int = 6) -> str:
    """12D3KooW...ab12cd: enough of a peer id to tell peers apart on screen."""
    if len(peer_id) <= 8 + n + 3:
        return peer_id
    return f"{peer_id[:8]}…{peer_id[-n:]}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _params(params: dict[str, Any] | None) -> dict[str, str]:
    """Task parameters as strings (the wire form); non-strings in their JSON spelling."""
    out: dict[str, str] = {}
    for k, v in (params or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"parameter names are strings, got {k!r}")
        out[k] = v if isinstance(v, str) else _json.dumps(v)
    return out


def _is_path(ref: str | os.PathLike[str]) -> bool:
    if isinstance(ref, os.PathLike):
        return True
    return os.path.isdir(os.path.expanduser(ref)) or ref.startswith((".", "/", "~"))


__all__ = [
    "Client",
    "ControlError",
    "NotFound",
    "default_data_dir",
    "event_failed",
    "event_succeeded",
    "format_event",
]
