"""The shared inference server: one process owns the pack's ONNX Runtime sessions and the dynamic batcher,
and runs images that HTTP workers send it over a Unix socket (protocol in service/inference/protocol.py).

    python -m service.inference.server --socket /run/cxr/inference.sock   # the same CXR_* settings as the API

`python -m service --workers N` starts and supervises it (service/multiworker.py); HTTP workers reach it
with CXR_INFERENCE_SOCKET set (service/inference/client.py). The sessions, warm-up and batcher are exactly
those of the single-process service (service/inference/state.py): only decoding and postprocessing move out.
The socket is created only after warm-up, so a server that answers is a warm one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import numpy as np

from service.allocator import keep_freed_memory
from service.errors import ApiError, NotReady
from service.inference.protocol import PROTOCOL_VERSION, FrameReceiver, ProtocolError, pack_identity
from service.inference.state import ServingState, load_serving_state
from service.settings import Settings

log = logging.getLogger("service.inference.server")

DRAIN_TIMEOUT_S = 30.0


def hello_answer(state: ServingState, max_batch_size: int) -> dict:
    """What a connecting worker checks before it reports ready: readiness, and which pack is being served."""
    pack = state.pack
    return {
        "op": "hello",
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "ready": state.ready,
        "reason": state.not_ready_reason,
        "providers": list(state.models.providers) if state.models is not None else [],
        "pack": None if pack is None else pack_identity(pack),
        "max_batch_size": max_batch_size,
    }


def error_answer(request_id: object, error: ApiError) -> dict:
    return {
        "id": request_id,
        "ok": False,
        "code": error.code,
        "message": error.message,
        "retry_after": error.headers.get("Retry-After"),
    }


def input_problem(arrays: list[np.ndarray], sizes: list[int]) -> str | None:
    """Why an infer request's arrays are not one 1 x size x size float32 image per input size, or None when they are."""
    if len(arrays) != len(sizes):
        return f"expected {len(sizes)} array(s), got {len(arrays)}"
    for image, size in zip(arrays, sizes):
        if image.dtype != np.float32 or image.shape != (1, size, size):
            return f"expected float32 (1, {size}, {size}), got {image.dtype} {image.shape}"
    return None


class WorkerConnection(FrameReceiver):
    """One HTTP worker's connection: hello and infer frames in, answers out in completion order."""

    def __init__(self, server: InferenceServer) -> None:
        super().__init__(server.max_request_bytes)
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)  # the worker stopped or restarted; its answers are dropped

    def protocol_error(self, error: ProtocolError) -> None:
        log.warning("closing a connection that broke the protocol: %s", error)

    def frame_received(self, header: dict, arrays: list[np.ndarray]) -> None:
        if header.get("op") == "hello":
            self.send(hello_answer(self.server.state, self.server.settings.max_batch_size))
        elif header.get("op") == "infer":
            self.server.start_request(self, header.get("id"), arrays)
        else:
            raise ProtocolError(f"unknown op {header.get('op')!r}")


