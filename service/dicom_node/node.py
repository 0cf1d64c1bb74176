"""The DICOM node at work: durable intake, the pipeline for each job, deliveries, purging.

Intake runs in pynetdicom's association threads; everything else on the event loop of the process
that serves the API (or of `python -m service.dicom_node` alone), through the same decode pool,
intended-use gate and batcher as HTTP requests. The job database, not memory, says what is left to
do: one scheduler loop reads what is due (queued jobs, pending deliveries whose backoff expired) and
starts it, so a restart, a replay from another process or the end of a backoff need no other path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from service.dicom.status import OUT_OF_RESOURCES, SUCCESS
from service.dicom_node.destinations import Outgoing, make_sender
from service.dicom_node.intake import Refusal, check_instance, result_allowance
from service.dicom_node.jobs import UNFINISHED, Delivery, JobStore, NewJob, backoff_delay, kinds
from service.dicom_node.scp import StoreAnswer, start_server
from service.dicom_node.spool import Spool, SpoolFull, new_job_id
from service.errors import ApiError, NotReady
from service.inference.predictor import predict_instance
from service.inference.state import ServingState
from service.metrics import NodeMetrics
from service.settings import Settings
from service.viewer_outputs import quiet_identifying_loggers
from service.viewer_outputs.render import DICOM_OUTPUTS, NEEDS_DISPLAY, NEEDS_HEATMAPS, render

log = logging.getLogger("service.dicom_node")

# Errors of a pipeline that is there but busy or not loaded: worth another try later.
TRANSIENT_ERRORS = {"overloaded", "not_ready", "request_timeout", "decode_timeout"}
POLL_S = 1.0  # longest the scheduler sleeps: how soon a replay from another process is noticed
HOUSEKEEPING_S = 5.0
DELIVERY_BATCH = 32


def result_kinds(settings: Settings) -> tuple[str, ...]:
    """Every result kind some destination wants, in a stable order."""
    wanted = {kind for destination in settings.dicom_destinations for kind in destination.outputs}
    return tuple(kind for kind in ("sr", "gsps", "sc") if kind in wanted)


class DicomNode:
    def __init__(self, settings: Settings, state: ServingState, metrics: NodeMetrics) -> None:
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.spool = Spool(settings.dicom_spool_dir, settings.dicom_spool_max_bytes)
        self.store = JobStore(self.spool.database)
        self.spool.account(self.store.stored_bytes())
        self.outputs = result_kinds(settings)
        self.destinations = {destination.label: destination for destination in settings.dicom_destinations}
        if len(self.destinations) != len(settings.dicom_destinations):
            raise ValueError("two CXR_DICOM_DESTINATIONS have the same label; give them distinct `name`s")
        self.senders = {label: make_sender(d, settings) for label, d in self.destinations.items()}
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task | None = None
        self._processing: dict[str, asyncio.Task] = {}
        self._delivering: dict[str, asyncio.Task] = {}
        self._last_housekeeping = 0.0

    # Lifecycle ------------------------------------------------------------------------------------

    async def start(self, host: str) -> None:
        self._check_outputs_renderable()
        # pynetdicom's INFO and DEBUG lines print UIDs and the datasets' summaries: not in this service's log.
        logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger("pynetdicom").level))
        quiet_identifying_loggers()  # also when the node runs alone
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._scheduler = self._loop.create_task(self._schedule(), name="dicom-node-scheduler")
        self._server = await asyncio.to_thread(start_server, self.settings, host, self.intake)
        bound = self._server.server_address
        log.info(
            "DICOM node %s listening on %s:%d; spool %s (%d of %d bytes used); destinations: %s",
            self.settings.dicom_ae_title,
            bound[0],
            bound[1],
            self.spool.root,
            self.spool.used_bytes,
            self.spool.max_bytes,
            ", ".join(f"{label} {'+'.join(d.outputs)}" for label, d in self.destinations.items()) or "none",
        )
        if not self.destinations:
            log.warning("no CXR_DICOM_DESTINATIONS: received images are processed but their results go nowhere")

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    async def stop(self) -> None:
        """Stop listening, then let work in progress end; what is unfinished resumes at the next start."""
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
        tasks = [self._scheduler, *self._processing.values(), *self._delivering.values()]
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for sender in self.senders.values():
            if hasattr(sender, "close"):
                await sender.close()
        self.store.close()

    def _check_outputs_renderable(self) -> None:
        missing = [kind for kind in self.outputs if kind not in DICOM_OUTPUTS]
        if missing:
            raise ValueError(f"CXR_DICOM_DESTINATIONS asks for {', '.join(missing)}, which this version cannot render")
        pack = self.state.pack
        if any(kind in NEEDS_HEATMAPS for kind in self.outputs) and pack is not None and not pack.has_heatmaps:
            raise ValueError(
                f"CXR_DICOM_DESTINATIONS asks for seg (the heatmap Segmentation), but the classifier of pack "
                f"{pack.name} {pack.version} has no heatmaps output (add it: python -m training.heatmaps)"
            )

    # Intake (association threads) -----------------------------------------------------------------

    def intake(self, data: bytes, sop_class: str, calling_ae: str) -> StoreAnswer:
        """Spool one received instance durably and record its job; the C-STORE answer."""
        if not self.state.ready:
            self.metrics.received.labels("refused_not_ready").inc()
            return OUT_OF_RESOURCES, "not_ready"
        try:
            accepted = check_instance(data, sop_class, self.settings.decode_limits, self.settings.image_id_hash)
        except Refusal as refusal:
            self.metrics.received.labels(f"refused_{refusal.reason}").inc()
            log.info("C-STORE from %s refused: %s (status 0x%04X)", calling_ae, refusal.reason, refusal.status)
            return refusal.status, refusal.reason
        if self.store.spooled_job_with_content(accepted.content_sha256) is not None:
            # The same bytes again (a sender retrying after a lost answer): already durable, already queued.
            self.metrics.received.labels("duplicate").inc()
            return SUCCESS, None
        allowance = result_allowance(self.outputs, accepted.rows, accepted.columns, len(self.state.pack.global_labels))
        try:
            self.spool.reserve(len(data) + allowance)
        except SpoolFull:
            self.metrics.received.labels("refused_spool_full").inc()
            log.warning("C-STORE from %s refused: spool full (%d bytes used)", calling_ae, self.spool.used_bytes)
            return OUT_OF_RESOURCES, "spool_full"
        job_id = new_job_id()
        try:
            self.spool.write(self.spool.instance_path(job_id), data)
            self.store.add(
                NewJob(
                    id=job_id,
                    image_id=accepted.image_id,
                    content_sha256=accepted.content_sha256,
                    calling_ae=calling_ae,
                    outputs=self.outputs,
                    instance_bytes=len(data),
                    result_allowance=allowance,
                    deliveries=tuple((label, d.outputs) for label, d in self.destinations.items()),
                )
            )
        except Exception as exc:  # disk full, I/O error: never acknowledge what is not durable
            self.spool.purge(job_id)
            self.spool.release(len(data) + allowance)
            self.metrics.received.labels("refused_spool_error").inc()
            log.error("C-STORE from %s refused: spooling failed (%s)", calling_ae, type(exc).__name__)
            return OUT_OF_RESOURCES, "spool_error"
        self.metrics.received.labels("accepted").inc()
        log.info("job %s received from %s image_id=%s", job_id, calling_ae, accepted.image_id)
        self._loop.call_soon_threadsafe(self._wake.set)
        return SUCCESS, None

    # Scheduling -----------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            try:
                await self._start_due_work()
                await self._housekeeping()
                next_due = await asyncio.to_thread(self.store.next_due_at)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("DICOM node scheduler error; retrying")
                next_due = None
            sleep = POLL_S if next_due is None else min(POLL_S, max(0.02, next_due - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)
            self._wake.clear()

    async def _start_due_work(self) -> None:
        now = time.time()
        free = self.settings.dicom_workers - len(self._processing)
        if free > 0:
            for row in await asyncio.to_thread(self.store.due_jobs, now, free, list(self._processing)):
                task = self._loop.create_task(self._process(row["id"], kinds(row["outputs"])))
                self._processing[row["id"]] = task
                task.add_done_callback(lambda _, job_id=row["id"]: self._done(self._processing, job_id))
        for label in await asyncio.to_thread(self.store.destinations_with_due, now):
            if label in self._delivering:
                continue
            if label not in self.senders:
                continue  # a destination removed from the configuration: its deliveries wait (replayable)
            task = self._loop.create_task(self._deliver(label))
            self._delivering[label] = task
            task.add_done_callback(lambda _, label=label: self._done(self._delivering, label))

    def _done(self, running: dict[str, asyncio.Task], key: str) -> None:
        running.pop(key, None)
        self._wake.set()  # a slot is free: look for more work now

    # Processing -----------------------------------------------------------------------------------

    async def _process(self, job_id: str, outputs: tuple[str, ...]) -> None:
        try:
            body = await asyncio.to_thread(self.spool.read_instance, job_id)
            if not self.state.ready:
                raise NotReady("the model pack is not loaded")  # retried below, as HTTP clients retry a 503
            keep_display = any(kind in NEEDS_DISPLAY for kind in outputs)  # a burned-in result is drawn on it
            prediction, prepared = await predict_instance(
                body,
                self.state,
                self.settings,
                f"dicom-{job_id[:12]}",
                keep_display=keep_display,
                include_heatmaps=any(kind in NEEDS_HEATMAPS for kind in outputs),
            )
            del body
            written = await asyncio.to_thread(self._write_results, job_id, outputs, prepared, prediction)
        except asyncio.CancelledError:
            raise
        except ApiError as error:
            await self._processing_failed(job_id, error.code, transient=error.code in TRANSIENT_ERRORS)
            return
        except Exception as exc:  # a bug or an I/O error: retried, then dead-lettered for a person to look at
            log.error("job %s: pipeline error %s", job_id, type(exc).__name__)
            await self._processing_failed(job_id, f"internal_error:{type(exc).__name__}", transient=True)
            return
        delta = await asyncio.to_thread(self.store.mark_processed, job_id, written)
        if delta > 0:
            self.spool.account(delta)
        else:
            self.spool.release(-delta)
        self.metrics.processed.inc()
        log.info("job %s processed: %d finding(s), %d result bytes", job_id, len(prediction["findings"]), written)

    def _write_results(self, job_id: str, outputs: tuple[str, ...], prepared, prediction: dict) -> int:
        written = 0
        for kind in outputs:
            content, _ = render(kind, prepared, prediction)
            self.spool.write(self.spool.result_path(job_id, kind), content)
            written += len(content)
        return written

    async def _processing_failed(self, job_id: str, code: str, transient: bool) -> None:
        if not transient:
            await asyncio.to_thread(self.store.mark_failed, job_id, code)
            self.metrics.failed.labels(code).inc()
            log.info("job %s failed: %s", job_id, code)
            return
        attempts = await asyncio.to_thread(self.store.job_attempts, job_id)
        delay = backoff_delay(attempts + 1, self.settings.dicom_backoff_base_s, self.settings.dicom_backoff_max_s)
        state = await asyncio.to_thread(
            self.store.retry_processing, job_id, code, delay, self.settings.dicom_max_attempts
        )
        if state == "dead":
            self.metrics.dead_lettered.labels("pipeline").inc()
            log.warning("job %s dead-lettered after %d pipeline tries: %s", job_id, attempts + 1, code)
        else:
            log.info("job %s: pipeline unavailable (%s); retry in %.1f s", job_id, code, delay)

    # Delivery -------------------------------------------------------------------------------------

    async def _deliver(self, label: str) -> None:
        sender = self.senders[label]
        while True:
            batch: list[Delivery] = await asyncio.to_thread(
                self.store.due_deliveries, label, time.time(), DELIVERY_BATCH
            )
            if not batch:
                return
            outgoing = [
                Outgoing(d.job_id, tuple(self.spool.result_path(d.job_id, kind) for kind in d.outputs)) for d in batch
            ]
            # Results of a job always exist once it is processed, unless someone deleted spool files by hand.
            ready = [item for item in outgoing if all(path.is_file() for path in item.files)]
            try:
                outcomes = await sender.send(ready) if ready else {}
            except Exception as exc:  # a bug in a sender must not stop deliveries, nor retry in a tight loop
                log.error("delivery to %s: sender error %s", label, type(exc).__name__)
                outcomes = dict.fromkeys((item.job_id for item in ready), f"sender_error:{type(exc).__name__}")
            for delivery in batch:
                await self._record_delivery(delivery, outcomes.get(delivery.job_id, "results_missing"))

    async def _record_delivery(self, delivery: Delivery, error: str | None) -> None:
        label = delivery.destination
        if error is None:
            job_state = await asyncio.to_thread(self.store.mark_delivered, delivery.job_id, label)
            self.metrics.delivered.labels(label).inc()
            if job_state == "delivered":
                self.metrics.time_to_result_s.observe(time.time() - delivery.received_at)
                log.info("job %s delivered", delivery.job_id)
            return
        self.metrics.delivery_failures.labels(label).inc()
        delay = backoff_delay(
            delivery.attempts + 1, self.settings.dicom_backoff_base_s, self.settings.dicom_backoff_max_s
        )
        state, _ = await asyncio.to_thread(
            self.store.retry_delivery, delivery.job_id, label, error, delay, self.settings.dicom_max_attempts
        )
        if state == "dead":
            self.metrics.dead_lettered.labels("delivery").inc()
            log.warning(
                "job %s: delivery to %s dead-lettered after %d tries: %s",
                delivery.job_id,
                label,
                delivery.attempts + 1,
                error,
            )
        else:
            log.info("job %s: delivery to %s failed (%s); retry in %.1f s", delivery.job_id, label, error, delay)

    # Housekeeping ---------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        now = time.time()
        if now - self._last_housekeeping < HOUSEKEEPING_S:
            return
        self._last_housekeeping = now
        await asyncio.to_thread(self.purge, now)
        await asyncio.to_thread(self.refresh_gauges, now)

    def purge(self, now: float) -> None:
        """Purge delivered and failed jobs' files after the retention time, and forget old job rows."""
        for row in self.store.purgeable(now - self.settings.dicom_retention_s):
            self.spool.purge(row["id"])
            self.store.mark_purged(row["id"])
            self.spool.release(row["instance_bytes"] + row["result_bytes"])
        self.store.forget(now - self.settings.dicom_job_history_s)

    def refresh_gauges(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        counts = self.store.counts()
        for state in ("queued", "processed", "delivered", "failed", "dead"):
            self.metrics.jobs.labels(state).set(counts.get(state, 0))
        self.metrics.queued.set(sum(counts.get(state, 0) for state in UNFINISHED))
        oldest = self.store.oldest_unfinished_received_at()
        self.metrics.queue_age_s.set(0 if oldest is None else max(0.0, now - oldest))


def spool_database(spool_dir: Path) -> Path:
    """Where the job database of a spool folder lives (for the replay and jobs commands)."""
    return spool_dir.expanduser().resolve() / "jobs.sqlite3"
