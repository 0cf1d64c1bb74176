"""Decoding and preprocessing off the event loop, in worker processes, each image bounded in time.

Compressed pixel data (JPEG 2000 above all) is CPU-bound Python-extension work that holds the GIL,
so it runs in processes to use every core. A hostile or pathological file cannot hold a worker
forever: the task's run time (not its wait for a free worker) is bounded, and a worker that
overruns is killed and the pool replaced, so the next request is served normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from service.allocator import keep_freed_memory
from service.dicom.decode import has_native_pixel_data
from service.dicom.pipeline import InputSpec, PreparedImage, prepare
from service.errors import ApiError, Overloaded
from service.settings import DecodeLimits

log = logging.getLogger(__name__)


def _load_decoders() -> None:
    """Import the pixel decoders a worker will need (their imports take longer than most decodes)."""
    import importlib

    import pydicom.pixels  # noqa: F401

    for plugin in ("pylibjpeg", "openjpeg", "rle", "jpeg_ls"):
        with contextlib.suppress(ImportError):  # a missing plugin is reported per image as 415, not here
            importlib.import_module(plugin)
    time.sleep(0.05)  # hold this worker briefly so the pool starts a separate process for the next task


def _init_worker(malloc_keep_mb: int) -> None:
    """Set up a decode worker process: the server's malloc thresholds, and Ctrl-C left to the server.

    A terminal's Ctrl-C signals the whole process group; the server stops its workers itself, and a worker
    interrupted while it waits for work would only print a KeyboardInterrupt traceback per process.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory(malloc_keep_mb)


class DecodeTimeout(ApiError):
    status_code, code = 422, "decode_timeout"


