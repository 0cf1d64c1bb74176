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
