"""Starting and stopping the servers under test: our service and the peers, each a process tree.

Cold start is timed from just before the process is spawned to the first 200 from /readyz. Each
server gets its own session (process group), so everything it spawned (decode workers, a framework's
daemons and replicas) can be ended together, by that group's id, when it is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServerSpec:
    name: str  # short id used in file names, tables and plots
    title: str
    command: list[str]  # "{port}" is replaced by the port
    configuration: str  # how it is set up, for the summary
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 180.0


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen
    base_url: str
    cold_start_s: float
    log_path: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, characters: int = 3000) -> str:
    return path.read_text(errors="replace")[-characters:] if path.is_file() else ""


def wait_until_ready(base_url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    """Poll /readyz until 200; False when the process exits or the time is up."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def start_server(spec: ServerSpec, log_dir: Path) -> RunningServer:
    """Spawn the server on a free loopback port and wait until it is ready; raises with its log if never."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    command = [part.replace("{port}", str(port)) for part in spec.command]
    with log_path.open("w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=ROOT, env=os.environ | spec.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    if not wait_until_ready(base_url, process, spec.ready_timeout_s):
        stop_server_process(process)
        raise RuntimeError(f"{spec.title} never became ready (exit code {process.poll()}); log:\n{log_tail(log_path)}")
    return RunningServer(spec, process, base_url, time.perf_counter() - started, log_path)


def served_providers(base_url: str) -> list[str]:
    """The ONNX Runtime providers the server's models run on: the peers say so in /readyz, ours in /v1/models."""
    for path in ("/readyz", "/v1/models"):
        try:
            providers = httpx.get(f"{base_url}{path}", timeout=30).json().get("providers")
        except (httpx.HTTPError, ValueError):
            continue
        if providers:
            return list(providers)
    return ["unknown"]


def stop_server_process(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM (graceful shutdown), then SIGKILL to whatever is left of the server's own process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the group start_new_session made: only this server's processes
    if process.poll() is None:
        process.wait(timeout=10)


def stop_server(server: RunningServer) -> None:
    stop_server_process(server.process)
