"""The driver: carries out the sans-IO core's commands and feeds outcomes back as events.

One driver class serves a real deployment and a simulation. What differs is `io`, a small
backend that knows how to wait and how to run work:

* `p2pfl.io_trio.TrioIO`  -- wall clock, trio timers, taskpack code in child processes,
  heavy numpy work in threads; the network is libp2p.
* `p2pfl.sim.io.SimIO`    -- virtual time on the simulator's hub, taskpack code in one
  shared in-process pool; the network is the simulated one.

Everything reaches the core through `Driver.on_event`, one event at a time, so the core
never sees concurrency.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from p2pfl import attached
from p2pfl.batched import BATCHED_TYPES, BatchedJob
from p2pfl.core.commands import (
    AddProviders,
    Aggregate,
    Aggregated,
    ArchiveChecked,
    Audit,
    BlobFailed,
    BlobReady,
    CancelTimer,
    ChargePrivacy,
    CheckArchive,
    Command,
    Emit,
    FetchBlob,
    ForgetBlobs,
    JobDone,
    JobFailed,
    Log,
    Persist,
    Publish,
    RunJob,
    Send,
    SetTimer,
    SliceWork,
    SliceWorked,
    TaskEnded,
    TimerFired,
)
from p2pfl.core.messages import TOPICS, TaskpackAnnounce
from p2pfl.core.node_core import NodeCore
from p2pfl.core.tokens import Timer
from p2pfl.errors import LocalProtocolError, RemoteProtocolError
from p2pfl.limits import MiB
from p2pfl.net.base import FetchDone, FetchFailed, Message, Network, PeerDisconnected
from p2pfl.store.blobref import DEFAULT_CHUNK_SIZE, BlobRef, make_blob_ref, whole_chunk_size
from p2pfl.store.blobs import BlobStore, decode_bitmap
from p2pfl.store.fetcher import BlobFetch, FetchCmd
from p2pfl.wire import encode

log = logging.getLogger("p2pfl.node")

Callback = Callable[[], None]

# Aggregation and slice work on at most this many input bytes runs on the event loop, not
# in a worker thread. Over 8 hosts in one process (benchmarks/round.py, a 4 MB model) the
# work took 1-8 ms (a slice check ~1, a reduce ~2, a cut or an assembly 6-8, a node's own
# sketches 6, or 45-60 when they draw the round's challenge vectors), while the thread's
# round trip took 150-250 ms: a worker thread waits for the GIL at every numpy call the
# busy loop thread hands it back. About 13 ms per MiB at worst, so the loop stalls for at
# most ~100 ms; bigger models' work still goes to a thread.
INLINE_WORK_BYTES = 8 * MiB


class DriverIO(Protocol):
    """How a driver waits and runs work, in its world."""

    def now(self) -> float: ...

    def set_timer(self, key: Timer, deadline: float, callback: Callback) -> None: ...

    def cancel_timer(self, key: Timer) -> None: ...

    def call_soon(self, callback: Callback) -> None: ...

    def run_blocking(
        self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run CPU/disk work (hashing, aggregation, unpacking) off the event path."""
        ...

    def run_job(self, spec: Any, job: Any, done: Callable[[Any, str | None], None]) -> None:
        """Run a taskpack job; done(result, None) or done(None, reason)."""
        ...

    def close_task(self, task_id: str, node: str) -> None:
        """End the task's worker (its process or pooled session) and wipe its temp dir."""
        ...


