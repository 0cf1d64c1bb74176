"""In-process throughput, no HTTP: the service's own pipeline, and the models alone.

Pipeline: `service.dicom.pipeline.prepare` routed as service.dicom.decode_pool routes it (uncompressed pixel data in
CXR_DECODE_WORKERS threads, compressed in a forkserver pool of as many processes, called with the
service's arguments), feeding batches to the
service's OnnxModels, then the service's postprocessing into the JSON answer, one image at a time.
Decoding runs ahead of inference (a window of submitted images), so the pool keeps working while a
batch is inferred, as it does in the server under load. The rate is images fully answered per second.

Model only: OnnxModels.run on ready-made input tensors, the ceiling that decoding and HTTP eat into.
"""

from __future__ import annotations

import itertools
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from benchmarks.peers.common import prediction_json
from service.allocator import keep_freed_memory
from service.dicom.decode import has_native_pixel_data
from service.dicom.pipeline import PreparedImage, prepare
from service.inference.modelpack import ModelPack, OnnxModels
from service.settings import Settings


@dataclass(frozen=True)
class BatchRate:
    input_set: str  # an InputSet name, or "model-only"
    batch_size: int
    images_per_s: float
    images: int
    seconds: float


def timed_batches(run_batch: Callable[[], int], seconds: float, min_batches: int) -> tuple[int, float]:
    """(images, seconds) over repeated calls of run_batch (which returns its image count).

    One call first as warm-up (first-run allocation for this shape, and filling the decode pipeline),
    then calls until both `seconds` have passed and `min_batches` were measured.
    """
    run_batch()
    images, batches, started = 0, 0, time.perf_counter()
    while batches < min_batches or time.perf_counter() - started < seconds:
        images += run_batch()
        batches += 1
    return images, time.perf_counter() - started


def model_batch(models: OnnxModels, batches: Sequence[np.ndarray]) -> Callable[[], int]:
    """One call = both models on the ready-made batch (one array per input of the pack)."""

    def run() -> int:
        models.run(*batches)
        return len(batches[0])

    return run


def stacked(images: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Prepared images' inputs (one tuple per image) -> one batch per input of the pack."""
    return [np.stack(position) for position in zip(*images)]


def model_only_rates(
    models: OnnxModels, inputs: Sequence[Sequence[np.ndarray]], batch_sizes: Sequence[int], seconds: float
) -> list[BatchRate]:
    """Images per second of both models alone at each batch size; `inputs` holds each image's prepared inputs."""
    rates = []
    for batch_size in batch_sizes:
        batches = stacked([inputs[i % len(inputs)] for i in range(batch_size)])
        images, elapsed = timed_batches(model_batch(models, batches), seconds, min_batches=3)
        rates.append(BatchRate("model-only", batch_size, images / elapsed, images, elapsed))
    return rates


@dataclass
class DecodeExecutors:
    """The service's decode routing (service.dicom.decode_pool.DecodePool.route) without its asyncio wrapper."""

    processes: ProcessPoolExecutor
    threads: ThreadPoolExecutor | None

    def submit(self, body: bytes, *arguments) -> Future:
        native = self.threads is not None and has_native_pixel_data(body)
        return (self.threads if native else self.processes).submit(prepare, body, *arguments)

    def __enter__(self) -> DecodeExecutors:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.threads is not None:
            self.threads.shutdown()
        self.processes.shutdown()


def decode_pool(workers: int, native_in_threads: bool = True, malloc_keep_mb: int = 0) -> DecodeExecutors:
    """The service's decode executors; `malloc_keep_mb` as the service sets it (CXR_MALLOC_KEEP_MB) in this
    process and in the workers, so the pipeline allocates memory as the service does."""
    keep_freed_memory(malloc_keep_mb)
    # forkserver, as service.dicom.decode_pool: the parent already runs ONNX Runtime's threads.
    return DecodeExecutors(
        ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=keep_freed_memory,
            initargs=(malloc_keep_mb,),
        ),
        ThreadPoolExecutor(workers, thread_name_prefix="decode-native") if native_in_threads else None,
    )


class DecodeStream:
    """Prepared images in submission order, with `window` decodes always in flight in the pool."""

    def __init__(
        self, pool: DecodeExecutors, bodies: Sequence[bytes], pack: ModelPack, settings: Settings, window: int
    ) -> None:
        self._pool, self._bodies = pool, itertools.cycle(bodies)
        self._arguments = (pack.input_specs, settings.decode_limits, settings.image_id_hash)
        self._pending: deque[Future] = deque(self._submit() for _ in range(window))

    def _submit(self) -> Future:
        return self._pool.submit(next(self._bodies), *self._arguments)

    def take(self, count: int) -> list[PreparedImage]:
        taken = []
        for _ in range(count):
            taken.append(self._pending.popleft().result())
            self._pending.append(self._submit())
        return taken

    def close(self) -> None:
        """Cancel what has not started and wait for the rest, so the next measurement starts clean."""
        for future in self._pending:
            future.cancel()
        wait(self._pending)


def pipeline_batch(
    stream: DecodeStream, batch_size: int, models: OnnxModels, pack: ModelPack, settings: Settings
) -> Callable[[], int]:
    """One call = the next batch_size decoded images through both models and the postprocess."""

    def run() -> int:
        prepared = stream.take(batch_size)
        started = time.perf_counter()
        outputs = models.run(*stacked([image.inputs for image in prepared]))
        timing = {"inference": (time.perf_counter() - started) * 1e3}
        for index, image in enumerate(prepared):
            prediction_json(image, tuple(output[index] for output in outputs), pack, settings, "bench", timing)
        return batch_size

    return run


def pipeline_rates(
    input_set: str,
    bodies: Sequence[bytes],
    pack: ModelPack,
    settings: Settings,
    models: OnnxModels,
    pool: DecodeExecutors,
    workers: int,
    batch_sizes: Sequence[int],
    seconds: float,
    progress: Callable[[str], None] = print,
) -> list[BatchRate]:
    rates = []
    for batch_size in batch_sizes:
        stream = DecodeStream(pool, bodies, pack, settings, window=batch_size + 2 * workers)
        try:
            images, elapsed = timed_batches(
                pipeline_batch(stream, batch_size, models, pack, settings), seconds, min_batches=2
            )
        finally:
            stream.close()
        rate = BatchRate(input_set, batch_size, images / elapsed, images, elapsed)
        progress(
            f"  pipeline {input_set:>12} batch {batch_size:>2}: {rate.images_per_s:7.2f} images/s "
            f"({images} images in {elapsed:.1f} s)"
        )
        rates.append(rate)
    return rates


def best_rate(rates: Sequence[BatchRate], input_set: str) -> BatchRate | None:
    candidates = [rate for rate in rates if rate.input_set == input_set]
    return max(candidates, key=lambda rate: rate.images_per_s) if candidates else None
