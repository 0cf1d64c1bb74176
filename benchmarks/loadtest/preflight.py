"""Checks before any load: the host answers, TLS verifies, the key is accepted, the service is ready and takes
our DICOMs. Each failure is one line saying what to change (the command then exits with status 2).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

from benchmarks.loadtest.traffic import REQUESTS, service_error

TIMEOUT_S = 30.0
AUTH_STATUSES = (401, 403)


class CannotRun(Exception):
    """The load test cannot run; the message is the one line shown to the tester."""


@dataclass
class ServiceInfo:
    """What /v1/models says about the service under test, and warnings from the probe request."""

    models: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def normalise_host(url: str) -> str:
    """scheme://host[:port][/prefix] without a trailing slash; raises CannotRun for anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CannotRun(f"--host {display_url(url)!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise CannotRun("--host must not have a query or fragment: give the service's base URL")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def display_url(url: str) -> str:
    """The URL without user:password@ (never written into a report)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    return urlunsplit(
        (parts.scheme, netloc + (f":{parts.port}" if parts.port else ""), parts.path, parts.query, parts.fragment)
    )


def tls_verify(ca_bundle: str | None, insecure: bool) -> ssl.SSLContext | bool:
    if insecure:
        return False
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True


def auth_problem(status: int, host: str, body: bytes) -> str:
    code, _ = service_error(body)
    if status == 401:
        return f"{host} requires an API key (HTTP 401 {code}): pass --api-key KEY or set CXR_LOADTEST_API_KEY"
    return f"{host} refused the API key (HTTP 403 {code}): check --api-key or CXR_LOADTEST_API_KEY"


def connection_problem(host: str, error: httpx.HTTPError) -> str:
    """One line for a request that got no HTTP answer (refused, DNS, TLS, timeout)."""
    text = str(error) or type(error).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = (
            text.split("certificate verify failed:")[-1].strip(" )") if "certificate verify failed" in text else text
        )
        return (
            f"cannot verify the TLS certificate of {host} ({reason}): pass --ca-bundle FILE with the CA that "
            "signed it, or --insecure to skip the check"
        )
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return f"TLS handshake with {host} failed ({text}): does it serve plain HTTP? Try http://"
    if isinstance(error, httpx.TimeoutException):
        return f"{host} did not answer within {TIMEOUT_S:g} s ({type(error).__name__})"
    if isinstance(error, httpx.RemoteProtocolError):
        return f"{host} closed the connection without an HTTP answer ({text}): does it serve HTTPS? Try https://"
    return f"cannot reach {host}: {text}"


def get(client: httpx.Client, host: str, path: str) -> httpx.Response:
    try:
        return client.get(path)
    except httpx.HTTPError as error:
        raise CannotRun(connection_problem(host, error)) from None


def wait_until_ready(client: httpx.Client, host: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        response = get(client, host, "/readyz")
        if response.status_code == 200:
            return
        if response.status_code in AUTH_STATUSES:
            raise CannotRun(auth_problem(response.status_code, host, response.content))
        if response.status_code == 404:
            raise CannotRun(f"{host}/readyz answered 404: is --host the service's base URL?")
        if response.status_code != 503 or time.monotonic() > deadline:
            code, message = service_error(response.content)
            raise CannotRun(
                f"{host} is not ready (HTTP {response.status_code} {code}"
                f"{': ' + message if message else ''}) after waiting {timeout_s:g} s"
            )
        time.sleep(1.0)


def probe(client: httpx.Client, host: str, body: bytes, name: str) -> str | None:
    """POST one of our DICOMs; a refusal of the key or the path stops the test, any other failure is a warning."""
    spec = REQUESTS["predict"]
    try:
        response = client.post(spec.path, content=body, headers=spec.headers)
    except httpx.HTTPError as error:
        raise CannotRun(connection_problem(host, error)) from None
    if response.status_code in AUTH_STATUSES:
        raise CannotRun(auth_problem(response.status_code, host, response.content))
    if response.status_code in (404, 405):
        raise CannotRun(f"POST {host}/v1/predict answered {response.status_code}: is --host the service's base URL?")
    if response.status_code != 200:
        code, message = service_error(response.content)
        return (
            f"the first DICOM ({name}) was refused: HTTP {response.status_code} {code}"
            f"{': ' + message if message else ''}"
        )
    return None


def check_service(
    host: str, api_key: str, verify: ssl.SSLContext | bool, ready_timeout_s: float, probe_body: bytes, probe_name: str
) -> ServiceInfo:
    """Raises CannotRun with one line when the test cannot run against `host`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=host, headers=headers, verify=verify, timeout=TIMEOUT_S) as client:
        wait_until_ready(client, host, ready_timeout_s)
        response = get(client, host, "/v1/models")
        if response.status_code in AUTH_STATUSES:
            raise CannotRun(auth_problem(response.status_code, host, response.content))
        if response.status_code != 200:
            raise CannotRun(
                f"{host}/v1/models answered HTTP {response.status_code}: is this the CXR inference service?"
            )
        info = ServiceInfo(models=response.json())
        warning = probe(client, host, probe_body, probe_name)
        if warning:
            info.warnings.append(warning)
    return info
