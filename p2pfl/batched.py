"""A batched task's one execution on this node, carried out by the driver.

The core asks for one "train" job of an inference task, as for any one-shot task. The driver hands it to `BatchedJob`, which

1. asks the task for its records (`Plan`); a task that is not batched runs as before;
2. picks what to run (p2pfl.runtime.batching: test run, new data only, failed only);
3. runs one `RunBatch` job after another, retrying a failed record once on its own, and
   after each batch shows "batch i/N" and the records done in the trace (here, and to the
   task's publisher as a Progress message);
4. keeps everything per record on this node: the inference report
   (DATA_DIR/reports/TASK.csv), and which records were processed or failed
   (DATA_DIR/records.json);
5. answers the core with aggregates only (class counts, mean score, record counts), which
   the node's release filter then checks against its k before anything leaves.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from p2pfl.core.commands import JobDone, JobFailed, RunJob, Send
from p2pfl.core.messages import Progress
from p2pfl.errors import P2PFLError
from p2pfl.runtime.batching import Batch, BatchRun, run_options
from p2pfl.taskpack import sdk

if TYPE_CHECKING:
    from p2pfl.driver import Driver

log = logging.getLogger("p2pfl.node")

BATCHED_TYPES = ("inference",)  # preprocessing: the flows design (Transform, p2pfl.data)
_CID = re.compile(r"^b[a-z2-7]{20,120}$")  # a CIDv1 in base32, as the store names blobs


class BatchedJob:
    def __init__(self, driver: Driver, cmd: RunJob, spec: Any) -> None:
        self.driver = driver
        self.cmd = cmd
        self.spec = spec
        self.task_id = cmd.task_id
        machine = driver.core.tasks[cmd.task_id]
        self.offer = machine.offer
        self.options = run_options(getattr(self.offer, "run", None))
        self.params: dict[str, Any] = dict(spec.params)
        self.dataset = self.offer.inputs[0] if self.offer.inputs else ""
        self.run: BatchRun | None = None
        self.weights: bytes | None = None

    # --- steps --------------------------------------------------------------------------

    def start(self) -> None:
        from p2pfl import runtime as rt

        ref = self.cmd.job.get("weights")
        try:
            # A flow step names its model by ref (the core fetched it); else params.model_cid.
            self.weights = self.driver.blob_bytes(ref) if ref is not None else self._model_bytes()
        except ValueError as exc:
            self._fail(str(exc))
            return
        self.driver.io.run_job(self.spec, rt.Plan(), self._planned)

    def _planned(self, output: Any, error: str | None) -> None:
        from p2pfl import runtime as rt
        from p2pfl.runtime.protocol import check_plan

        if error is not None:
            self._fail(f"listing records: {error}")
            return
        self._logs(output.logs)
        try:
            records = check_plan(output.result)
        except TypeError as exc:
            self._fail(f"listing records: {exc}")
            return
        if records is None:  # not a batched task: one execution, as any one-shot task
            if getattr(self.offer, "run", None):
                self._fail("run options (test run, new data only) need a batched task")
                return
            job = rt.Train(int(self.cmd.job.get("round", 1)), self.weights)
            self.driver.io.run_job(self.spec, job, self.driver.job_done(self.cmd, "train"))
            return
        try:
            ledger = self.driver.records_ledger()
        except P2PFLError as exc:
            self._fail(str(exc))
            return
        name = self.offer.name
        self.run = BatchRun(
            records,
            self.options,
            processed=ledger.processed(name, self.dataset) if ledger else {},
            failed_before=ledger.failed(name, self.dataset) if ledger else {},
            batch_size=int(self.params.get("batch_size", 32) or 32),
        )
        what = [f"{len(self.run.selected)} of {len(records)} records"]
        if self.options.test_run is not None:
            what.append(f"test run (at most {self.options.test_run})")
        if self.options.new_data_only:
            what.append("new data only")
        if self.options.rerun_failed:
            what.append("failed records only")
        self._progress(f"batched run: {', '.join(what)}")
        self._next()

    def _next(self) -> None:
        from p2pfl import runtime as rt

        assert self.run is not None
        if self.task_id not in self.driver.running_specs():
            return  # the task ended here meanwhile (cancelled, withdrawn): stop quietly
        batch = self.run.next_batch()
        if batch is None:
            self._finish()
            return
        job = rt.RunBatch(batch.index, self.run.total, list(batch.keys), self.weights)

        def done(output: Any, error: str | None) -> None:
            self._batch_done(batch, output, error)

        self.driver.io.run_job(self.spec, job, done)

    def _batch_done(self, batch: Batch, output: Any, error: str | None) -> None:
        from p2pfl.runtime.protocol import check_batch

        assert self.run is not None
        if error is None:
            self._logs(output.logs)
            try:
                result = check_batch(output.result)
            except TypeError as exc:
                error = str(exc)
        if error is not None:
            self.run.on_error(batch, error)
        else:
            self.run.on_result(batch, result["rows"], result["failed"])
        p = self.run.progress()
        self._progress(
            f"batch {p['batch']}/{p['batches']}: {p['records_done']}/{p['records']} records done"
            + (f", {p['records_failed']} failed" if p["records_failed"] else ""),
            p,
        )
        self.driver.io.call_soon(self._next)

    def _finish(self) -> None:
        assert self.run is not None
        run = self.run
        test = self.options.test_run is not None
        local = self.driver.local_dir
        meta = {
            "taskpack": self.offer.name,
            "version": self.offer.version,
            "dataset": self.dataset,
            "type": self.offer.type,
            "created": self.driver.io.now(),
            "test_run": test,
            "records": len(run.done),
            "failed": dict(sorted(run.failed.items())),
            "skipped": run.skipped,
        }
        try:
            if local is not None:
                from p2pfl.store.local_runs import write_report

                meta["report"] = str(write_report(local, self.task_id, run.rows, meta))
            ledger = self.driver.records_ledger()
            if ledger is not None:
                ledger.record_run(
                    self.offer.name,
                    self.dataset,
                    task_id=self.task_id,
                    when=self.driver.io.now(),
                    done=run.done,
                    failed=run.failed,
                    test_run=test,
                )
        except (OSError, P2PFLError) as exc:
            self._fail(f"keeping the run's outputs: {exc}")
            return
        for key, why in sorted(run.failed.items())[:20]:
            self.driver.emit_log(self.task_id, f"record {key} failed twice: {why}")
        self.driver.charge_usage(self.task_id, len(run.done))
        result = {
            "ref": None,
            "num_samples": len(run.done),
            "metrics": {},
            "aggregates": inference_aggregates(run),
        }
        self.driver.on_event(JobDone(self.cmd.token, result))

    # --- outputs ------------------------------------------------------------------------

    def _model_bytes(self) -> bytes | None:
        """The model named by params["model_cid"] (an earlier task's result), from this
        node's store; None when the taskpack bundles its own."""
        cid = self.params.get("model_cid")
        if cid in (None, ""):
            return None
        if not isinstance(cid, str) or not _CID.match(cid):
            raise ValueError(f"model_cid {str(cid)[:80]!r} is not a content id")
        store = self.driver.store
        if not store.has(cid):
            raise ValueError(
                f"model {cid[:16]}... is not on this node (it took no part in the task that "
                "made it); run inference where the model was trained, or bundle it"
            )
        return bytes(store.get(cid))

    # --- reporting ----------------------------------------------------------------------

    def _logs(self, lines: list[str]) -> None:
        for line in lines:
            self.driver.emit_log(self.task_id, line)

    def _progress(self, message: str, numbers: dict[str, Any] | None = None) -> None:
        self.driver.emit_log(self.task_id, message, kind="node", metrics=numbers or {})
        if numbers:
            state = f"batch {numbers['batch']}/{numbers['batches']}"[:32]
            progress = Progress(self.task_id, self.driver.me, 1, state, dict(numbers))
            if self.offer.publisher != self.driver.me:
                self.driver.execute([Send(self.offer.publisher, progress)])

    def _fail(self, reason: str) -> None:
        self.driver.on_event(JobFailed(self.cmd.token, reason))


def inference_aggregates(run: BatchRun) -> dict[str, Any]:
    """What a batched run may release (only after the node's release filter checks it):
    records done and failed, records per predicted class, the mean score (each score is in
    [0, 1], so 1 bounds what one record adds)."""
    out: dict[str, Any] = {
        "records": sdk.count(len(run.done)),
        "failed": sdk.count(len(run.failed)),
    }
    counts = Counter(str(r.get("prediction", "")) for r in run.rows)
    scores = [float(r["score"]) for r in run.rows if isinstance(r.get("score"), int | float)]
    out["predictions"] = sdk.groups(dict(counts))
    if scores:
        out["mean_score"] = sdk.mean(sum(scores) / len(scores), len(scores), bound=1.0)
    return out
