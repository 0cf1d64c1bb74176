"""Schemathesis against the app's own OpenAPI document: no 5xx, and every response is one the schema declares.

The app is served in-process from `tiny_settings`; schemathesis's ASGI client runs its lifespan
(model pack loaded and warmed up) before the first generated request, and the fixture shuts it down after.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi
from schemathesis.transport.serialization import serialize_binary

from service.api.app import create_app
from service.settings import Settings
from training.synthetic import dicom_bytes, synthesize_instance

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
BOUNDARY = "schemathesis-boundary"
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _phantom() -> bytes:
    ds, _ = synthesize_instance(seed=21, rows=160, cols=144, transfer_syntax="explicit", bits_stored=12)
    return dicom_bytes(ds)


GOOD_DICOM = _phantom()


# The schema declares binary DICOM bodies that schemathesis has no built-in serializer for. Some
# of the generated bodies are replaced by (or joined with) a real phantom, chosen by the generated
# bytes' length so it stays deterministic, so that the 200 answers (JSON, SR, GSPS, PNG; STOW-RS
# 200/202/409) are checked as well, not only the errors.
@schemathesis.serializer("application/dicom")
def _dicom_body(ctx, value) -> bytes:
    data = serialize_binary(value)
    return GOOD_DICOM if len(data) % 2 == 0 else data


@schemathesis.serializer("multipart/related")
def _stow_body(ctx, value) -> bytes:
    data = serialize_binary(value)
    parts = [[GOOD_DICOM], [GOOD_DICOM, data], [data]][len(data) % 3]  # 200, 202 and 409 answers
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


# The OpenAPI document does not depend on the settings, so it is read from an app that is never
# started; schemathesis needs it at collection time. (`schemathesis.pytest.from_fixture` would
# take it from a fixture, but 4.32 reads `request.node._nodeid`, which pytest 9 no longer has.)
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture(scope="module")
def api_client(tiny_settings):
    """An in-process client of the app serving the tiny pack; schemathesis's ASGI client runs the lifespan."""
    app = create_app(tiny_settings)
    with asgi.get_client(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        yield client
    asgi.shutdown_lifespans()  # stops the batcher and the decode workers


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_api_conforms_to_its_openapi_schema(case, api_client):
    """Generated requests to every operation never get a 5xx, and status, media type and body match the schema."""
    # A multipart body needs its boundary in the Content-Type, which a serializer cannot set.
    headers = {"Content-Type": STOW_CONTENT_TYPE} if (case.media_type or "").startswith("multipart/related") else None
    case.call_and_validate(base_url=f"http://{asgi.HOST}", session=api_client, headers=headers, checks=CHECKS)


def test_schema_declares_the_error_statuses():
    """The upload routes declare every 4xx/503 status of the error contract with the JSON error body."""
    document = schema.raw_schema
    for path in ("/v1/predict", "/v1/studies"):
        responses = document["paths"][path]["post"]["responses"]
        for status in ("400", "406", "413", "415", "422", "429", "503"):
            assert status in responses, (path, status)
            assert "application/json" in responses[status]["content"], (path, status)


def test_not_ready_answers_conform_to_the_schema(tiny_settings, tmp_path):
    """Without a loadable pack, the 503 answers of /readyz, /v1/models and /v1/predict are the ones the schema
    declares."""
    with TestClient(create_app(tiny_settings.model_copy(update={"models": tmp_path / "nowhere"}))) as client:
        for method, path, kwargs in (
            ("GET", "/readyz", {}),
            ("GET", "/v1/models", {}),
            ("POST", "/v1/predict", {"content": GOOD_DICOM, "headers": {"Content-Type": "application/dicom"}}),
        ):
            response = client.request(method, path, **kwargs)
            assert response.status_code == 503, (path, response.text)
            schema[path][method].validate_response(response)