class Driver:
    def __init__(
        self,
        core: NodeCore,
        network: Network,
        store: BlobStore,
        io: DriverIO,
        *,
        taskpack_root: Path,
        datasets: dict[str, Path],
        state_dir: Path | None = None,
        update_hook: Callable[[str, bytes], bytes] | None = None,
        persist: Callable[[str, bytes | None], None] | None = None,
        local_dir: Path | None = None,
    ) -> None:
        self.core = core
        self.network = network
        self.store = store
        self.io = io
        self.taskpack_root = taskpack_root
        self.datasets = datasets
        self.state_dir = state_dir
        # Simulations use this to play a byzantine node (transform its own updates).
        self.update_hook = update_hook
        # Where task snapshots go (a real node: files under DATA_DIR/live); None: nowhere.
        self.persist = persist
        # Reproducible DP noise is for simulations only (they set this); a real node's
        # noise and sampling come from fresh secret seeds.
        self.deterministic_dp = False
        # Where audit lines and privacy charges go (a real node's log and ledger).
        self.site_sink: Callable[[Command], None] | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # Where batched runs keep what never leaves the node (reports, records processed,
        # p2pfl.batched); None: nowhere (then no new-data-only memory).
        # A simulated node (no data dir) keeps them beside its taskpacks, in the run's temp dir.
        self.local_dir = local_dir or taskpack_root.parent / "local" / core.me
        self._records: Any = None
        # Usage per requester and taskpack (the node's UsageLedger): (task_id, records).
        self.usage_sink: Callable[[str, int], None] | None = None
        # Derived datasets (p2pfl/data/derived.py) that preprocessing steps write here and
        # later steps read; None: this node keeps none (see attach_derived).
        self.derived: Any = None
        self._fetches: dict[str, BlobFetch] = {}
        # The blob attached to the direct message being handled (cid, bytes), and the
        # last envelope made (message, cid, envelope) for the next peer of the same batch
        # of commands.
        self._attached: tuple[str, bytes] | None = None
        self._last_attached: tuple[bytes, str, bytes] | None = None
        self._specs: dict[str, Any] = {}
        self.me = core.me

    # --- start ---------------------------------------------------------------------------

    def start(self) -> None:
        for topic in TOPICS:
            self.network.subscribe(topic)
        self.execute(self.core.start(self.io.now()))

    # --- the one entry point for events ----------------------------------------------------

    def on_event(self, event: Any) -> None:
        if isinstance(event, FetchDone | FetchFailed):
            self._on_fetch_answer(event)
            return
        if (
            isinstance(event, Message)
            and event.topic is None
            and event.data[: len(attached.PREFIX)] == attached.PREFIX
        ):
            self._on_attached(event)
            return
        if isinstance(event, PeerDisconnected):
            for fetch in list(self._fetches.values()):
                self._fetch_cmds(fetch.remove_provider(event.peer))
            self._check_fetches()
        self.execute(self.core.handle(event, self.io.now()))

    def execute(self, commands: list[Command]) -> None:
        try:
            for cmd in commands:
                try:
                    self._execute_one(cmd)
                except LocalProtocolError as exc:
                    log.error("could not carry out %s: %s", type(cmd).__name__, exc)
        finally:
            # An envelope serves the sends of one batch only: a blob's bytes are not held
            # on after it.
            self._last_attached = None

    def _execute_one(self, cmd: Command) -> None:
        if isinstance(cmd, Publish):
            self.network.publish(cmd.topic, encode(cmd.msg))
        elif isinstance(cmd, Send):
            data = encode(cmd.msg)
            if cmd.peer == self.me:
                self.io.call_soon(lambda: self.on_event(Message(None, self.me, data)))
            else:
                envelope = self._attach(data, cmd.attach)
                self.network.send(cmd.peer, envelope, data if envelope is not data else None)
        elif isinstance(cmd, SetTimer):
            key = cmd.key
            self.io.set_timer(key, cmd.deadline, lambda: self.on_event(TimerFired(key)))
        elif isinstance(cmd, CancelTimer):
            self.io.cancel_timer(cmd.key)
        elif isinstance(cmd, FetchBlob):
            self._start_fetch(cmd.ref, cmd.providers)
        elif isinstance(cmd, AddProviders):
            fetch = self._fetches.get(cmd.cid)
            if fetch is not None:
                try:
                    chunks = decode_bitmap(cmd.chunks, fetch.ref.n_chunks) if cmd.chunks else None
                except RemoteProtocolError as exc:
                    log.warning("providers of %s: %s", cmd.cid[:16], exc)
                    return
                for peer in cmd.providers:
                    if peer != self.me:
                        self._fetch_cmds(fetch.add_provider(peer, chunks))
        elif isinstance(cmd, ForgetBlobs):
            for cid in cmd.cids:
                if cid not in self._fetches:
                    self.store.delete(cid)
        elif isinstance(cmd, CheckArchive):
            self._check_archive(cmd)
        elif isinstance(cmd, RunJob):
            self._run_job(cmd)
        elif isinstance(cmd, Aggregate):
            self._aggregate(cmd)
        elif isinstance(cmd, SliceWork):
            self._slice_work(cmd)
        elif isinstance(cmd, Emit):
            event = cmd.event.as_dict()
            for listener in list(self.listeners):
                listener(event)
        elif isinstance(cmd, TaskEnded):
            self._close_task(cmd.task_id)
            log.info(
                "%s task %s ended here: %s%s",
                self.me[-8:],
                cmd.task_id[:12],
                cmd.status,
                f" ({cmd.reason})" if cmd.reason else "",
            )
        elif isinstance(cmd, Audit | ChargePrivacy):
            if self.site_sink is not None:
                self.site_sink(cmd)
        elif isinstance(cmd, Persist):
            if self.persist is not None:
                self.persist(cmd.task_id, cmd.data())
        elif isinstance(cmd, Log):
            getattr(log, cmd.level, log.info)("%s %s", self.me[-8:], cmd.text)
        else:  # pragma: no cover - a new command without a handler is a bug
            raise LocalProtocolError(f"no handler for {type(cmd).__name__}")

    # --- blobs ----------------------------------------------------------------------------

    def _start_fetch(self, ref: BlobRef, providers: tuple[str, ...]) -> None:
        cid = ref.cid
        if self.store.has(cid) or self._take_attached(ref):
            self.io.call_soon(lambda: self.on_event(BlobReady(cid)))
            return
        fetch = self._fetches.get(cid)
        if fetch is None:
            # Seeded by our id: downloaders of one blob start on different chunks.
            fetch = BlobFetch(
                ref, self.store.open_partial(ref), seed=self.me, stripe=self._stripe(cid, providers)
            )
            self._fetches[cid] = fetch
            cmds: list[FetchCmd] = []
            for peer in providers:
                if peer != self.me:
                    cmds += fetch.add_provider(peer)
            cmds += fetch.start()
            self._fetch_cmds(cmds)
        else:
            for peer in providers:
                if peer != self.me:
                    self._fetch_cmds(fetch.add_provider(peer))
        self._check_fetches((cid,))

    # --- blobs sent along with a message (attached.py) -------------------------------------

    def _attach(self, data: bytes, ref: BlobRef | None) -> bytes:
        """`data`, or an Attached with `ref`'s bytes when both fit one direct message (the
        network may still send `data` alone: Network.send's `plain`). A message told to
        every participant is enveloped once, not once per peer."""
        if ref is None or not attached.fits(len(data), ref.size):
            return data
        last = self._last_attached
        if last is not None and last[0] == data and last[1] == ref.cid:
            return last[2]
        try:
            blob = bytes(self.store.get(ref.cid))
        except KeyError:
            return data
        envelope = encode(attached.Attached(data, ref.cid, blob))
        self._last_attached = (data, ref.cid, envelope)
        return envelope

    def _on_attached(self, event: Message) -> None:
        """The message goes to the core; its blob waits only while the core handles it,
        for a fetch of that very blob (_take_attached)."""
        try:
            env = attached.decode_attached(event.data)
        except RemoteProtocolError as exc:
            log.warning("dropping a direct message from %s: %s", event.sender, exc)
            return
        self._attached = (env.cid, env.data)
        try:
            self.execute(self.core.handle(Message(None, event.sender, env.msg), self.io.now()))
        finally:
            self._attached = None

    def _take_attached(self, ref: BlobRef) -> bool:
        """Store the blob attached to the message being handled if it is `ref`'s."""
        held = self._attached
        if held is None or held[0] != ref.cid:
            return False
        self._attached = None
        data = held[1]
        try:
            if len(data) != ref.size:
                raise RemoteProtocolError(f"{len(data)} bytes attached, the blob has {ref.size}")
            self.store.put_verified(ref.cid, data)
        except RemoteProtocolError as exc:
            log.warning("attached blob %s refused (fetched instead): %s", ref.cid[:16], exc)
            return False
        return True

    def _stripe(self, cid: str, providers: tuple[str, ...]) -> tuple[int, int] | None:
        """For a taskpack archive (swarmed): our place among the peers we know that do not
        hold it yet, so neighbours start on different chunks (see BlobFetch)."""
        entry = self.core.book.entries.get(cid)
        if entry is None or entry.status != "fetching":
            return None
        peers = {p.peer_id for p in self.network.connected_peers()} - set(providers)
        swarm = sorted(peers | {self.me})
        return swarm.index(self.me), len(swarm)

    def _fetch_cmds(self, cmds: list[FetchCmd]) -> None:
        for c in cmds:
            self.network.fetch(c.peer, c.cid, c.offset, c.length, (c.cid, c.index))

    def _on_fetch_answer(self, event: FetchDone | FetchFailed) -> None:
        token = event.token
        assert isinstance(token, tuple)  # we fetch with (cid, chunk index) tokens
        cid, index = token
        fetch = self._fetches.get(cid)
        if fetch is None:
            return
        try:
            if isinstance(event, FetchDone):
                cmds = fetch.on_done(event.peer, index, event.data)
            else:
                cmds = fetch.on_failed(event.peer, index, event.reason)
        except RemoteProtocolError as exc:
            log.warning("blob %s from %s: %s", cid[:16], event.peer, exc)
            cmds = []
        self._fetch_cmds(cmds)
        if isinstance(event, FetchDone) and not fetch.done and fetch.ref.n_chunks > 1:
            # Verified chunks of a taskpack archive are served while it downloads; the
            # book decides when they are worth announcing.
            partial = fetch.partial
            have = partial.have_count()
            self.execute(self.core.book.on_fetch_progress(cid, have, partial.bitmap()))
        self._check_fetches((cid,))

    def _check_fetches(self, cids: tuple[str, ...] | None = None) -> None:
        """Deliver the outcome of finished fetches: those of `cids` (the ones an event
        touched: a scan of every fetch per chunk cost N^2 for a reducer fetching 10,000
        final models), or all of them."""
        names = list(self._fetches) if cids is None else [c for c in cids if c in self._fetches]
        for cid in names:
            fetch = self._fetches[cid]
            if fetch.done:  # the fetcher verified the whole blob and stored it
                del self._fetches[cid]
                self._deliver(BlobReady(cid))
            elif fetch.failed_reason:
                del self._fetches[cid]
                self._deliver(BlobFailed(cid, fetch.failed_reason))

    def _deliver(self, event: Any) -> None:
        self.io.call_soon(lambda: self.on_event(event))

    def put_blob(self, data: bytes, whole: bool = False) -> BlobRef:
        """Hash and store `data` (also called from worker threads: the store's writes are
        whole-blob and idempotent, see store/blobs.py). `whole`: one chunk when it fits a
        fetch range (one hash pass instead of two), for blobs that are fetched whole from
        one provider (slices and the model they make) rather than swarmed in chunks."""
        ref = make_blob_ref(data, whole_chunk_size(len(data)) if whole else DEFAULT_CHUNK_SIZE)
        if not self.store.has(ref.cid):
            self.store.put_hashed(ref, data)
        return ref

    def blob_bytes(self, ref: BlobRef | None) -> bytes | None:
        if ref is None:
            return None
        return bytes(self.store.get(ref.cid))

    # --- taskpacks ------------------------------------------------------------------------

    def taskpack_dir(self, cid: str) -> Path:
        return self.taskpack_root / cid

    def _check_archive(self, cmd: CheckArchive) -> None:
        store, root = self.store, self.taskpack_root

        def check() -> tuple[str | None, str]:
            from p2pfl.taskpack.pack import unpack
            from p2pfl.taskpack.trust import check_archive

            archive = bytes(store.get(cmd.cid))
            refusal = check_archive(archive, cmd.cid, cmd.manifest)
            if refusal is not None:
                store.delete(cmd.cid)
                return refusal.reason, refusal.detail
            unpack_atomic(archive, root / cmd.cid, unpack)
            return None, ""

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None:
                reason, detail = "invalid-archive", str(error)
            else:
                reason, detail = result
            self.on_event(ArchiveChecked(cmd.cid, reason, detail))

        self.io.run_blocking(check, done)

    def publish_taskpack(self, path: Path) -> dict[str, Any]:
        """Pack, sign, store and announce the taskpack in `path` (blocking work: call it
        from a thread in the real node)."""
        from p2pfl.taskpack.manifest import load_manifest
        from p2pfl.taskpack.pack import pack_dir, unpack
        from p2pfl.taskpack.signing import sign_taskpack

        manifest = load_manifest(path)
        archive = pack_dir(path)
        ref = self.put_blob(archive)
        manifest_bytes = manifest.canonical_bytes()
        unpack_atomic(archive, self.taskpack_dir(ref.cid), unpack)
        sig = sign_taskpack(self.core.identity, manifest_bytes, ref)
        ann = TaskpackAnnounce(manifest_bytes, ref, self.me, sig)
        return {
            "announce": ann,
            "cid": ref.cid,
            "name": manifest.metadata.name,
            "version": manifest.metadata.version,
            "publisher": self.me,
        }

    def announce_taskpack(self, ann: TaskpackAnnounce) -> None:
        self.execute(self.core.publish_taskpack(ann, self.io.now()))

    def create_task(
        self,
        ref: str,
        overrides: dict[str, str],
        *,
        volunteer_window_s: float = 3.0,
        rollout: str = "",
        flow: Any = None,
    ) -> dict[str, Any]:
        """Offer a task on a verified taskpack (a cid, or a name with an optional @range):
        parameters are the taskpack's defaults with `overrides` applied and checked.
        `rollout` (`1.0.0=0.8,1.1.0=0.2`) runs several versions of the name side by side;
        the parameters are the first version's (core/versions.py)."""
        from p2pfl.core.versions import parse_rollout, rollout_arms
        from p2pfl.taskpack.params import effective_federated, load_params

        entry = self.core.book.find(ref)
        if entry is None or entry.status != "verified":
            state = f"is {entry.status} ({entry.reason})" if entry else "is unknown here"
            raise LocalProtocolError(f"taskpack {ref} {state}")
        # The range asked for travels in the offer: every node checks the resolution.
        wanted = "" if ref in self.core.book.entries else ref.partition("@")[2]
        arms: tuple[Any, ...] = ()
        if rollout:
            try:
                shares = parse_rollout(rollout)
                arms = rollout_arms(
                    self.core.book.by_key.values(), entry.name, shares, entry.announce.publisher
                )
            except ValueError as exc:
                raise LocalProtocolError(str(exc)) from None
            entry = self.core.book.entries[arms[0].cid]
        # `inputs.NAME=DATASET` binds a manifest input to the name sites registered their
        # data under (`--dataset DATASET=PATH`); it is not a task parameter.
        bindings = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("inputs.")}
        names = [i.name for i in entry.manifest.spec.inputs]
        unknown = sorted(set(bindings) - set(names))
        if unknown:
            raise LocalProtocolError(
                f"inputs.{unknown[0]}: the taskpack has no input of that name (it has: {', '.join(names)})"
            )
        # `run.test_run=N`, `run.new_data_only=true`, `run.rerun_failed=true`: how nodes run
        # the task (signed into the offer), not task parameters either.
        run = parse_run_options(
            {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("run.")}
        )
        # `volunteer_window_s=S`: how long nodes have to volunteer (the requester's choice).
        window = overrides.get("volunteer_window_s")
        if window is not None:
            volunteer_window_s = parse_window(window)
        overrides = {
            k: v
            for k, v in overrides.items()
            if not k.startswith(("inputs.", "run.")) and k != "volunteer_window_s"
        }
        if run and entry.type not in BATCHED_TYPES:
            raise LocalProtocolError(
                "--test-run, --new-data-only and --force-rerun-failed apply to batched "
                f"(inference) tasks; {entry.name} is a {entry.type} task"
            )
        params = load_params(self.taskpack_dir(entry.cid), overrides)
        federated = effective_federated(entry.manifest, params)
        # The task's code reads its local epochs from its params, like any other setting.
        params.setdefault("local_epochs", federated.get("local_epochs", 1))
        task_id, cmds = self.core.create_task(
            entry.cid,
            params,
            federated,
            tuple(bindings.get(n, n) for n in names),
            self.io.now(),
            volunteer_window_s=volunteer_window_s,
            range=wanted,
            rollout=arms,
            flow=flow,  # a flow's step: (FlowRecord, index, model BlobRef | None)
            run=run,
        )
        self.execute(cmds)
        out: dict[str, Any] = {
            "task_id": task_id,
            "cid": entry.cid,
            "name": entry.name,
            "version": entry.version,
        }
        if arms:
            out["rollout"] = [{"version": a.version, "cid": a.cid, "share": a.share} for a in arms]
        return out

    # --- jobs -----------------------------------------------------------------------------

    def task_spec(self, task_id: str) -> Any:
        spec = self._specs.get(task_id)
        if spec is not None:
            return spec
        from p2pfl.runtime import Limits, TaskSpec
        from p2pfl.taskpack.sdk import DPConfig

        machine = self.core.tasks[task_id]
        offer = machine.offer
        cid = machine.cid  # the archive this node runs (a rollout's: its arm's)
        entry = self.core.book.entries.get(cid)
        manifest = entry.manifest if entry is not None else None
        if manifest is None and self.taskpack_dir(cid).is_dir():
            # A task resumed after a restart, before peers re-announced its taskpack: the
            # copy we verified and unpacked earlier is on disk.
            from p2pfl.taskpack.manifest import load_manifest

            manifest = load_manifest(self.taskpack_dir(cid))
        limits = Limits()
        declared = manifest.limits if manifest is not None else None
        if declared is not None:
            limits = Limits(
                timeout_s=declared.timeout_s or limits.timeout_s,
                memory_bytes=declared.memory_bytes,
                cpu_seconds=declared.cpu_seconds,
            )
        decision = machine.decision
        if decision is not None:
            # The site's policy for these datasets caps what the manifest asks (the
            # runner's ResourcePolicy caps both again, and fills in what neither names).
            limits = dataclasses.replace(
                limits,
                memory_bytes=_least(limits.memory_bytes, decision.memory_bytes),
                timeout_s=_least(limits.timeout_s, decision.max_wall_s) or limits.timeout_s,
            )
        dp = offer.dp if isinstance(offer.dp, dict) else None
        spec = TaskSpec(
            task_id=task_id,
            node=self.me,
            taskpack_dir=self.taskpack_dir(cid),
            params=dict(offer.params) if isinstance(offer.params, dict) else {},
            # Offer inputs are dataset names, in the manifest's input order.
            inputs={
                manifest_input.name: path
                for manifest_input, dataset in zip(manifest.spec.inputs, offer.inputs, strict=False)
                if (path := self.input_path(offer, dataset)) is not None
            }
            if manifest is not None
            else {},
            seed=int(task_id[:8], 16),
            rounds=offer.rounds,
            protocol=offer.protocol,
            mu=offer.mu if offer.protocol == "fedprox" else 0.0,
            dp=DPConfig(
                dp["epsilon"], dp["delta"], dp["max_grad_norm"], deterministic=self.deterministic_dp
            )
            if dp
            else None,
            state_path=(self.state_dir / f"{task_id}.json") if self.state_dir else None,
            limits=limits,
        )
        self._specs[task_id] = spec
        return spec

    # --- derived datasets --------------------------------------------------------------

    def attach_derived(self, registry: Any) -> None:
        """Keep derived datasets in `registry` (a DerivedRegistry); the core learns the
        ones already there (a restarted node's flows go on reading them)."""
        self.derived = registry
        for info in registry.list():
            self.core.local.derived[(info.scope, info.name)] = (info.records, info.sources)

    def input_path(self, offer: Any, dataset: str) -> Path | None:
        """Where input `dataset` of `offer` is on this node: the flow's derived dataset of
        that name (an earlier step wrote it here), else the site's registered dataset."""
        if offer.flow is not None and self.derived is not None:
            from p2pfl.core.flowrec import flow_id_of

            info = self.derived.get(flow_id_of(offer.flow), dataset)
            if info is not None:
                return Path(info.path)
        return self.datasets.get(dataset)

    def derived_output(self, offer: Any) -> tuple[str, str] | None:
        """(scope, name) a preprocessing task writes its derived dataset under: the flow
        step's `output` in the flow's scope (or, outside a flow, params.output in the task's
        own), or None when it writes none."""
        if offer.type != "preprocessing" or self.derived is None:
            return None
        from p2pfl.core.flowrec import flow_id_of
        from p2pfl.data.derived import check_derived_name

        if offer.flow is not None:
            output = offer.flow.steps[offer.step].output
            return (flow_id_of(offer.flow), output) if output else None
        params = offer.params if isinstance(offer.params, dict) else {}
        name = params.get("output")
        try:
            return (offer.task_id, check_derived_name(name)) if name else None
        except ValueError:
            return None

    def _store_derived(self, task_id: str, output: Any) -> dict[str, Any]:
        """Register a Transform's table (it stays here); the core learns its record count,
        which is all that leaves this node (as the step's metric and partial count)."""
        machine = self.core.tasks[task_id]
        target = self.derived_output(machine.offer)
        assert target is not None and self.derived is not None
        sources = self.core.local.policy_datasets(machine.offer)
        info = self.derived.put_bytes(
            target[0],
            target[1],
            output.table,
            records=output.records,
            columns=tuple(output.columns),
            sources=sources,
            producer=task_id,
            created=self.io.now(),
        )
        self.core.local.derived[(info.scope, info.name)] = (info.records, info.sources)
        self.emit_log(task_id, f"derived dataset {info.name}: {info.records} records (kept here)")
        return {"num_samples": info.records, "records": info.records}

    def _run_job(self, cmd: RunJob) -> None:
        from p2pfl import runtime as rt
        from p2pfl.taskpack.sdk import Partial

        spec = self.task_spec(cmd.task_id)
        req = cmd.job
        kind = req["kind"]
        if kind == "validate":
            job: Any = rt.Validate()
        elif kind == "init":
            job = rt.InitialWeights()
        elif kind == "train":
            job = rt.Train(req["round"], self.blob_bytes(req.get("weights")))
        elif kind == "evaluate":
            machine = self.core.tasks.get(cmd.task_id)
            if (
                machine is not None
                and req["round"] >= machine.offer.rounds
                and self.derived_output(machine.offer) is not None
            ):
                # A preprocessing step's last round: the derived table, not metrics.
                kind = "transform"
                job = rt.Transform(req["round"], self.blob_bytes(req.get("weights")))
            else:
                job = rt.Evaluate(req["round"], self.blob_bytes(req.get("weights")))
        elif kind == "finalize":
            job = rt.Finalize(req["num_samples"], req["metrics"], req["aggregates"])
        elif kind == "reduce":
            job = rt.Reduce([Partial(**p) for p in req["partials"]])
        else:
            raise LocalProtocolError(f"unknown job kind {kind}")
        machine = self.core.tasks.get(cmd.task_id)
        if kind == "train" and machine is not None and machine.offer.type in BATCHED_TYPES:
            BatchedJob(self, cmd, spec).start()  # one execution, streamed in batches
            return
        self.io.run_job(spec, job, self.job_done(cmd, kind))

    def job_done(self, cmd: RunJob, kind: str) -> Callable[[Any, str | None], None]:
        """The callback that turns a job's outcome into JobDone / JobFailed for the core."""
        token = cmd.token

        def done(output: Any, error: str | None) -> None:
            if error is not None:
                self.on_event(JobFailed(token, error))
                return
            for line in output.logs:
                self.emit_log(cmd.task_id, line)
            if kind in ("init", "train"):
                # A model to hash and store: off the event path (two passes over it).
                self.io.run_blocking(
                    lambda: self._job_result(cmd.task_id, kind, output.result), finish
                )
                return
            try:
                result = self._job_result(cmd.task_id, kind, output.result)
            except Exception as exc:
                finish(None, exc)
                return
            finish(result, None)

        def finish(result: Any, exc: BaseException | None) -> None:
            if exc is not None:  # a task returned something we cannot use
                self.on_event(JobFailed(token, f"{type(exc).__name__}: {exc}"))
                return
            if kind == "train" and cmd.job.get("round") == 1:
                self.charge_usage(cmd.task_id, int(result.get("num_samples", 0)))
            self.on_event(JobDone(token, result))

        return done

    def running_specs(self) -> dict[str, Any]:
        """Tasks with a live worker here (a task's spec goes when it ends for us)."""
        return self._specs

    def records_ledger(self) -> Any:
        """This node's RecordsLedger (which records each taskpack processed), or None."""
        if self._records is None and self.local_dir is not None:
            from p2pfl.store.local_runs import RecordsLedger

            self._records = RecordsLedger(self.local_dir)
        return self._records

    def charge_usage(self, task_id: str, records: int) -> None:
        if self.usage_sink is not None:
            self.usage_sink(task_id, records)

    def _close_task(self, task_id: str) -> None:
        """The task is over for this node: end its worker and wipe its temp dir."""
        if self._specs.pop(task_id, None) is not None:
            self.io.close_task(task_id, self.me)

    def _job_result(self, task_id: str, kind: str, result: Any) -> Any:
        """Blobs out of jobs go to the store; the core sees only their refs."""
        if kind == "init":
            return self.put_blob(result) if result else None
        if kind == "train":
            update = result.update
            if update is not None and self.update_hook is not None:
                update = self.update_hook(task_id, update)
            return {
                "ref": self.put_blob(update) if update is not None else None,
                "num_samples": result.num_samples,
                "metrics": dict(result.metrics or {}),
                "aggregates": dict(result.aggregates or {}),
            }
        if kind == "finalize":
            return self._release(task_id, result)
        if kind == "reduce":
            machine = self.core.tasks.get(task_id)
            run = getattr(machine.offer, "run", None) if machine is not None else None
            if isinstance(run, dict) and run.get("test_run"):
                # Marked in the signed result: nobody mistakes a trial for the real run.
                result = {**result, "test_run": int(run["test_run"])}
        if kind == "transform":
            return self._store_derived(task_id, result)
        return result

    def _release(self, task_id: str, partial: Any) -> Any:
        """What an analysis partial may release, decided here, by the node that holds the
        data (p2pfl/policy/release.py): numbers under k suppressed, extremes only where the
        policy allows, DP noise from a CSPRNG where it asks; recorded in the audit log."""
        import dataclasses

        from p2pfl.policy import filter_release, released_epsilon

        machine = self.core.tasks.get(task_id)
        decision = machine.decision if machine is not None else None
        if decision is None or machine is None or machine.offer.type == "training":
            return partial
        rules = decision.release_rules()
        aggregates, notes = filter_release(dict(partial.aggregates or {}), rules)
        metrics, more = filter_release(dict(partial.metrics or {}), rules)
        spent = released_epsilon(aggregates) + released_epsilon(metrics)
        inputs = tuple(machine.offer.inputs)
        if spent > 0:
            self.execute([ChargePrivacy(task_id, inputs, spent)])
            for name in inputs:
                self.core.privacy_spent[name] = self.core.privacy_spent.get(name, 0.0) + spent
        size = len(encode_json(aggregates)) + len(encode_json(metrics))
        fields = {"task": task_id, "round": 1, "what": "partial", "bytes": size}
        self.execute([Audit("release", {**fields, "dp_spend": spent, "notes": notes + more})])
        return dataclasses.replace(partial, aggregates=aggregates, metrics=metrics)

    def emit_log(
        self, task_id: str, line: str, kind: str = "log", metrics: dict[str, Any] | None = None
    ) -> None:
        """A line for this task's followers on this node (the task's logs, batch progress)."""
        event = {
            "t": self.io.now(),
            "kind": kind,
            "task_id": task_id,
            "peer": self.me,
            "round": None,
            "message": line,
            "metrics": dict(metrics or {}),
        }
        for listener in list(self.listeners):
            listener(event)

    # --- aggregation ----------------------------------------------------------------------

    def _aggregate(self, cmd: Aggregate) -> None:
        store = self.store

        def work() -> tuple[BlobRef, tuple[tuple[str, str], ...]]:
            from p2pfl.fl.aggregate import aggregate_checked

            data, dropped = aggregate_checked(
                cmd.method,
                [
                    (ref.cid, store.get(ref.cid), w)
                    for ref, w in zip(cmd.refs, cmd.weights, strict=True)
                ],
                reference=store.get(cmd.reference.cid) if cmd.reference is not None else None,
                max_norm=cmd.max_norm,
                options=cmd.options,
            )
            # Hashed and stored here, with the work (in a worker thread when it is big).
            return self.put_blob(data), dropped

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None:
                self.on_event(Aggregated(cmd.token, None, f"{type(error).__name__}: {error}"))
                return
            ref, dropped = result
            self.on_event(Aggregated(cmd.token, ref, dropped=dropped))

        self._run_work(sum(ref.size for ref in cmd.refs), work, done)

    def _slice_work(self, cmd: SliceWork) -> None:
        """Reduce-scatter steps (cut, reduce, assemble, sketches: fl/slices.py); see
        INLINE_WORK_BYTES for where they run."""
        store = self.store

        def work() -> tuple[tuple[BlobRef, ...], int, str, int, tuple[float, ...]]:
            from p2pfl.fl.slices import slice_work

            blobs, bad, reason, chosen, values = slice_work(
                cmd.token.kind,
                [store.get(ref.cid) for ref in cmd.refs],
                store.get(cmd.reference.cid),
                cmd.count,
                cmd.token.index,
                cmd.method,
                cmd.weights,
                cmd.options,
            )
            # Hashed and stored here, with the work (a cut makes n blobs).
            refs = tuple(self.put_blob(data, whole=True) for data in blobs)
            return refs, bad, reason, chosen, values

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None:
                self.on_event(SliceWorked(cmd.token, (), f"{type(error).__name__}: {error}"))
                return
            refs, bad, reason, chosen, values = result
            self.on_event(SliceWorked(cmd.token, refs, reason, bad, chosen, values))

        self._run_work(sum(ref.size for ref in cmd.refs), work, done)

    def _run_work(
        self,
        size: int,
        work: Callable[[], Any],
        done: Callable[[Any, BaseException | None], None],
    ) -> None:
        """`work` on `size` input bytes: here when small (INLINE_WORK_BYTES), else in a
        worker thread. Either way `done` runs later, from the loop: never inside the
        command that asked for the work (the core is not re-entered)."""
        if size > INLINE_WORK_BYTES:
            self.io.run_blocking(work, done)
            return
        try:
            result, error = work(), None
        except Exception as exc:  # delivered to `done`, as from a worker thread
            result, error = None, exc
        self.io.call_soon(lambda: done(result, error))

    # --- views ----------------------------------------------------------------------------

    def fetch_progress(self) -> dict[str, tuple[int, int]]:
        return {cid: f.progress() for cid, f in self._fetches.items()}


