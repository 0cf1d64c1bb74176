"""FastAPI application factory: routers, error handlers, request ids and the model's lifespan."""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError
from service.routers import health, predict, studies
from service.settings import Settings, get_settings
from service.state import ServingState, load_serving_state

log = logging.getLogger("service")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def error_response(status: int, code: str, message: str, request_id: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "request_id": request_id}},
                        status_code=status, headers=headers)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "unknown")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serving = ServingState()
        # Loading and warm-up block for seconds: keep them off the event loop so /healthz answers.
        state = await run_in_threadpool(load_serving_state, settings)
        if state.batcher is not None:
            state.batcher.start()
        app.state.serving = state
        yield
        if state.batcher is not None:
            await state.batcher.stop()
        if state.decoder is not None:
            state.decoder.close()

    app = FastAPI(
        title="Pediatric chest X-ray inference API",
        version="0.1.0",
        description="POST a chest radiograph as DICOM; get findings (boxes in the image's own pixel space) and "
                    "disease probabilities. Research use only: not for diagnostic use.",
        lifespan=lifespan,
    )
    app.state.serving = ServingState()
    app.dependency_overrides[get_settings] = lambda: settings
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(studies.router)

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        supplied = request.headers.get("x-request-id", "")
        request.state.request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        # Method, path, status and time only: never headers, bodies or DICOM values (PHI).
        log.info("%s %s %d %.1f ms request_id=%s", request.method, request.url.path, response.status_code,
                 (time.perf_counter() - started) * 1e3, request.state.request_id)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, _request_id(request), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(422, "invalid_request", problems, _request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), _request_id(request), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # A 500 is a bug in this service: log the type and stack (no request content) under the request id.
        log.error("unhandled %s request_id=%s", type(exc).__name__, _request_id(request), exc_info=exc)
        return error_response(500, "internal_error", "An internal error occurred; report the request id.",
                              _request_id(request))

    return app
