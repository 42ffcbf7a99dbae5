"""A real node: libp2p network, on-disk store, child-process runtime, control socket.

`run_node(config)` is what `p2pfl node` runs. It is the only place (with the network and
the control server it starts) that opens nurseries; all protocol decisions are made by
the sans-IO core behind the driver.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import trio

from p2pfl.config import NodeConfig
from p2pfl.core.messages import TaskpackAnnounce, check_task_id
from p2pfl.core.node_core import DatasetInfo, NodeCore
from p2pfl.data.derived import DerivedRegistry
from p2pfl.driver import Driver
from p2pfl.errors import LocalProtocolError, RemoteProtocolError, TaskFailed, TaskNotFinished
from p2pfl.flow.api import FlowAPI
from p2pfl.fsutil import atomic_write
from p2pfl.identity import Identity
from p2pfl.net.advertised import save_addrs
from p2pfl.policy import (
    AUDIT_FILE,
    LEDGER_FILE,
    POLICY_FILE,
    AuditLog,
    PolicyError,
    PrivacyLedger,
    SitePolicy,
    load_policy,
)
from p2pfl.policy.usage import USAGE_FILE, UsageLedger
from p2pfl.store.blobs import BlobStore
from p2pfl.taskpack.trust import TrustPolicy
from p2pfl.wire import decode, encode

log = logging.getLogger("p2pfl.node")

_HISTORY_MAX = 5000  # events kept per task for late followers
_FINAL_KINDS = ("result", "failed")
_ANNOUNCEMENTS = "announcements"  # our verified taskpacks, re-checked at start
_FINISHED = "tasks"  # finished tasks' summaries and results, listed after a restart
_LIVE = "live"  # snapshots of running tasks: a restarted node rejoins them


def describe_datasets(datasets: dict[str, Path]) -> dict[str, DatasetInfo]:
    """Name, row count and columns of each registered dataset (never its rows)."""
    from p2pfl.fl.datasets import load_table

    out = {}
    for name, path in datasets.items():
        if Path(path).is_dir():
            # A folder dataset (images, documents): one record per file, no columns.
            from p2pfl.taskpack.batch import count_files

            out[name] = DatasetInfo(name, count_files(Path(path)), [], type="files")
            continue
        try:
            X, y, columns = load_table(path)
        except ValueError:
            if Path(path).suffix.lower() != ".csv":
                raise
            # Not a training table (keys, text columns): inference or preprocessing input.
            from p2pfl.taskpack.batch import csv_shape

            rows, header = csv_shape(Path(path))
            out[name] = DatasetInfo(name, rows, header, type="table")
            continue
        out[name] = DatasetInfo(name, int(len(y)), [*list(columns), "label"])
    return out


def local_capabilities(data_dir: Path) -> dict[str, Any]:
    import psutil

    try:
        import importlib.metadata

        torch_version = importlib.metadata.version("torch")
    except Exception:
        torch_version = ""
    return {
        "cpus": os.cpu_count() or 1,
        "memory_bytes": psutil.virtual_memory().total,
        "disk_free_bytes": shutil.disk_usage(data_dir).free,
        "gpu": False,  # CUDA is not probed: importing torch at start costs seconds
        "python": platform.python_version(),
        "torch": torch_version,
    }


class Site(NamedTuple):
    """What a site decides and records (p2pfl/policy), opened from DATA_DIR at start."""

    policy: SitePolicy
    ledger: PrivacyLedger
    audit_log: AuditLog


def open_site(config: NodeConfig, peer_id: str) -> Site:
    """Load DATA_DIR/policy.yaml (PolicyError lists every problem: the node does not start),
    the privacy ledger (LedgerError if corrupted) and the audit log; record the load."""
    data_dir = Path(config.data_dir)
    policy = load_policy(
        data_dir / POLICY_FILE,
        own_peer=peer_id,
        allow_any_requester=config.allow_any_requester,
        min_records=config.min_records,
    )
    site = Site(policy, PrivacyLedger(data_dir / LEDGER_FILE), AuditLog(data_dir / AUDIT_FILE))
    site.audit_log.record("policy", action="load", digest=policy.digest, source=policy.source)
    return site


class Node:
    """The control socket's view of a running node (p2pfl.control.NodeAPI)."""

    def __init__(
        self,
        config: NodeConfig,
        driver: Driver,
        network: Any,
        version: str,
        site: Site | None = None,
    ) -> None:
        self.config = config
        self.driver = driver
        self.network = network
        self.version = version
        self.core = driver.core
        self._history: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._watchers: dict[str, set[trio.MemorySendChannel[dict[str, Any]]]] = defaultdict(set)
        self._finished: dict[str, dict[str, Any]] = {}  # task id -> record (see _keep_finished)
        self.flows_api: Any = None  # p2pfl/flow/api.py, set once the node runs
        driver.listeners.append(self._on_task_event)
        driver.persist = self.persist_task
        driver.site_sink = self._site_record
        driver.usage_sink = self._charge_usage
        site = site if site is not None else open_site(config, self.core.me)
        self.policy: SitePolicy = site.policy
        self.ledger: PrivacyLedger = site.ledger
        self.audit_log: AuditLog = site.audit_log  # `audit` is the control-socket method

    # --- events --------------------------------------------------------------------------

    def _on_task_event(self, event: dict[str, Any]) -> None:
        task_id = event.get("task_id")
        if not task_id:
            return
        machine = self.core.tasks.get(task_id)
        if machine is not None:
            event = {**event, "task": machine.summary()}  # followers render the task tree
        if event.get("kind") in _FINAL_KINDS and machine is not None:
            self._keep_finished(machine)
        history = self._history[task_id]
        history.append(event)
        if len(history) > _HISTORY_MAX:
            del history[: len(history) - _HISTORY_MAX]
        for channel in list(self._watchers.get(task_id, ())):
            try:
                channel.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers[task_id].discard(channel)

    # --- NodeAPI -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "peer_id": self.core.me,
            "addrs": self.network.listen_addrs(),
            "version": self.version,
            "data_dir": str(self.config.data_dir),
            "datasets": [
                {"name": d.name, "rows": d.rows, "columns": d.columns}
                for d in self.core.datasets.values()
            ],
            "trusted": sorted(self.config.trusted),
            "trust_any": self.config.trust_any,
        }

    def peers(self) -> list[dict[str, Any]]:
        connected = {p.peer_id: list(p.addrs) for p in self.network.connected_peers()}
        views = {v["peer_id"]: v for v in self.core.peers_view()}
        out = []
        for peer, addrs in sorted(connected.items()):
            view = views.get(peer, {})
            out.append(
                {
                    "peer_id": peer,
                    "addrs": addrs or view.get("addrs", []),
                    "capabilities": view.get("capabilities"),
                    "dropped_messages": self._dropped(peer),
                }
            )
        return out

    def _dropped(self, peer: str) -> int:
        """Messages from `peer` dropped for being over a size or inbound byte bound."""
        inbound = getattr(self.driver.io, "inbound", None)
        return inbound.dropped(peer) if inbound is not None else 0

    async def publish(
        self, path: str, run: bool, params: dict[str, str], rollout: str = ""
    ) -> dict[str, Any]:
        info = await trio.to_thread.run_sync(self.driver.publish_taskpack, Path(path))
        # Signed over the whole BlobRef (see taskpack.signing; a no-op once the driver is).
        ann: TaskpackAnnounce = info.pop("announce")
        self.driver.announce_taskpack(ann)
        self._remember(ann)
        if run:
            created = self.driver.create_task(info["cid"], dict(params), rollout=rollout)
            info["task_id"] = created["task_id"]
            if "rollout" in created:
                info["rollout"] = created["rollout"]
        return info

    def taskpacks(self) -> list[dict[str, Any]]:
        progress = self.driver.fetch_progress()
        out = []
        for item in self.core.book.listing():
            have, total = progress.get(item["cid"], (0, 0))
            if item["status"] == "fetching" and total:
                item["progress"] = [have, total]
            out.append(item)
        return out

    async def create_task(
        self, ref: str, params: dict[str, str], rollout: str = ""
    ) -> dict[str, Any]:
        return self.driver.create_task(ref, dict(params), rollout=rollout)

    def tasks(self) -> list[dict[str, Any]]:
        live = {tid: m.summary() for tid, m in self.core.tasks.items()}
        earlier = {tid: f["summary"] for tid, f in self._finished.items() if tid not in live}
        return sorted([*live.values(), *earlier.values()], key=lambda t: t.get("created", 0))

    def _task_id(self, task_id: str) -> str:
        """A full task id from an id or a unique prefix (running or finished earlier)."""
        known = set(self.core.tasks) | set(self._finished)
        if task_id in known:
            return task_id
        matches = [tid for tid in known if task_id and tid.startswith(task_id)]
        if len(matches) == 1:
            return matches[0]
        raise KeyError(task_id)

    def _machine(self, task_id: str) -> Any:
        machine = self.core.tasks.get(self._task_id(task_id))
        if machine is None:
            raise KeyError(task_id)
        return machine

    def task(self, task_id: str) -> dict[str, Any]:
        tid = self._task_id(task_id)
        machine = self.core.tasks.get(tid)
        return machine.summary() if machine is not None else self._finished[tid]["summary"]

    async def watch_task(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        tid = self._task_id(task_id)
        if tid not in self.core.tasks:  # finished before this node's last restart
            yield self._finished[tid]["final_event"]
            return
        machine = self._machine(task_id)
        tid = machine.task_id
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        past = list(self._history.get(tid, []))
        self._watchers[tid].add(send)
        try:
            for event in past:
                yield event
                if event.get("kind") in _FINAL_KINDS:
                    return
            if machine.result is not None:
                return
            async with receive:
                async for event in receive:
                    yield event
                    if event.get("kind") in _FINAL_KINDS:
                        return
        finally:
            self._watchers[tid].discard(send)

    def result(self, task_id: str) -> dict[str, Any]:
        tid = self._task_id(task_id)
        machine = self.core.tasks.get(tid)
        if machine is None:
            result = self._finished[tid]["result"]
            if result is None or result["status"] != "succeeded":
                reason = (result or {}).get("reason") or self._finished[tid]["summary"].get(
                    "reason"
                )
                raise TaskFailed(f"task {tid} failed: {reason}")
            return result
        result = machine.result_dict()
        if result is None:
            if machine.phase == "failed":
                raise TaskFailed(f"task {machine.task_id} failed: {machine.reason}")
            raise TaskNotFinished(
                f"task {machine.task_id} is {machine.status()} (round {machine.round}/{machine.offer.rounds})"
            )
        if result["status"] != "succeeded":
            raise TaskFailed(f"task {machine.task_id} failed: {result['reason']}")
        return result

    def read_blob(self, cid: str) -> bytes | None:
        if not self.driver.store.has(cid):
            return None
        return bytes(self.driver.store.get(cid))

    # --- site policy and audit (p2pfl/policy) ------------------------------------------------

    def _site_record(self, cmd: Any) -> None:
        """The core's audit lines and privacy charges, made durable (fsynced) here."""
        from p2pfl.core.commands import Audit, ChargePrivacy

        if isinstance(cmd, Audit):
            self.audit_log.record(cmd.kind, **cmd.fields)
        elif isinstance(cmd, ChargePrivacy):
            for name in cmd.datasets:
                total = self.ledger.charge(cmd.task_id, name, cmd.epsilon)
                self.audit_log.record(
                    "privacy", task=cmd.task_id, dataset=name, epsilon=cmd.epsilon, task_total=total
                )

    def _charge_usage(self, task_id: str, records: int) -> None:
        """A task's execution here finished: count it against its requester's usage caps."""
        usage = self.core.usage
        machine = self.core.tasks.get(task_id)
        if usage is None or machine is None:
            return
        offer = machine.offer
        usage.charge(
            task_id=task_id,
            requester=offer.publisher,
            taskpack=offer.name,
            datasets=tuple(offer.inputs),
            records=records,
            t=self.driver.io.now(),
        )
        self.audit_log.record("usage", task=task_id, records=records, datasets=list(offer.inputs))

    def cancel_task(self, task_id: str, reason: str = "") -> dict[str, Any]:
        tid = self._task_id(task_id)
        self.driver.execute(
            self.core.cancel(tid, reason or "no reason given", self.driver.io.now())
        )
        return self.task(tid)

    def withdraw_task(self, task_id: str) -> dict[str, Any]:
        tid = self._task_id(task_id)
        self.driver.execute(self.core.withdraw(tid, self.driver.io.now()))
        return self.task(tid)

    def policy_show(self) -> dict[str, Any]:
        ledger = getattr(self.core, "usage", None)
        usage = ledger.as_dict() if ledger is not None else []
        return {"policy": self.policy.as_dict(), "ledger": self.ledger.as_dict(), "usage": usage}

    def policy_reload(self) -> dict[str, Any]:
        """Re-read policy.yaml; an invalid file keeps the current policy (and says why)."""
        try:
            new = load_policy(
                self.config.data_dir / POLICY_FILE,
                own_peer=self.core.me,
                allow_any_requester=self.config.allow_any_requester,
                min_records=self.config.min_records,
            )
        except PolicyError as exc:
            self.audit_log.record(
                "policy", action="error", digest=self.policy.digest, problems=exc.problems
            )
            raise
        changed = new.digest != self.policy.digest
        self.policy = new
        # Decisions from now on follow the new policy, and running tasks are checked again.
        self.driver.execute(self.core.set_site(new, self.driver.io.now()))
        self.audit_log.record("policy", action="reload", digest=new.digest, changed=changed)
        log.info("site policy reloaded (%s)", "changed" if changed else "unchanged")
        return {"digest": new.digest, "changed": changed, "source": new.source}

    def policy_check(self, task_id: str) -> dict[str, Any]:
        """The decision the node made (or would make) on a task it has seen."""
        tid = self._task_id(task_id)
        # NodeCore.policy_decision(task_id) -> dict | None comes with the new task core.
        decide = getattr(self.core, "policy_decision", None)
        decision = decide(tid) if decide is not None else None
        if decision is None:
            raise KeyError(f"no policy decision for task {tid} (this node took no part in it)")
        return {"task_id": tid, **decision}

    def audit(self, task: str | None = None) -> list[dict[str, Any]]:
        return self.audit_log.read(task=task)

    # --- persistence of finished tasks -------------------------------------------------------

    def _keep_finished(self, machine: Any) -> None:
        """Write a finished task's summary and signed result's fields to disk, so that
        `p2pfl tasks` and `p2pfl result` still answer after a restart."""
        summary = machine.summary()
        record = {
            "summary": summary,
            "result": machine.result_dict(),
            "final_event": {
                "t": summary.get("created", 0.0),
                "kind": "result" if summary["status"] == "succeeded" else "failed",
                "task_id": machine.task_id,
                "peer": summary.get("reducer"),
                "round": None,
                "message": f"{summary['status']} (before this node's last restart)",
                "metrics": (machine.result_dict() or {}).get("metrics", {}),
                "task": summary,
            },
        }
        self._finished[machine.task_id] = record
        folder = self.config.data_dir / _FINISHED
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{machine.task_id}.json", json.dumps(record, default=str))

    def _load_finished(self) -> None:
        folder = self.config.data_dir / _FINISHED
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                record = json.loads(path.read_text())
                self._finished[path.stem] = record
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable %s: %s", path, exc)

    # --- persistence of our taskpacks -------------------------------------------------------

    def _remember(self, ann: TaskpackAnnounce) -> None:
        """Keep the announcement so a restarted node still serves and lists its taskpack."""
        folder = self.config.data_dir / _ANNOUNCEMENTS
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{ann.ref.cid}.msg", encode(ann))

    def persist_task(self, task_id: str, snapshot: bytes | None) -> None:
        """Keep (or, None, forget) a running task's snapshot. `task_id` was checked at
        decode time: 32 hex digits, never a path."""
        check_task_id(task_id)
        path = self.config.data_dir / _LIVE / f"{task_id}.snap"
        if snapshot is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, snapshot)

    def _resume_tasks(self) -> None:
        folder = self.config.data_dir / _LIVE
        for path in sorted(folder.glob("*.snap")) if folder.is_dir() else []:
            try:
                self.driver.execute(self.core.resume(path.read_bytes(), self.driver.io.now()))
                log.info("resumed task %s", path.stem[:12])
            except (OSError, RemoteProtocolError) as exc:
                log.warning("not resuming %s: %s", path.name, exc)

    def restore(self) -> None:
        self._load_finished()
        self._resume_tasks()
        folder = self.config.data_dir / _ANNOUNCEMENTS
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.msg")):
            try:
                ann = decode(path.read_bytes(), expected=TaskpackAnnounce)
            except RemoteProtocolError as exc:
                log.warning("ignoring unreadable %s: %s", path, exc)
                continue
            # Through the normal checks: signature, trust, then the stored archive.
            self.driver.execute(self.core.book.on_announce(self.core.me, ann))