def parse_window(text: str) -> float:
    """`volunteer_window_s` from the command line: seconds in (0, MAX_WINDOW_S]."""
    from p2pfl.core.offer import MAX_WINDOW_S

    try:
        value = float(text)
    except ValueError:
        raise LocalProtocolError(f"volunteer_window_s: {text!r} is not a number") from None
    if not 0 < value <= MAX_WINDOW_S:
        raise LocalProtocolError(f"volunteer_window_s: {value:g} is not in (0, {MAX_WINDOW_S:g}]")
    return value


def parse_run_options(raw: dict[str, str]) -> dict[str, Any] | None:
    """The offer's `run` field from `run.*` overrides (strings from the command line)."""
    from p2pfl.runtime.batching import DEFAULT_TEST_RUN, run_options_problem

    unknown = sorted(set(raw) - {"test_run", "new_data_only", "rerun_failed"})
    if unknown:
        raise LocalProtocolError(
            f"run.{unknown[0]}: unknown run option (test_run, new_data_only, rerun_failed)"
        )
    out: dict[str, Any] = {}
    for key, text in raw.items():
        value = str(text).strip().lower()
        if key == "test_run":
            if value in ("", "true"):
                out[key] = DEFAULT_TEST_RUN
                continue
            try:
                out[key] = int(value)
            except ValueError:
                raise LocalProtocolError(f"run.test_run: {text!r} is not a number") from None
        elif value in ("true", "1", "yes"):
            out[key] = True
        elif value not in ("false", "0", "no"):
            raise LocalProtocolError(f"run.{key}: {text!r} is not true or false")
    problem = run_options_problem(out or None)
    if problem is not None:
        raise LocalProtocolError(problem)
    return out or None


def _least(a: Any, b: Any) -> Any:
    """The smaller of two optional limits (None: no limit from that side)."""
    present = [v for v in (a, b) if v is not None]
    return min(present) if present else None


def encode_json(value: Any) -> bytes:
    import json

    return json.dumps(value, sort_keys=True, default=str).encode()


def unpack_atomic(archive: bytes, dest: Path, unpack: Callable[[bytes, Path], Any]) -> None:
    """Unpack into a temporary sibling, then rename: a half-unpacked taskpack never exists
    under its final name (and concurrent unpacks of the same cid are harmless)."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        unpack(archive, tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
