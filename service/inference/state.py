"""What the service holds while it runs: the verified pack, its sessions and the batcher."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.dicom.decode_pool import DecodePool
from service.inference.batcher import Batcher
from service.inference.modelpack import ModelPack, OnnxModels, PackError
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger(__name__)


class Watcher(Protocol):
    """Background work beside the batcher, started and stopped with it (remote models' readiness checks)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# Why the service is not ready, as /readyz tells anyone who asks: a short code, never a path or exception text
# (those reach only the log, through ServingState.mark_not_ready).
NOT_READY_REASONS = {
    "starting": "the model pack is being loaded and warmed up",
    "pack_rejected": "the model pack failed verification (missing manifest or file, changed sha256, bad manifest)",
    "pack_unloadable": "ONNX Runtime could not load or run the model pack",
    "provider_fallback": "the preferred execution provider is unusable and CXR_STRICT_PROVIDERS is on",
    # The inference server: --workers N's shared one, or the KServe v2 server of CXR_INFERENCE_URL.
    "inference_server_connecting": "connecting to the inference server",
    "inference_server_unavailable": "the inference server is not running or stopped answering",
    "inference_server_not_ready": "the inference server is up but its models are not ready",
    "inference_server_mismatch": "the inference server serves another pack or speaks another protocol",
}


@dataclass
class ServingState:
    pack: ModelPack | None = None
    models: OnnxModels | None = None  # or a stand-in with the same run(): remote models, the inference server's
    batcher: Batcher | None = None
    decoder: DecodePool | None = None
    metrics: ServiceMetrics | None = None
    watcher: Watcher | None = None
    not_ready_reason: str = "starting"  # a key of NOT_READY_REASONS, or "" once ready
    started: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.not_ready_reason == ""

    async def start(self) -> None:
        """Start the batcher's worker and the watcher, on the event loop that serves requests."""
        if self.batcher is not None:
            self.batcher.start()
        if self.watcher is not None:
            await self.watcher.start()

    async def stop(self) -> None:
        """Stop them (requests still queued get 503) and the decode pool."""
        if self.batcher is not None:
            await self.batcher.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.decoder is not None:
            self.decoder.close()

    def mark_not_ready(self, reason: str, detail: str) -> None:
        """Unready with a reason code for /readyz; the detail (paths, exception text) only goes to the log."""
        if reason not in NOT_READY_REASONS:
            raise ValueError(f"unknown not-ready reason {reason!r}")
        log.error("not ready (%s): %s", reason, detail)
        self.not_ready_reason = reason


def warm_up(models: OnnxModels, sizes: list[int], max_batch_size: int) -> None:
    """Run every batch shape once so no request pays for first-run allocation or kernel tuning."""
    for batch in range(1, max_batch_size + 1):
        models.run(*(np.zeros((batch, 1, size, size), dtype=np.float32) for size in sizes))


def load_serving_state(settings: Settings, metrics: ServiceMetrics | None = None) -> ServingState:
    """Verify and load the pack; on failure the state says why and the service stays unready."""
    state = ServingState(metrics=metrics)
    try:
        state.pack = ModelPack.load(settings.models)
        state.models = OnnxModels(state.pack, settings=settings)
        if settings.strict_providers and state.models.runtime.fallback:
            state.mark_not_ready(
                "provider_fallback", f"{state.models.runtime.fallback}, and CXR_STRICT_PROVIDERS is on"
            )
            return state
        started = time.perf_counter()
        warm_up(state.models, [spec.size for spec in state.pack.input_specs], settings.max_batch_size)
        log.info(
            "model pack %s %s loaded from %s on %s; warm-up of batch sizes 1..%d took %.1f s",
            state.pack.name,
            state.pack.version,
            settings.models,
            state.models.runtime.summary(),
            settings.max_batch_size,
            time.perf_counter() - started,
        )
    except PackError as exc:
        state.mark_not_ready("pack_rejected", f"model pack rejected: {exc}")
        return state
    except Exception as exc:  # an unloadable ONNX file must not crash-loop the process silently
        state.mark_not_ready("pack_unloadable", f"model pack could not be loaded: {type(exc).__name__}: {exc}")
        return state
    state.batcher = Batcher(
        state.models.run, settings.max_batch_size, settings.max_queue_delay_ms / 1e3, settings.max_queue_size
    )
    state.decoder = new_decode_pool(settings, metrics)
    state.not_ready_reason = ""
    return state


def state_with_verified_pack(settings: Settings, metrics: ServiceMetrics | None = None) -> ServingState:
    """A serving state holding the verified pack, for models that run elsewhere (the shared inference server, a
    KServe v2 server); when the pack is rejected, its `pack` is None and it is not ready (pack_rejected)."""
    state = ServingState(metrics=metrics)
    try:
        state.pack = ModelPack.load(settings.models)
    except PackError as exc:
        state.mark_not_ready("pack_rejected", f"model pack rejected: {exc}")
    return state


def new_decode_pool(settings: Settings, metrics: ServiceMetrics | None = None) -> DecodePool:
    """The decode pool of an HTTP process; the same for local inference and the shared inference server's workers."""
    pool = DecodePool(
        settings.decode_workers,
        settings.decode_timeout_s,
        settings.max_queue_size,
        settings.decode_in_processes,
        on_replace=metrics.decode_workers_replaced.inc if metrics is not None else None,
        native_in_threads=settings.decode_native_in_threads,
        malloc_keep_mb=settings.malloc_keep_mb,
    )
    # Before /readyz turns ready, so neither the first requests nor cold-start figures hide worker start-up.
    log.info("%d decode workers started in %.1f s", settings.decode_workers, pool.start())
    return pool