def trust_policy(config: NodeConfig, own_peer: str) -> TrustPolicy:
    """Whose taskpacks this node runs: `--trust` peers, and always its own (a node needs no
    `--trust` for what its operator publishes; restore() also re-checks our own taskpacks at
    start through the normal pipeline, which would otherwise reject them as untrusted)."""
    return TrustPolicy(frozenset(config.trusted) | {own_peer}, config.trust_any)


def _configure_logging(level: str) -> None:
    # Our loggers at the asked level; third-party libraries (multiaddr logs every parse at
    # debug) stay at warning.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("p2pfl").setLevel(getattr(logging, level.upper(), logging.INFO))


async def run_node(config: NodeConfig) -> None:
    """Run a node until SIGINT or SIGTERM, then shut down cleanly."""
    from p2pfl import __version__
    from p2pfl.control import ControlServer
    from p2pfl.control.framing import socket_is_live
    from p2pfl.io_trio import TrioIO
    from p2pfl.net.inbound import InboundBudget
    from p2pfl.net.libp2p import Libp2pConfig, Libp2pNetwork
    from p2pfl.runtime import ChildProcessRunner

    _configure_logging(config.log_level)
    data_dir = Path(config.data_dir)
    # Before the network starts: a second node on this data dir would otherwise join the
    # network under the running node's peer id, then fail on the control socket.
    if socket_is_live(config.control_socket):
        raise LocalProtocolError(
            f"a node is already running in {data_dir} (its control socket answers)"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    identity = Identity.load_or_create(data_dir)
    if config.trust_any:
        log.warning(
            "!!! --trust-any: this node will run taskpacks from ANY publisher. "
            "Development only: never beside real data. !!!"
        )
    if config.allow_any_requester:
        log.warning(
            "!!! --allow-any-requester: ANY peer may run tasks on datasets the site policy "
            "does not name. Development only: never beside real data. !!!"
        )
    # Before the network starts: an invalid policy or ledger means the node does not run.
    site = open_site(config, identity.peer_id)
    store = BlobStore(data_dir / "store")
    datasets = describe_datasets(config.datasets)
    core = NodeCore(
        identity,
        policy=trust_policy(config, identity.peer_id),
        capabilities={**local_capabilities(data_dir), "labels": dict(config.labels)},
        datasets=datasets,
        min_records=config.min_records,
        # Offer and ranking nonces must be unpredictable: the OS's CSPRNG, never a seed.
        rng=random.SystemRandom(),
        site=site.policy,
        privacy_spent=site.ledger.spent_all(),
    )
    core.usage = UsageLedger(data_dir / USAGE_FILE)
    (data_dir / "tmp").mkdir(exist_ok=True)
    runner = ChildProcessRunner(
        tmp_root=data_dir / "tmp",
        unsafe_no_sandbox=config.unsafe_no_sandbox,
        private_paths=[data_dir, *(Path(p).parent for p in config.datasets.values())],
    )
    print(f"sandbox: {runner.sandbox}", file=sys.stderr, flush=True)
    if runner.bwrap is None:
        log.warning("!!! sandbox: %s !!!", runner.sandbox)
    try:
        async with trio.open_nursery() as nursery:
            # Bytes of peers' messages waiting for the core, bounded per peer and in all:
            # charged by the network's delivery, released once the core handled them.
            inbound = InboundBudget()
            io = TrioIO(nursery, runner, inbound, identity.peer_id)
            await nursery.start(io.run)
            holder: list[Any] = []

            def deliver(event: Any) -> None:
                io.deliver(event, lambda e: holder[1](e))

            network = Libp2pNetwork(
                identity,
                Libp2pConfig(
                    listen=list(config.listen),
                    bootstrap=list(config.bootstrap),
                    announce=list(config.announce),
                    bulk_tcp=config.bulk_port is not None,
                    bulk_port=config.bulk_port or 0,
                    relay_via=list(config.relay_via),
                    relay_service=config.relay_service,
                ),
                sink=lambda event: deliver(event),
                blob_reader=store.read,
                # Who may fetch which blob (issue 9 item 6): everyone, until the core's rule
                # (a task's updates and partials only to its roster) is wired in here.
                # A task's updates and partials go only to its roster (issue 9, item 6).
                may_serve=core.may_serve,
                inbound=inbound,
            )
            driver = Driver(
                core,
                network,
                store,
                io,
                taskpack_root=data_dir / "taskpacks",
                datasets=dict(config.datasets),
                state_dir=data_dir / "state",
                local_dir=data_dir,
            )
            driver.attach_derived(DerivedRegistry(data_dir / "derived"))
            holder.append(driver)
            target_peers = Libp2pConfig().target_peers

            def track_mesh(event: Any) -> None:
                # Below target_peers, discovery connects us to every peer it learns of:
                # then we see the whole network and rosters need not wait for deadlines.
                core.full_mesh = len(network.connected_peers()) < target_peers
                driver.on_event(event)

            holder.append(track_mesh)
            await nursery.start(network.run)
            nursery.start_soon(_trim_memory_forever)
            driver.start()
            node = Node(config, driver, network, __version__, site=site)
            node.restore()
            node.flows_api = FlowAPI(node)
            node.flows_api.start()
            await nursery.start(ControlServer(config.control_socket, node).serve)
            addrs = network.listen_addrs()
            save_addrs(data_dir, identity.peer_id, addrs)
            log.info("node %s listening on %s", identity.peer_id, " ".join(addrs))
            print(f"p2pfl node {identity.peer_id} listening on {' '.join(addrs)}", flush=True)
            stop = (signal.SIGINT, signal.SIGTERM)
            with trio.open_signal_receiver(*stop, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        _reload_on_hup(node)
                        continue
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # trio wraps every failure in a group; the CLI would print only "Exceptions from
        # Trio nursery". One real error (say, the control socket taken) is raised as itself.
        errors = _leaf_errors(group)
        if len(errors) != 1:
            raise
        raise errors[0] from None
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await runner.aclose()
    log.info("node stopped")


def _reload_on_hup(node: Node) -> None:
    """SIGHUP: reload the site policy; a bad file is logged and the old policy stays."""
    try:
        node.policy_reload()
    except PolicyError as exc:
        log.error("SIGHUP: policy not reloaded, keeping the current one: %s", exc)
    except OSError as exc:
        log.error("SIGHUP: policy not reloaded: %s", exc)


async def _trim_memory_forever() -> None:
    """Keep freed buffers for reuse between trims, and return what stays free after
    bursts of peers' messages to the OS (see p2pfl.memtrim)."""
    from p2pfl.memtrim import TRIM_EVERY_S, keep_freed_memory, trim

    keep_freed_memory()

    while trim():
        await trio.sleep(TRIM_EVERY_S)


def _leaf_errors(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in a (nested) group, Cancelled ones left out."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaf_errors(exc)
        elif not isinstance(exc, trio.Cancelled):
            out.append(exc)
    return out