class DecodePool:
    """Decoding and preprocessing off the event loop.

    Compressed pixel data (JPEG 2000, JPEG, JPEG-LS, RLE, HTJ2K) is decoded in worker processes: those
    codecs hold the GIL, and a process that outlasts the time bound can be killed. Uncompressed pixel
    data goes to threads of this process when `native_in_threads`: its decode is numpy work that
    releases the GIL and is bounded by the size caps, and a thread saves pickling a ~4 MB body through
    a pipe to a worker process, which cost more CPU than the decode itself.
    """

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        max_waiting: int,
        use_processes: bool = True,
        on_replace: Callable[[], None] | None = None,
        native_in_threads: bool = True,
        malloc_keep_mb: int = 0,
    ) -> None:
        self.workers = workers
        self.malloc_keep_mb = malloc_keep_mb
        self._on_replace = on_replace
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.use_processes = use_processes
        self.replaced_workers = 0
        self._slots = asyncio.Semaphore(workers)
        self._waiting = 0
        self._executor: Executor | None = self._new_executor()
        self._threads = (
            ThreadPoolExecutor(workers, thread_name_prefix="decode-native")
            if use_processes and native_in_threads
            else None
        )
        self._thread_slots = asyncio.Semaphore(workers)

    def _new_executor(self) -> Executor:
        if not self.use_processes:
            return ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        # forkserver: forking a process that already runs threads (uvicorn, ONNX Runtime) is unsafe.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_init_worker,
            initargs=(self.malloc_keep_mb,),
        )

    def start(self) -> float:
        """Start every worker now and load its decoders, so no request pays for process start-up.

        Returns the seconds it took (process pools otherwise start workers on first use).
        """
        started = time.perf_counter()
        if self.use_processes:
            # One task per worker, submitted together: the pool starts a process for each.
            futures = [self._executor.submit(_load_decoders) for _ in range(self.workers)]
            for future in futures:
                future.result(timeout=60)
        return time.perf_counter() - started

    @property
    def waiting(self) -> int:
        return self._waiting

    def _replace_executor(self, broken: Executor) -> None:
        if broken is not self._executor:
            return  # another request already replaced it
        self._executor = self._new_executor()
        self.replaced_workers += 1
        if self._on_replace is not None:
            self._on_replace()
        processes = list(getattr(broken, "_processes", {}).values() or [])
        for process in processes:
            process.kill()
        broken.shutdown(wait=False, cancel_futures=True)

    async def prepare(
        self,
        body: bytes,
        specs: Sequence[InputSpec],
        limits: DecodeLimits,
        id_algorithm: str,
        keep_display: bool = False,
    ) -> PreparedImage:
        """The prepared image with one input per spec (service/dicom/pipeline.prepare), off the event loop."""
        if self._waiting >= self.max_waiting:
            raise Overloaded("Too many images are waiting to be decoded; retry shortly.", headers={"Retry-After": "1"})
        self._waiting += 1
        try:
            if self.route(body) == "thread":
                async with self._thread_slots:
                    return await self._run_in_thread(body, specs, limits, id_algorithm, keep_display)
            async with self._slots:
                return await self._run(body, specs, limits, id_algorithm, keep_display, retry=True)
        finally:
            self._waiting -= 1

    def route(self, body: bytes) -> str:
        """ "thread" for uncompressed pixel data (when enabled), else "process" (also for unreadable meta)."""
        if self._threads is not None and has_native_pixel_data(body):
            return "thread"
        return "process"

    async def _run_in_thread(self, body, specs, limits, id_algorithm, keep_display) -> PreparedImage:
        future = asyncio.get_running_loop().run_in_executor(
            self._threads, prepare, body, specs, limits, id_algorithm, keep_display
        )
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            # A thread cannot be stopped; it finishes on its own (uncompressed work is bounded by the size caps).
            log.warning("uncompressed decode exceeded %.1f s", self.timeout_s)
            raise DecodeTimeout(f"Decoding the image took longer than {self.timeout_s:g} s and was stopped.") from None

    async def _run(self, body, specs, limits, id_algorithm, keep_display, retry: bool) -> PreparedImage:
        executor = self._executor
        loop = asyncio.get_running_loop()
        try:
            # Inside the try: a pool whose worker died refuses new work right at submission.
            future = loop.run_in_executor(executor, prepare, body, specs, limits, id_algorithm, keep_display)
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            log.warning("decode exceeded %.1f s; replacing the decode workers", self.timeout_s)
            self._replace_executor(executor)
            raise DecodeTimeout(f"Decoding the image took longer than {self.timeout_s:g} s and was stopped.") from None
        except BrokenProcessPool:
            # A worker died (killed for another request's timeout, or crashed): one retry on a fresh pool.
            self._replace_executor(executor)
            if not retry:
                raise
            return await self._run(body, specs, limits, id_algorithm, keep_display, retry=False)

    def close(self, grace_s: float = 2.0) -> None:
        """Stop the workers, and make sure they are gone: the caller may exit right after.

        uvicorn ends a SIGTERM shutdown by re-raising the signal, so no atexit hook runs to send the workers
        their stop message; a worker also holds its own call queue's write end, so it never sees EOF either.
        Left alone, each worker (and the forkserver it keeps alive) outlives the server as an orphan. For the
        same reason the pool's queues must be released here: their locks are named semaphores registered
        with multiprocessing's resource tracker, normally unregistered by an atexit finaliser that a
        signal-terminated process never runs, and the tracker then warns of "leaked semaphore objects".
        """
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        executor, self._executor = self._executor, None
        if executor is None:
            return  # closed already
        processes = list((getattr(executor, "_processes", None) or {}).values())
        # The thread that feeds the workers holds the queues; shutdown(wait=False) forgets it, so keep it to join.
        manager = getattr(executor, "_executor_manager_thread", None)
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace_s
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0))
            if process.is_alive():
                process.kill()
                process.join(1.0)
        if manager is not None:
            # With its workers gone it closes the queues and ends; then the last references to them go with it.
            manager.join(max(deadline - time.monotonic(), 1.0))
        # The last references to the queues: their semaphores are unregistered as they are freed, right here.
        del executor, manager, processes
