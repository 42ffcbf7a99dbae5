"""The worker process: `python -m p2pfl.runtime.worker`, one per (task_id, node).

A thin loop around p2pfl.runtime.loader. The protocol (p2pfl.runtime.protocol) runs on
private duplicates of fds 0 and 1; fd 0 then reads /dev/null and fd 1 points at stderr,
so nothing the task prints (Python or C) can corrupt a frame. Python-level print() output
is captured into the job's logs by the loader; the rest reaches the node's log via stderr.
"""

from __future__ import annotations

import faulthandler
import io
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

from p2pfl.runtime import protocol
from p2pfl.runtime.jobs import JobError
from p2pfl.runtime.loader import TaskSession, describe, load_task_class
from p2pfl.runtime.sandbox import apply_landlock, apply_rlimits


def _read_exact(f: io.RawIOBase, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            return None
        got += k
    return buf


def _widen_pipes() -> None:
    # 1 MiB pipes instead of 64 KiB: weights of tens of MB cross in far fewer wakeups.
    try:
        import fcntl

        for fd in (0, 1):
            fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ (Linux)
    except (ImportError, OSError):
        pass


def read_frame(f: io.RawIOBase) -> dict[str, Any] | None:
    """The next frame, or None at EOF (the parent closed our stdin: time to exit)."""
    head = _read_exact(f, protocol.LENGTH.size)
    if head is None:
        return None
    (n,) = protocol.LENGTH.unpack(head)
    body = _read_exact(f, n)
    if body is None:
        return None
    return protocol.unpack(body)


def write_frame(f: BinaryIO, obj: dict[str, Any]) -> None:
    f.write(protocol.pack(obj))
    f.flush()


def _error(e: JobError, state: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"ok": False, "reason": e.reason, "kind": e.kind, "logs": e.logs, "state": state}


def serve(proto_in: io.RawIOBase, proto_out: BinaryIO) -> int:
    hello = read_frame(proto_in)
    if hello is None:
        return 0
    spec = protocol.decode_spec(hello["spec"])
    workdir = Path(hello["workdir"])
    report: dict[str, Any] = {"rlimits": apply_rlimits(spec.limits)}
    if hello.get("sandbox", True):
        extra = [Path(p) for p in hello.get("writable", ["/dev/shm"])]
        report["sandbox"] = apply_landlock(workdir, extra)
    try:
        task_cls = load_task_class(spec.taskpack_dir)
        session = TaskSession(task_cls, spec, workdir, hello["state"])
    except JobError as e:
        write_frame(proto_out, _error(e))
        return 3  # a worker without a task is useless: the next job starts a fresh one
    write_frame(proto_out, {"ok": True, "report": report})
    while (frame := read_frame(proto_in)) is not None:
        job = protocol.decode_job(frame["job"])
        try:
            result, logs = session.run(job)
            reply = {"ok": True, "result": protocol.encode_result(job, result), "logs": logs}
        except JobError as e:
            reply = _error(e)
        reply["state"] = session.state if session.state_changed else None
        session.state_changed = False
        write_frame(proto_out, reply)
    return 0


def main() -> int:
    # Private copies of the protocol pipes, then fds 0/1 away from the task's reach.
    _widen_pipes()
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    faulthandler.enable()  # a segfault leaves a Python traceback on stderr for the log
    try:
        return serve(proto_in, proto_out)
    except protocol.ProtocolError as e:
        print(f"p2pfl worker: protocol error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except BaseException as e:  # noqa: BLE001 - the last word goes to the node's log
        print(f"p2pfl worker: {describe(e)}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
