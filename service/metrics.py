"""Prometheus metrics of one service instance (a registry per app, so tests can build many apps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Milliseconds: decode of a 1643x1349 JPEG 2000 is ~270 ms on one core, a GPU batch a few ms.
_STAGE_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
STAGES = ("decode", "preprocess", "queue", "inference", "postprocess", "total")


@dataclass
class ServiceMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.stage_ms = Histogram(
            "cxr_stage_duration_ms",
            "Time per pipeline stage for one image (ms)",
            ["stage"],
            buckets=_STAGE_BUCKETS_MS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cxr_inference_batch_size",
            "Images per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.images = Counter("cxr_images_predicted", "Images answered with a prediction", registry=self.registry)
        self.errors = Counter(
            "cxr_errors",
            "Requests or instances refused or failed, by error code and HTTP status",
            ["code", "status"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cxr_inference_queue_depth", "Images waiting for an inference batch", registry=self.registry
        )
        self.decode_waiting = Gauge("cxr_decode_waiting", "Images waiting for or in decoding", registry=self.registry)
        self.decode_workers_replaced = Counter(
            "cxr_decode_workers_replaced",
            "Decode worker pools replaced after a timeout or a crashed worker",
            registry=self.registry,
        )
        self.ready = Gauge("cxr_ready", "1 when the model pack is loaded and warmed up", registry=self.registry)

    def observe_prediction(self, timing_ms: dict[str, float], batch_size: int) -> None:
        for stage in STAGES:
            if stage in timing_ms:
                self.stage_ms.labels(stage).observe(timing_ms[stage])
        self.batch_size.observe(batch_size)
        self.images.inc()

    def observe_error(self, code: str, status: int) -> None:
        self.errors.labels(code, str(status)).inc()


@dataclass
class NodeMetrics:
    """The DICOM node's counters (service/dicom_node), in the service's registry so /metrics shows both."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        self.received = Counter(
            "cxr_dicom_received",
            "C-STORE requests answered by the node, by outcome (accepted, duplicate, refused_*)",
            ["outcome"],
            registry=self.registry,
        )
        self.jobs = Gauge("cxr_dicom_jobs", "Jobs in the node's database, by state", ["state"], registry=self.registry)
        self.queued = Gauge(
            "cxr_dicom_queued",
            "Jobs not finished yet: waiting for the pipeline or for a delivery",
            registry=self.registry,
        )
        self.queue_age_s = Gauge(
            "cxr_dicom_queue_age_seconds",
            "Age of the oldest unfinished job (0 when none)",
            registry=self.registry,
        )
        self.processed = Counter(
            "cxr_dicom_processed", "Jobs through the pipeline, results rendered", registry=self.registry
        )
        self.failed = Counter(
            "cxr_dicom_failed",
            "Jobs the pipeline refused (unusable image, outside the intended use), by error code",
            ["code"],
            registry=self.registry,
        )
        self.delivered = Counter(
            "cxr_dicom_delivered", "Results delivered, by destination", ["destination"], registry=self.registry
        )
        self.delivery_failures = Counter(
            "cxr_dicom_delivery_failures",
            "Failed delivery tries (retried later or dead-lettered), by destination",
            ["destination"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "cxr_dicom_dead_lettered",
            "Jobs or deliveries given up after the last try (replayable), by stage",
            ["stage"],
            registry=self.registry,
        )
        self.time_to_result_s = Histogram(
            "cxr_dicom_time_to_result_seconds",
            "From the C-STORE acknowledgement to the last destination's confirmation",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
            registry=self.registry,
        )