class InferenceServer:
    """Runs the images of every worker connection through the one batcher."""

    def __init__(self, state: ServingState, settings: Settings) -> None:
        self.state = state
        self.settings = settings
        self.sizes = [spec.size for spec in state.pack.input_specs] if state.pack is not None else []
        self.connections: set[WorkerConnection] = set()
        self._requests: set[asyncio.Task] = set()

    @property
    def max_request_bytes(self) -> int:
        # Exactly one float32 image per input; hello frames carry none.
        return max(sum(4 * size * size for size in self.sizes), 1024)

    def protocol(self) -> WorkerConnection:
        """The protocol factory for loop.create_unix_server."""
        return WorkerConnection(self)

    def start_request(self, connection: WorkerConnection, request_id: object, arrays: list[np.ndarray]) -> None:
        task = asyncio.get_running_loop().create_task(self._infer(connection, request_id, arrays))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _infer(self, connection: WorkerConnection, request_id: object, arrays: list[np.ndarray]) -> None:
        arrays_out: tuple[np.ndarray, ...] = ()
        problem = input_problem(arrays, self.sizes)
        if problem is not None:
            answer = {"id": request_id, "ok": False, "code": "invalid_input", "message": problem}
        elif self.state.batcher is None:
            answer = error_answer(
                request_id,
                NotReady(f"The model is not ready ({self.state.not_ready_reason}).", headers={"Retry-After": "5"}),
            )
        else:
            try:
                result = await self.state.batcher.submit(tuple(arrays))
            except ApiError as exc:  # queue full (429) or shutting down (503): the worker raises the same error
                answer = error_answer(request_id, exc)
            except Exception as exc:  # the batch failed in ONNX Runtime: a bug, reported as one (500) by the worker
                log.error("inference failed: %s: %s", type(exc).__name__, exc)
                answer = {
                    "id": request_id,
                    "ok": False,
                    "code": "internal_error",
                    "message": f"inference failed: {type(exc).__name__}",
                }
            else:
                answer = {
                    "id": request_id,
                    "ok": True,
                    "queue_ms": result.queue_ms,
                    "inference_ms": result.inference_ms,
                    "batch_size": result.batch_size,
                }
                arrays_out = result.outputs
        connection.send(answer, arrays_out)

    async def drain(self, timeout_s: float) -> None:
        """Until the workers have closed their connections and every request in flight is answered (bounded).

        The launcher stops the HTTP workers first, so normally nothing is left; when everything is signalled
        at once (systemd's default KillMode), workers still draining keep their answers.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self.connections or self._requests) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._requests:
            log.warning("stopping with %d requests still unanswered after %.0f s", len(self._requests), timeout_s)

    def close_connections(self) -> None:
        """Workers see the connection end now (and report not ready), not only when this process exits."""
        for connection in list(self.connections):
            connection.transport.close()


def claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a crashed server; refuse to steal one a live server still listens on."""
    if not path.exists() and not path.is_symlink():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
    raise SystemExit(f"another inference server is already listening at {path}")


async def serve(
    state: ServingState,
    settings: Settings,
    socket_path: Path,
    parent_pid: int | None = None,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
) -> None:
    """Serve until SIGTERM/SIGINT (or until the launcher that started this process is gone)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = InferenceServer(state, settings)
    if state.batcher is not None:
        state.batcher.start()
    claim_socket_path(socket_path)
    listener = await loop.create_unix_server(server.protocol, path=str(socket_path))
    # Preprocessed images are patient pixels: only this user may connect (the launcher's folder is 0700 too).
    socket_path.chmod(0o600)
    watcher = loop.create_task(watch_parent(parent_pid, stop)) if parent_pid else None
    log.info(
        "inference server pid %d listening on %s (%s)",
        os.getpid(),
        socket_path,
        "ready" if state.ready else f"not ready: {state.not_ready_reason}",
    )
    try:
        await stop.wait()
        log.info("inference server stopping: draining requests in flight")
        listener.close()
        await server.drain(drain_timeout_s)
        server.close_connections()
    finally:
        if watcher is not None:
            watcher.cancel()
        if state.batcher is not None:
            await state.batcher.stop()
        socket_path.unlink(missing_ok=True)


async def watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Stop when the launcher dies without stopping us (SIGKILL), so no orphan keeps the GPU memory."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    log.warning("launcher %d is gone; stopping", parent_pid)
    stop.set()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.inference.server",
        description="Own the model pack's sessions and batcher; serve HTTP workers over a Unix socket.",
    )
    parser.add_argument("--socket", type=Path, default=None, help="socket path (default: CXR_INFERENCE_SOCKET)")
    parser.add_argument("--models", type=Path, default=None, help="model pack folder (default: CXR_MODELS)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer the parent")
    drain_help = "longest wait, on SIGTERM, for workers to disconnect and requests to finish"
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, help=drain_help)
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**({"models": args.models} if args.models else {}))
    socket_path = args.socket or settings.inference_socket
    if socket_path is None:
        raise SystemExit("no socket path: pass --socket or set CXR_INFERENCE_SOCKET")
    keep_freed_memory(settings.malloc_keep_mb)  # batches of model inputs and outputs, allocated per batch
    # Decoding is the HTTP workers' job: the decode pool that load_serving_state builds is never used here.
    state = load_serving_state(settings.model_copy(update={"decode_in_processes": False, "decode_workers": 1}))
    if state.decoder is not None:
        state.decoder.close()
        state.decoder = None
    asyncio.run(serve(state, settings, Path(socket_path), args.parent_pid, args.drain_timeout))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
