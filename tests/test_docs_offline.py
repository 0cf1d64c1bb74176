"""/docs (Swagger UI) and /redoc work without internet: in headless Chromium, with every request to anything but
loopback aborted, both pages list the service's endpoints, and the browser reports no blocked script or policy
violation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import chromium_browser, loopback_only
from tests.live import LiveService

PACK = Path(__file__).resolve().parent.parent / "models" / "demo-synthetic"
ENDPOINTS = ("/v1/predict", "/v1/models", "/healthz", "/readyz")
# ReDoc's "API docs by Redocly" footer asks for its logo from the vendor's CDN (no option turns it off); the page's
# policy refuses it, and the footer shows without the image. Every other violation is a failure.
REDOC_LOGO = "Loading the image 'https://cdn.redoc.ly/"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with LiveService(PACK, tmp_path_factory.mktemp("docs") / "service.log") as live:
        yield live


@pytest.mark.parametrize(
    "page, rendered",
    [
        ("/docs", ".opblock-summary-path"),  # one per operation
        ("/redoc", "[data-section-id^='operation/']"),
    ],
)
def test_docs_page_lists_the_endpoints_offline(service, page, rendered):
    """The page renders from the service's own assets (nothing fetched elsewhere, no CSP violation) and its text
    names every main endpoint."""
    with chromium_browser() as browser:
        context = browser.new_context()
        blocked = loopback_only(context)
        tab = context.new_page()
        problems: list[str] = []
        tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: problems.append(str(error)))
        tab.goto(service.base + page)
        # Selectors and inner_text run in Playwright's own isolated world: the page's policy forbids eval.
        tab.wait_for_selector(rendered, state="attached", timeout=60_000)
        text = tab.inner_text("body")
        context.close()
    assert blocked == [], f"{page} tried to reach the network: {blocked}"
    assert [problem for problem in problems if not problem.startswith(REDOC_LOGO)] == [], f"{page}: {problems}"
    missing = [endpoint for endpoint in ENDPOINTS if endpoint not in text]
    assert not missing, f"{page} does not list {missing}"
