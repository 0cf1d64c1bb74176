"""Dynamic batching across concurrent requests.

Requests put one preprocessed image each on a bounded queue (one tensor per input size of the pack: the
detector and the classifier may take different sizes); a single worker takes up to `max_batch_size` of
them (waiting at most `max_delay` for the batch to fill), runs both models on the stacked batches in a
dedicated thread, and hands each request its own slice. One inference at a
time keeps the GPU's work ordered while the next batch gathers on the event loop.

The infer function may also be a coroutine function (models on a remote server, service/inference/kserve.py):
it is awaited on the event loop instead, with the same one-batch-at-a-time order.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import NotReady, Overloaded

# Called with one stacked (N, 1, S, S) batch per input of the pack, in the pack's input order.
InferFn = Callable[..., tuple[np.ndarray, ...]]
AsyncInferFn = Callable[..., Awaitable[tuple[np.ndarray, ...]]]


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background task (the batcher's worker, a connection watcher) and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@dataclass(frozen=True)
class BatchResult:
    outputs: tuple[np.ndarray, ...]  # this request's slice of every model output
    queue_ms: float
    inference_ms: float
    batch_size: int


@dataclass
class _Pending:
    inputs: tuple[np.ndarray, ...]
    future: asyncio.Future
    enqueued: float


class Batcher:
    def __init__(
        self, infer: InferFn | AsyncInferFn, max_batch_size: int, max_delay_s: float, max_queue_size: int
    ) -> None:
        self._infer = infer
        self._infer_is_async = inspect.iscoroutinefunction(infer)
        self.max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._worker)
        while not self._queue.empty():
            self._queue.get_nowait().future.set_exception(NotReady("The service is shutting down."))
        self._executor.shutdown(wait=True)

    async def submit(self, inputs: np.ndarray | tuple[np.ndarray, ...]) -> BatchResult:
        """Queue one image (a tensor, or one tensor per input of the pack) and wait for its outputs."""
        if self._worker is None or self._worker.done():
            raise NotReady("The inference worker is not running.", headers={"Retry-After": "5"})
        inputs = (inputs,) if isinstance(inputs, np.ndarray) else tuple(inputs)
        pending = _Pending(inputs, asyncio.get_running_loop().create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise Overloaded(
                f"The inference queue is full ({self._queue.maxsize} images); retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
        return await pending.future

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self._max_delay_s
        while len(batch) < self.max_batch_size:
            # Take whatever is already queued without waiting, then wait out the remaining delay.
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            started = time.perf_counter()
            try:
                batches = [np.stack(images) for images in zip(*(p.inputs for p in batch))]
                if self._infer_is_async:
                    outputs = await self._infer(*batches)
                else:
                    outputs = await loop.run_in_executor(self._executor, self._infer, *batches)
            except Exception as exc:  # only this batch's requests fail; the worker keeps serving
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            finished = time.perf_counter()
            for index, pending in enumerate(batch):
                if not pending.future.done():  # the client may have gone away
                    pending.future.set_result(
                        BatchResult(
                            outputs=tuple(output[index] for output in outputs),
                            queue_ms=(started - pending.enqueued) * 1e3,
                            inference_ms=(finished - started) * 1e3,
                            batch_size=len(batch),
                        )
                    )
