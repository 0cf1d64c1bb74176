"""`python -m service --workers N`: N HTTP worker processes feeding one shared inference server.

Each HTTP worker parses, decodes and preprocesses in its own decode pool and postprocesses its own
results; the models run once, in the inference server (service/inference/server.py), whose batcher
batches across all workers. One set of ONNX Runtime sessions and one GPU memory arena instead of N.

Order of events:
1. start the inference server (its own session, so a terminal's Ctrl-C reaches only this launcher and
   the HTTP workers) and wait until it answers on its socket, i.e. until it is loaded and warmed up;
2. run uvicorn's multi-worker supervisor with the app factory and CXR_INFERENCE_SOCKET set: it owns the
   listening socket, restarts a worker that dies and, on SIGTERM/SIGINT, lets every worker drain;
3. then stop the inference server (SIGTERM: it finishes what is in flight) and remove its socket.
An inference server that dies is restarted, with backoff; meanwhile the workers report not ready and
answer 503 with Retry-After, and they reconnect on their own.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import uvicorn
import uvicorn.config

from service.inference.protocol import probe
from service.settings import Settings

log = logging.getLogger("service.multiworker")

STARTUP_TIMEOUT_S = 600.0  # loading plus warm-up; TensorRT engine builds take minutes
STOP_TIMEOUT_S = 40.0  # a little over the inference server's own drain limit
STABLE_AFTER_S = 60.0  # a server that ran this long before dying restarts at once, not after backoff


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_decode_workers(http_workers: int, cores: int) -> int:
    """Decode processes per HTTP worker, so that all workers together use each core once, not N times."""
    return max(1, cores // http_workers)


def restart_delay(consecutive_failures: int) -> float:
    """Seconds before restarting a dead inference server: 1, 2, 4 … up to 30 while it keeps dying."""
    return min(30.0, 2.0 ** max(consecutive_failures - 1, 0))


def worker_environment(
    environ: Mapping[str, str], socket_path: Path | None, models: Path, http_workers: int, cores: int
) -> dict[str, str]:
    """The CXR_* variables the HTTP workers need on top of `environ` (uvicorn's workers build Settings from it);
    no socket when the models run on a KServe v2 server (CXR_INFERENCE_URL, already in `environ`)."""
    extra = {"CXR_MODELS": str(models)}
    if socket_path is not None:
        extra["CXR_INFERENCE_SOCKET"] = str(socket_path)
    if "CXR_DECODE_WORKERS" not in environ:  # an explicit setting wins
        extra["CXR_DECODE_WORKERS"] = str(default_decode_workers(http_workers, cores))
    return extra


def worker_log_config(level: str) -> dict:
    """uvicorn's logging plus the service's own loggers, formatted as in single-process mode."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["service"] = {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"}
    config["handlers"]["service"] = {
        "formatter": "service",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["service"], "level": level.upper()}
    return config


class InferenceProcess:
    """The inference server child process: started, restarted when it dies, stopped last."""

    def __init__(self, command: list[str]) -> None:
        self._command = command
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._supervisor: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        with self._lock:  # checked under the lock: stop() must never miss a process started while it runs
            if self._stopping.is_set():
                return
            self._process = subprocess.Popen(self._command, start_new_session=True)
            self._started_at = time.monotonic()
            log.info("inference server started (pid %d)", self._process.pid)

    def wait_until_answering(self, socket_path: Path, timeout_s: float, cancelled: threading.Event) -> dict | None:
        """Its hello answer once it listens (loaded and warmed up); None if it exits, times out or we stop."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not cancelled.is_set():
            if self._process.poll() is not None:
                return None
            hello = probe(socket_path, timeout_s=2.0) if socket_path.exists() else None
            if hello is not None:
                return hello
            cancelled.wait(0.1)
        return None

    def supervise(self) -> None:
        self._supervisor = threading.Thread(target=self._restart_when_dead, name="inference-supervisor", daemon=True)
        self._supervisor.start()

    def _restart_when_dead(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            process = self._process
            code = process.wait()
            if self._stopping.is_set():
                return
            ran_s = time.monotonic() - self._started_at
            failures = 1 if ran_s >= STABLE_AFTER_S else failures + 1
            delay = restart_delay(failures)
            log.error(
                "inference server (pid %d) exited with code %s after %.0f s; restarting in %.0f s "
                "(workers answer 503 meanwhile)",
                process.pid,
                code,
                ran_s,
                delay,
            )
            if self._stopping.wait(delay):
                return
            self.start()

    def stop(self) -> int | None:
        """SIGTERM (it drains), SIGKILL if it has not exited in time; its exit code."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("inference server (pid %d) did not stop in %.0f s; killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        return process.returncode


def inference_server_command(socket_path: Path, models: Path, log_level: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "service.inference.server",
        "--socket",
        str(socket_path),
        "--models",
        str(models),
        "--log-level",
        log_level,
        "--parent-pid",
        str(os.getpid()),
    ]


def serve_http_workers(args: argparse.Namespace, extra_env: Mapping[str, str]) -> None:
    """args.workers uvicorn workers of the app, with `extra_env` on top of this environment; until they stop."""
    os.environ.update(extra_env)  # uvicorn's worker processes are spawned with this environment
    log.info(
        "starting %d HTTP workers (%s decode processes each) on %s:%d",
        args.workers,
        os.environ.get("CXR_DECODE_WORKERS"),
        args.host,
        args.port,
    )
    # uvicorn's supervisor takes SIGTERM/SIGINT over: it stops the workers, each draining its requests.
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=worker_log_config(args.log_level),
        access_log=False,
    )


def run_workers(args: argparse.Namespace, settings: Settings) -> None:
    """Start the inference server, then args.workers uvicorn workers using it; return once all have stopped.

    With CXR_INFERENCE_URL the models run on that KServe v2 server (Triton) instead: no inference server is
    started, and each worker batches its own requests and sends the batches there.
    """
    if settings.inference_url:
        serve_http_workers(args, worker_environment(os.environ, None, settings.models, args.workers, usable_cores()))
        return
    private_dir = None
    socket_path = settings.inference_socket
    if socket_path is None:
        # A folder only this user can enter: the socket carries patient pixels and has no authentication.
        private_dir = Path(tempfile.mkdtemp(prefix="cxr-inference-"))
        socket_path = private_dir / "inference.sock"
    socket_path = Path(socket_path)
    stop_requested = threading.Event()
    # Until uvicorn installs its own handlers: a SIGTERM during the inference server's warm-up stops cleanly.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    server = InferenceProcess(inference_server_command(socket_path, settings.models, args.log_level))
    try:
        started = time.monotonic()
        server.start()
        hello = server.wait_until_answering(socket_path, STARTUP_TIMEOUT_S, stop_requested)
        if stop_requested.is_set():
            return
        if hello is None:
            raise SystemExit(
                f"the inference server did not start (see its log above); nothing listens at {socket_path}"
            )
        if hello.get("ready"):
            log.info(
                "inference server ready on %s after %.1f s", ", ".join(hello["providers"]), time.monotonic() - started
            )
        else:  # as in single-process mode: serve anyway, unready with the reason, so probes can say why
            log.error("inference server is up but not ready: %s", hello.get("reason"))
        server.supervise()
        if stop_requested.is_set():
            return
        serve_http_workers(
            args, worker_environment(os.environ, socket_path, settings.models, args.workers, usable_cores())
        )
    finally:
        code = server.stop()
        log.info("inference server stopped (exit code %s)", code)
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
