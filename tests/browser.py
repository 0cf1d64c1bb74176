"""Headless Debian Chromium driven by Playwright, for tests that need a real browser.

Playwright's own browser download cannot work here (no internet at test time), so it drives the
system's Chromium (Debian package `chromium`, which .ci/run installs) through `executable_path`.
Every page may reach loopback only: `loopback_only(context)` aborts any other request, so a test never
depends on (or leaks to) the network.

    with chromium_browser() as browser:          # skips (fails in CI) when Chromium or Playwright is missing
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        loopback_only(context)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CXR_TEST_CHROMIUM", "/usr/bin/chromium")
# Headless in a container: no sandbox (no user namespaces), no GPU (WebGL falls back to SwiftShader),
# and nothing Chromium would fetch on its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def missing(reason: str) -> None:
    """Skip with `reason`, or fail in CI, where every tool the tests need is installed by .ci/run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: .ci/run)")
    pytest.skip(reason)


def require_chromium() -> str:
    """The Chromium executable, or skip/fail saying how to install it."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing(f"Chromium not found at {CHROMIUM} (Debian: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed (pip install -e '.[dev]')")
    return CHROMIUM


@contextlib.contextmanager
def chromium_browser() -> Iterator:
    """A headless Chromium (Playwright Browser) for the duration of the block; closed after it."""
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def loopback_only(context) -> list[str]:
    """Abort every request of `context` to a host other than loopback; returns the list of aborted URLs."""
    blocked: list[str] = []

    def route(route) -> None:
        url = route.request.url
        host = urllib.parse.urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOOPBACK_HOSTS:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", route)
    return blocked
