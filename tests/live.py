"""Helpers for tests that reach a real server over loopback."""

from __future__ import annotations

import socket
import time

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
