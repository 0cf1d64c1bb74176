"""The service with its DICOM node, as a child process on loopback, for the fault tests and the benchmark."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.live import free_port, wait_until_ready

REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass
class NodeProcess:
    """`python -m service --dicom-port D` started with `env`; `start()` again after `kill()` reuses spool and ports."""

    pack: Path
    spool: Path
    log: Path
    env: dict[str, str]
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 120.0) -> None:
        env = {
            **os.environ,
            "CXR_PROVIDERS": '["CPUExecutionProvider"]',
            "CXR_MAX_BATCH_SIZE": "4",
            "CXR_DECODE_WORKERS": "1",
            "CXR_DICOM_SPOOL_DIR": str(self.spool),
            "CXR_DICOM_BACKOFF_BASE_S": "0.1",
            "CXR_DICOM_BACKOFF_MAX_S": "0.5",
            "CXR_DICOM_NETWORK_TIMEOUT_S": "5",
            **self.env,
        }
        command = [
            sys.executable,
            "-m",
            "service",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
            "--models",
            str(self.pack),
            "--dicom-port",
            str(self.dicom_port),
        ]
        with self.log.open("ab") as log:
            # Its own process group, so that kill() and stop() reach its decode workers too.
            self.process = subprocess.Popen(
                command, cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until_ready(self.http_url, timeout_s)  # the node listens before the API answers (app lifespan)

    def kill(self) -> None:
        """SIGKILL to the service and its workers: no shutdown code runs, as in a power cut."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        # Whatever of its group is left (decode workers, their forkserver) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def jobs(self, **params) -> dict:
        response = httpx.get(f"{self.http_url}/v1/jobs", params={"limit": 1000, **params}, timeout=30)
        response.raise_for_status()
        return response.json()

    def job_rows(self) -> int:
        """Jobs in the spool's database, read directly (works while the node is down)."""
        database = self.spool / "jobs.sqlite3"
        if not database.is_file():
            return 0
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as db:
            try:
                return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            except sqlite3.OperationalError:  # schema not written yet
                return 0


@contextlib.contextmanager
def running_node(folder: Path, pack: Path, **env: str) -> Iterator[NodeProcess]:
    folder.mkdir(parents=True, exist_ok=True)
    node = NodeProcess(pack=pack, spool=folder / "spool", log=folder / "service.log", env=env)
    try:
        node.start()
        yield node
    finally:
        node.stop()


def destinations(*entries: dict) -> str:
    return json.dumps(list(entries))


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail with `what` when it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
