"""Inference in another process: an HTTP worker's stand-in for the local batcher and sessions.

With CXR_INFERENCE_SOCKET set, the app builds its serving state here instead of loading ONNX Runtime
sessions: `RemoteBatcher.submit(image)` has the local `Batcher.submit` signature and result, so the
request path (service/inference/predictor.py) is the same either way, postprocessing included. The worker keeps
one connection to the inference server (service/inference/server.py), many requests in flight on it,
and reconnects whenever it drops; until the server has answered "hello" with the same pack this worker
verified, the worker reports not ready (/readyz 503 with the reason) and requests get 503 at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.errors import NotReady, Overloaded
from service.inference.batcher import BatchResult, cancel_and_wait
from service.inference.protocol import (
    MAX_RESPONSE_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    STREAM_LIMIT,
    ProtocolError,
    encode_frame,
    pack_identity,
    read_frame,
)
from service.inference.state import ServingState, new_decode_pool, state_with_verified_pack
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
RECONNECT_DELAY_S = 0.5
# Errors the server reports that mean the same thing here: raised as such, so the client sees 429/503.
REMOTE_ERRORS = {Overloaded.code: Overloaded, NotReady.code: NotReady}


class RemoteInferenceError(RuntimeError):
    """The inference server failed an image (a bug, as an ONNX Runtime failure is in-process): a 500."""


@dataclass
class RemoteModels:
    """Stands in for OnnxModels in the serving state: what the inference server said about its sessions."""

    socket: Path
    providers: list[str] = field(default_factory=list)


def hello_problem(hello: dict, expected_pack: dict) -> tuple[str, str] | None:
    """Why this worker must not send images to the server that answered `hello`, or None when it may.

    (reason code for /readyz, detail for the log).
    """
    if hello.get("protocol") != PROTOCOL_VERSION:
        return (
            "inference_server_mismatch",
            f"inference server speaks protocol {hello.get('protocol')!r}, this worker {PROTOCOL_VERSION}",
        )
    if not hello.get("ready"):
        return (
            "inference_server_not_ready",
            f"inference server is not ready: {hello.get('reason') or 'no reason given'} (its log says why)",
        )
    if hello.get("pack") != expected_pack:
        # Boxes are postprocessed here with this pack's labels and thresholds: they must be the served model's.
        served = hello.get("pack") or {}
        return (
            "inference_server_mismatch",
            f"inference server serves pack {served.get('name')} {served.get('version')} "
            f"(detector {str(served.get('detector_sha256'))[:12]}…), not the one this worker verified "
            f"({expected_pack['name']} {expected_pack['version']}, detector {expected_pack['detector_sha256'][:12]}…)",
        )
    return None


def disconnect_reason(error: Exception, socket_path: Path) -> tuple[str, str]:
    """The not-ready reason code /readyz reports after a failed connect or a dropped connection, and the detail."""
    if isinstance(error, asyncio.IncompleteReadError):
        detail = f"the inference server at {socket_path} closed the connection (stopped or crashed)"
    elif isinstance(error, (FileNotFoundError, ConnectionRefusedError)):
        detail = f"no inference server is listening at {socket_path}"
    else:
        detail = f"the inference server at {socket_path} is unavailable ({type(error).__name__}: {error})"
    return "inference_server_unavailable", detail


def answer_to_result(answer: dict, arrays: list[np.ndarray], round_trip_ms: float) -> BatchResult:
    """An infer answer -> the BatchResult the local batcher would give, or the error it would raise.

    "queue" is everything but the inference itself: the server's batch wait plus the socket hop both ways,
    so a request's stage timings still add up to its total.
    """
    if not answer.get("ok"):
        error = REMOTE_ERRORS.get(answer.get("code"))
        if error is None:
            raise RemoteInferenceError(f"inference server: {answer.get('code')}: {answer.get('message')}")
        retry_after = answer.get("retry_after")
        raise error(str(answer.get("message")), headers={"Retry-After": str(retry_after)} if retry_after else None)
    inference_ms = float(answer["inference_ms"])
    # Copies: the arrays are views of the received bytes; postprocessing gets ordinary writable arrays.
    return BatchResult(
        outputs=tuple(np.array(array) for array in arrays),
        queue_ms=max(round_trip_ms - inference_ms, 0.0),
        inference_ms=inference_ms,
        batch_size=int(answer["batch_size"]),
    )


class RemoteBatcher:
    """The Batcher interface (start, submit, stop, queue_depth) over a connection to the inference server."""

    def __init__(
        self,
        socket_path: Path,
        expected_pack: dict,
        models: RemoteModels,
        on_status: Callable[[str, str], None],
        max_batch_size: int,
    ) -> None:
        self.socket_path = socket_path
        self.max_batch_size = max_batch_size
        self._expected_pack = expected_pack
        self._models = models
        # ("", "") when ready, else (reason code, detail): the serving state's not_ready_reason and the log line.
        self._on_status = on_status
        self._reason = "inference_server_connecting"
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._pending: dict[int, tuple[asyncio.Future, float]] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        """Images this worker has sent and not yet had back (the server's queue is shared by all workers)."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._stay_connected(), name="remote-inference")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._fail_pending(NotReady("The service is shutting down."))

    async def submit(self, inputs: np.ndarray | tuple[np.ndarray, ...]) -> BatchResult:
        """As Batcher.submit: one image (one tensor per input of the pack) to the server, its outputs back."""
        writer = self._writer
        if writer is None:
            raise NotReady(f"The inference server is not available ({self._reason}).", headers={"Retry-After": "5"})
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, time.perf_counter())
        try:
            try:
                arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
                await self._send(writer, encode_frame({"op": "infer", "id": request_id}, arrays))
            except ConnectionError:
                if future.done():
                    future.exception()  # already failed by the disconnect: this NotReady replaces it
                raise NotReady(
                    "The inference server connection was lost; retry shortly.", headers={"Retry-After": "5"}
                ) from None
            return await future
        finally:
            self._pending.pop(request_id, None)  # also when the request is cancelled: a late answer is dropped

    async def _send(self, writer: asyncio.StreamWriter, buffers: list) -> None:
        async with self._write_lock:  # requests from many coroutines share the socket: one whole frame at a time
            for buffer in buffers:  # not writelines(), which joins them into one more copy of the image
                writer.write(buffer)
            await writer.drain()

    def _set_status(self, reason: str, detail: str = "") -> None:
        if reason != self._reason:
            (log.info if reason == "" else log.warning)(
                "%s", detail or f"connected to the inference server at {self.socket_path}; ready"
            )
        self._reason = reason
        self._on_status(reason, detail)

    def _fail_pending(self, error: Exception) -> None:
        for future, _ in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)

    async def _stay_connected(self) -> None:
        """Connect, check the server's hello, read answers until the connection drops; then again, forever."""
        while True:
            try:
                reason, detail = await self._connect_and_read()
            except (OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError) as exc:
                reason, detail = disconnect_reason(exc, self.socket_path)
            self._writer = None
            # In-flight requests fail now (503 with Retry-After) instead of waiting out the request time limit.
            self._fail_pending(
                NotReady(
                    "The inference server stopped while this image was queued; retry shortly.",
                    headers={"Retry-After": "5"},
                )
            )
            self._set_status(reason, detail)
            await asyncio.sleep(RECONNECT_DELAY_S)

    async def _connect_and_read(self) -> tuple[str, str]:
        """Serve answers while connected; returns (or raises) why this connection cannot be used (any more):
        (reason code, detail)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.socket_path), limit=STREAM_LIMIT), CONNECT_TIMEOUT_S
        )
        try:
            # Room for a whole image in the kernel: one send() instead of the transport buffering the rest and
            # trickling it out in 200 KiB pieces (each moving the remainder of its buffer). Capped by wmem_max.
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_LIMIT)
            await self._send(writer, encode_frame({"op": "hello"}))
            hello, _ = await asyncio.wait_for(read_frame(reader, MAX_RESPONSE_PAYLOAD_BYTES), CONNECT_TIMEOUT_S)
            problem = hello_problem(hello, self._expected_pack)
            if problem is not None:
                return problem
            self._models.providers = list(hello.get("providers") or [])
            self._writer = writer
            self._set_status("")
            while True:
                answer, arrays = await read_frame(reader, MAX_RESPONSE_PAYLOAD_BYTES)
                self._deliver(answer, arrays)
        finally:
            self._writer = None
            writer.close()

    def _deliver(self, answer: dict, arrays: list[np.ndarray]) -> None:
        entry = self._pending.get(answer.get("id"))
        if entry is None or entry[0].done():
            return  # its request was cancelled (client gone, request time limit)
        future, sent = entry
        try:
            future.set_result(answer_to_result(answer, arrays, (time.perf_counter() - sent) * 1e3))
        except Exception as exc:  # the error this request gets: 429, 503 or, for a server-side failure, 500
            future.set_exception(exc)


def load_remote_serving_state(settings: Settings, metrics: ServiceMetrics | None = None) -> ServingState:
    """The serving state of an HTTP worker whose inference runs in the shared server at settings.inference_socket.

    The pack is still verified here: labels, thresholds and postprocessing parameters come from it, and the
    server must serve the same files (checked by sha256 on every connect).
    """
    state = state_with_verified_pack(settings, metrics)
    if state.pack is None:
        return state
    socket_path = Path(settings.inference_socket)
    state.models = RemoteModels(socket=socket_path)
    state.not_ready_reason = "inference_server_connecting"
    state.batcher = RemoteBatcher(
        socket_path,
        pack_identity(state.pack),
        state.models,
        on_status=lambda reason, _detail: setattr(state, "not_ready_reason", reason),
        max_batch_size=settings.max_batch_size,
    )
    state.decoder = new_decode_pool(settings, metrics)
    return state
