"""Every HTTP request's context: its id, access control by path, security headers and the access log line.

A pure ASGI middleware rather than Starlette's `@app.middleware("http")` (BaseHTTPMiddleware): that one
runs each `receive` of the body through a new anyio task group, and with 4 MiB DICOM uploads arriving
in many chunks that was a third of the event loop's time under load (py-spy --gil,
benchmarks/results/profile). Here `receive` is passed through untouched and only the response's first
message is edited.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.auth import KeyRing, authenticate
from service.errors import ApiError

log = logging.getLogger("service")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def error_response(status: int, code: str, message: str, request_id: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "request_id": request_id}}, status_code=status, headers=headers
    )


INTERNAL_ERROR_MESSAGE = "An internal error occurred; report the request id."
_FRAME_LINE = re.compile(r'^ *File "([^"\n]+)", line (\d+), in ([\w.<>]+)$', re.MULTILINE)


def scrubbed_traceback(exc: BaseException) -> str:
    """Exception types and stack frames (file, line, function) of `exc` and its causes: no messages, no values.

    pydicom's and highdicom's messages quote element values (a patient's name, a birth date), and a
    formatted traceback repeats them, so neither may reach the log; where it failed is enough to find the bug.
    """
    lines, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines.append(f"{type(current).__module__}.{type(current).__qualname__}, raised at:")
        lines += [
            f"  {frame.filename}:{frame.lineno} in {frame.name}"
            for frame in traceback.extract_tb(current.__traceback__)
        ]
        # An exception from a decode worker process carries the worker's traceback as text (a
        # _RemoteTraceback): its frame lines, never the message lines, say where it failed there.
        remote = getattr(current, "tb", None)
        if isinstance(remote, str):
            lines += [f"  {match[1]}:{match[2]} in {match[3]}" for match in _FRAME_LINE.finditer(remote)]
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if current is not None:
            lines.append("while handling (or caused by):")
    return "\n".join(lines)


def request_id_from(headers: Headers) -> str:
    """The caller's X-Request-ID when it is a safe token (it is echoed and logged), else a new one."""
    supplied = headers.get("x-request-id", "")
    return supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex


class RequestContext:
    """Pure ASGI middleware; the request id and the key's name go to `request.state` (scope["state"]).

    Rules by path here rather than route dependencies: they must also cover /docs, /openapi.json and
    unknown paths (no route, so no dependency runs), and run before any body is read.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing | None,
        requires_key: Callable[[str], bool],
        security_headers: Callable[[str], dict[str, str]],
        on_internal_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.requires_key = requires_key
        self.security_headers = security_headers
        self.on_internal_error = on_internal_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        request_id = request_id_from(headers)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        path = scope["path"]
        status = 500  # what the client gets if the app raises before answering
        started_response = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                response_headers = MutableHeaders(scope=message)
                for name, value in self.security_headers(path).items():
                    if name not in response_headers:  # a route that sets its own (e.g. a CSP) keeps it
                        response_headers[name] = value
                response_headers["X-Request-ID"] = request_id
            await send(message)

        key_name = None
        try:
            if self.keys is not None and self.requires_key(path):
                try:
                    key_name = state["api_key_name"] = authenticate(headers, self.keys)
                except ApiError as denied:
                    # Error handlers sit inside this middleware, so the refusal is rendered here, in the same JSON
                    # shape.
                    refusal = error_response(
                        denied.status_code, denied.code, denied.message, request_id, denied.headers
                    )
                    await refusal(scope, receive, send_with_headers)
                    return
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            # A bug in this service. Answered here rather than by an app exception handler: Starlette re-raises
            # whatever reaches its outermost middleware after the handler ran, and the server then logs the
            # exception with its message and a full traceback, which may quote DICOM values (PHI).
            log.error("unhandled exception request_id=%s: %s", request_id, scrubbed_traceback(exc))
            self.on_internal_error()
            if not started_response:
                refusal = error_response(500, "internal_error", INTERNAL_ERROR_MESSAGE, request_id)
                await refusal(scope, receive, send_with_headers)
        finally:
            # Method, path, status, time and the key's configured name only: never the key, other headers,
            # bodies or DICOM values (PHI).
            log.info(
                "%s %s %d %.1f ms request_id=%s%s",
                scope["method"],
                path,
                status,
                (time.perf_counter() - started) * 1e3,
                request_id,
                f" key={key_name}" if key_name else "",
            )
