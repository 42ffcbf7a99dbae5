"""Hostile on purpose: each `try_*` is one escape; execute() reports attempt -> outcome.

An outcome starting with "SUCCEEDED" is an escape; anything else ("blocked: ...") is not.
Paths and pids to aim at come in params (what an attacker learns from /proc/<node>/cmdline
on an unconfined node); those absent are skipped. The task never raises: a missing report
must mean the sandbox killed it, not that the task gave up.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from p2pfl.taskpack.sdk import Task, Update

FORKS = 150


def _read(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(4096)
    return f"SUCCEEDED: read {len(data)} bytes of {path}"


def try_key(p: dict[str, Any]) -> str:
    return _read(os.path.join(p["data_dir"], "identity.key"))


def try_other_dataset(p: dict[str, Any]) -> str:
    return _read(p["other_dataset"])


def try_home(p: dict[str, Any]) -> str:
    return _read(p["home_file"])


def try_proc_node_cmdline(p: dict[str, Any]) -> str:
    return _read(f"/proc/{p['node_pid']}/cmdline")


def try_proc_node_environ(p: dict[str, Any]) -> str:
    return _read(f"/proc/{p['node_pid']}/environ")


def try_proc_parent(p: dict[str, Any]) -> str:
    # The parent seen from inside is bwrap's own init; an escape only if it leaks the node's
    # secrets (its environment) or other datasets' paths (its command line).
    ppid = os.getppid()
    with open(f"/proc/{ppid}/environ", "rb") as f:
        environ = f.read()
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        cmdline = f.read()
    if p["secret"].encode() in environ + cmdline or p["other_dataset"].encode() in cmdline:
        return f"SUCCEEDED: /proc/{ppid} shows the node's environment or datasets"
    return f"blocked: /proc/{ppid} (pid {ppid}) holds nothing of the node's"


def try_udp(p: dict[str, Any]) -> str:
    # sendto() may well "work" into a private loopback; the test checks nothing arrived.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"stolen key", ("127.0.0.1", int(p["udp_port"])))
    return "sent: the test checks whether it arrived"


def try_tcp(p: dict[str, Any]) -> str:
    with socket.create_connection(("127.0.0.1", int(p["tcp_port"])), timeout=2):
        return "SUCCEEDED: TCP connection to the host's 127.0.0.1"


def _unix(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
    return f"SUCCEEDED: connected to {path!r}"


def try_control_socket(p: dict[str, Any]) -> str:
    return _unix(os.path.join(p["data_dir"], "control.sock"))


def try_other_socket(p: dict[str, Any]) -> str:
    return _unix(p["other_socket"])


def try_abstract_socket(p: dict[str, Any]) -> str:
    return _unix("\0" + p["abstract_socket"])


def try_fork(p: dict[str, Any]) -> str:
    pids = []
    try:
        for _ in range(FORKS):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            pids.append(pid)
    except OSError as e:
        return f"blocked after {len(pids)} forks: {type(e).__name__}: {e}"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return f"SUCCEEDED: {FORKS} processes"


def _leave(path: str) -> str:
    with open(path, "w") as f:
        f.write("left behind")
    return f"written inside: {path} (the test checks the host)"


def try_dev_shm(p: dict[str, Any]) -> str:
    return _leave(f"/dev/shm/{p['leftover']}")


def try_tmp(p: dict[str, Any]) -> str:
    return _leave(f"/tmp/{p['leftover']}")


def try_linger(p: dict[str, Any]) -> str:
    # A detached grandchild that keeps writing into the scratch dir: must die at close.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            target = os.path.join(os.getcwd(), "linger.txt")
            while True:
                try:
                    with open(target, "a") as f:
                        f.write(".")
                except OSError:
                    pass
                time.sleep(0.05)
        os._exit(0)
    os.wait()
    return "spawned: the test checks it is gone after close"


def try_memory(p: dict[str, Any]) -> str:
    big = np.empty(3 << 30, dtype=np.uint8)  # address space: what RLIMIT_AS bounds
    big[:: 1 << 20] = 1
    return f"SUCCEEDED: {big.nbytes >> 30} GiB allocated without a manifest limit"


def try_signal_node(p: dict[str, Any]) -> str:
    os.kill(int(p["node_pid"]), 0)
    return f"SUCCEEDED: can signal the node (pid {p['node_pid']})"


def try_kill_victim(p: dict[str, Any]) -> str:
    os.kill(int(p["victim_pid"]), signal.SIGKILL)
    return f"SUCCEEDED?: SIGKILL sent to pid {p['victim_pid']} (the test checks it lives)"


ATTEMPTS: dict[str, Callable[[dict[str, Any]], str]] = {
    name[len("try_") :]: fn for name, fn in globals().items() if name.startswith("try_")
}


class Hostile(Task):
    def preprocess(self, ctx, inputs):
        # Rows of its own input: the sample count it reports (so a node's k-rule lets the
        # report out when this runs on a real node).
        with open(next(iter(inputs.values()))) as f:
            return max(sum(1 for _ in f) - 1, 1)

    def execute(self, ctx, data, weights):
        report = {}
        for name, attempt in ATTEMPTS.items():
            try:
                report[name] = attempt(ctx.params)
            except KeyError as e:
                report[name] = f"skipped: no param {e}"
            except BaseException as e:  # noqa: BLE001 - every failure is an outcome
                report[name] = f"blocked: {type(e).__name__}: {e}"[:300]
        for name, outcome in report.items():  # the trace carries them on a real node
            ctx.log(f"attempt {name}: {outcome}")
        return Update(num_samples=data, aggregates={"attempts": report})

    def reduce(self, ctx, partials):
        # A node's release filter drops free-form aggregates (as it should): the report
        # reaches the test through the task's log lines instead.
        return {"reports": len(partials)}
