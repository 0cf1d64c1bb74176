"""Helpers for tests that reach a real server over loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(base_url: str, timeout_s: float = 90.0) -> None:
    """Poll /readyz until it answers 200; fail the test if it never does."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{base_url} did not become ready within {timeout_s:g} s")


class LiveService:
    """`python -m service` in a subprocess on a free loopback port, its output (stdout and stderr) kept in a file.

    `prelude` is Python run in the server process before the service starts (a test's fault injection).
    """

    def __init__(self, pack: Path, log_path: Path, env: dict[str, str] | None = None, prelude: str = "") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        argv = ["--port", str(self.port), "--models", str(pack)]
        code = f"{prelude}\nfrom service.__main__ import main\nmain({argv!r})\n"
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            env=os.environ | {"CXR_PROVIDERS": '["CPUExecutionProvider"]'} | (env or {}),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> LiveService:
        try:
            wait_until_ready(self.base)
        except BaseException:  # pytest.fail is a BaseException: stop the process before failing
            self.stop()
            print(self.output()[-5000:])
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait for the exit; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc_info) -> None:
        self.stop()
