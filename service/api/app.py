"""FastAPI application factory: routers, error handlers, request ids, access control and the model's lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.allocator import keep_freed_memory
from service.api.auth import KeyRing, requires_key
from service.api.docs import add_offline_docs
from service.api.request_context import RequestContext, error_response
from service.api.routers import health, jobs, metrics, predict, studies
from service.errors import ApiError
from service.inference.client import load_remote_serving_state
from service.inference.kserve import load_kserve_serving_state
from service.inference.state import ServingState, load_serving_state
from service.metrics import ServiceMetrics
from service.settings import Settings, get_settings
from service.viewer_outputs import quiet_identifying_loggers

log = logging.getLogger("service")

# API answers (JSON, DICOM, PNG) never need to run or load anything, nor be framed.
API_CSP = "default-src 'none'; frame-ancestors 'none'"
CORS_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"]


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "unknown")


def security_headers(path: str, settings: Settings) -> dict[str, str]:
    """Headers every response carries; a route that sets its own Content-Security-Policy keeps it."""
    headers = {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        # The docs pages set their own (service/api/docs.py), which this one would not override.
        "Content-Security-Policy": API_CSP,
    }
    if path.startswith("/v1/"):
        # Results (and errors about uploads) are about a patient: no browser or proxy may keep a copy.
        headers["Cache-Control"] = "no-store"
    if settings.hsts:
        # Only when TLS terminates in front: HSTS over plain HTTP is ignored, and a wrong one locks browsers out.
        # No includeSubDomains: other hosts of the hospital's domain are not ours to pin to HTTPS.
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return headers


def document_api_keys(app: FastAPI, settings: Settings) -> None:
    """Declare the key schemes in OpenAPI (so /docs offers "Authorize"), and mark the paths left open as such."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()  # caches itself in app.openapi_schema
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
            for path, operations in schema.get("paths", {}).items():
                if not requires_key(path, settings):
                    for operation in operations.values():
                        operation["security"] = []
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def serving_state_loader(settings: Settings) -> Callable[[Settings, ServiceMetrics], ServingState]:
    """Where the models run: on a KServe v2 server, in the shared inference server, or in this process."""
    if settings.inference_url:
        return load_kserve_serving_state
    if settings.inference_socket:
        return load_remote_serving_state
    return load_serving_state


async def start_dicom_node(settings: Settings, state: ServingState, metrics: ServiceMetrics):
    """The DICOM node beside the API, on the same serving state (so the same decode pool and batcher)."""
    from service.dicom_node.node import DicomNode  # pynetdicom only when a node runs
    from service.metrics import NodeMetrics

    node = DicomNode(settings, state, NodeMetrics(metrics.registry))
    await node.start(settings.dicom_host or "127.0.0.1")
    return node


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Pediatric chest X-ray inference API",
        version="0.1.0",
        description="POST a chest radiograph as DICOM; get findings (boxes in the image's own pixel space) and "
        "disease probabilities. Research use only: not for diagnostic use.",
        lifespan=serving_lifespan(settings),
        docs_url=None,  # served from packaged assets instead of a CDN: add_offline_docs below
        redoc_url=None,
    )
    app.state.metrics = ServiceMetrics()
    app.state.serving = ServingState(metrics=app.state.metrics)
    app.state.settings = settings
    app.state.dicom_node = None
    # Built here, not per request, so a wrong digest or a missing keys file stops startup instead of every call.
    keys = KeyRing(settings.api_key_sha256s, settings.api_keys_file) if settings.auth_enabled else None
    if keys is not None:
        document_api_keys(app, settings)
    for router in (health.router, predict.router, studies.router, jobs.router, metrics.router):
        app.include_router(router)
    add_offline_docs(app)
    add_middleware(app, settings, keys)
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    return app


def serving_lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Load the pack (or connect to where the models run) at startup; stop the batcher, watcher and decoders at exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Process-wide, so here rather than in create_app: building an app (as tests do) changes nothing.
        quiet_identifying_loggers()
        if keep_freed_memory(settings.malloc_keep_mb):
            log.info(
                "malloc keeps up to %d MiB of freed memory for reuse (CXR_MALLOC_KEEP_MB)", settings.malloc_keep_mb
            )
        app.state.serving = ServingState(metrics=app.state.metrics)
        # Loading and warm-up block for seconds: keep them off the event loop so /healthz answers.
        # With a shared inference server (python -m service --workers N) the sessions live there instead, and
        # with CXR_INFERENCE_URL on a KServe v2 server (Triton).
        load = serving_state_loader(settings)
        state = await run_in_threadpool(load, settings, app.state.metrics)
        await state.start()
        app.state.serving = state
        node = await start_dicom_node(settings, state, app.state.metrics) if settings.dicom_port is not None else None
        app.state.dicom_node = node
        yield
        if node is not None:
            await node.stop()
        await state.stop()

    return lifespan


def add_middleware(app: FastAPI, settings: Settings, keys: KeyRing | None) -> None:
    """The request context (ids, security headers, API keys, access log) and, when configured, CORS outside it."""
    # Outermost but CORS: ids, headers and key checks apply to every path, error responses included.
    app.add_middleware(
        RequestContext,
        keys=keys,
        requires_key=lambda path: requires_key(path, settings),
        security_headers=lambda path: security_headers(path, settings),
        on_internal_error=lambda: app.state.metrics.observe_error("internal_error", 500),
    )
    if settings.cors_allow_origins:
        # Added last, so outermost: a preflight carries no key and is answered here, before authentication.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=CORS_HEADERS,
            expose_headers=["X-Request-ID"],
        )


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    request.app.state.metrics.observe_error(exc.code, exc.status_code)
    return error_response(exc.status_code, exc.code, exc.message, _request_id(request), exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(422, "invalid_request", problems, _request_id(request))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), _request_id(request), getattr(exc, "headers", None))


# Every error answer has the same JSON shape (service.api.request_context.error_response).
ERROR_HANDLERS = {
    ApiError: api_error,
    RequestValidationError: validation_error,
    StarletteHTTPException: http_error,
}
# Any other exception is a bug: service.api.request_context.RequestContext answers 500 internal_error and logs it
# without its message.
