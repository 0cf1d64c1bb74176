"""Access: API keys checked by digest (401/403), open and protected paths, key-file rotation, security headers, CORS."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
from fastapi.testclient import TestClient

from service.api import auth
from service.api.app import create_app


def make_key() -> tuple[str, str]:
    key = os.urandom(24).hex()
    return key, hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def key_pair():
    return make_key()


@pytest.fixture(scope="module")
def secured(tiny_settings, key_pair):
    """One app with auth on and a single inline key, shared by the read-only checks."""
    settings = tiny_settings.model_copy(
        update={"auth_enabled": True, "api_key_sha256s": [f"ward-viewer:{key_pair[1]}"]}
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["request_id"] == response.headers["x-request-id"]


def test_missing_key_is_401_with_www_authenticate(secured):
    """No key on /v1/models answers 401 `unauthorized` in the JSON error shape, with WWW-Authenticate: Bearer."""
    response = secured.get("/v1/models")
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_403(secured):
    """A key that matches no configured digest answers 403 `forbidden`, by either header."""
    assert_error(secured.get("/v1/models", headers={"Authorization": "Bearer not-the-key"}), 403, "forbidden")
    assert_error(secured.get("/v1/models", headers={"X-API-Key": "not-the-key"}), 403, "forbidden")


def test_right_key_by_bearer_or_x_api_key(secured, key_pair):
    """The configured key opens /v1/models sent as `Authorization: Bearer` or as `X-API-Key`."""
    key = key_pair[0]
    assert secured.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert secured.get("/v1/models", headers={"authorization": f"bearer {key}"}).status_code == 200
    assert secured.get("/v1/models", headers={"X-API-Key": key}).status_code == 200


def test_post_without_key_is_refused_before_the_body_is_used(secured):
    """POST /v1/predict without a key is 401, not a DICOM error: the upload is never looked at."""
    response = secured.post("/v1/predict", content=b"not a dicom", headers={"Content-Type": "application/dicom"})
    assert_error(response, 401, "unauthorized")


def test_unknown_paths_need_a_key_too(secured):
    """Paths with no route are refused (401) rather than answering 404, so probing learns nothing."""
    assert_error(secured.get("/v1/nothing-here"), 401, "unauthorized")


def test_key_name_is_logged_never_the_key(secured, key_pair, caplog):
    """The request line names the key (`key=ward-viewer`); neither the key nor its digest appears in the log."""
    with caplog.at_level(logging.INFO, logger="service"):
        secured.get("/v1/models", headers={"X-API-Key": key_pair[0]})
    assert "key=ward-viewer" in caplog.text
    assert key_pair[0] not in caplog.text and key_pair[1] not in caplog.text


def test_two_keys_both_work(tiny_settings):
    """With two digests configured (one named, one bare), each key opens /v1/models."""
    (key_a, digest_a), (key_b, digest_b) = make_key(), make_key()
    settings = tiny_settings.model_copy(
        update={"auth_enabled": True, "api_key_sha256s": [f"pacs:{digest_a}", digest_b.upper()]}
    )
    with TestClient(create_app(settings)) as local:
        for key in (key_a, key_b):
            assert local.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_health_and_docs_open_by_default_metrics_protected(secured):
    """With auth on, /healthz, /readyz, /docs, /redoc, their assets and /openapi.json need no key; /metrics does (by
    default)."""
    for path in ("/healthz", "/readyz", "/docs", "/redoc", "/docs-assets/swagger-ui.css", "/openapi.json"):
        assert secured.get(path).status_code == 200, path
    assert_error(secured.get("/metrics"), 401, "unauthorized")


def test_openapi_declares_the_key_schemes(secured):
    """OpenAPI lists Bearer and X-API-Key schemes, required on /v1 paths and not on the open probes."""
    schema = secured.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/v1/models"]["get"]


def test_probes_and_docs_protected_when_configured(tiny_settings, key_pair):
    """CXR_AUTH_PROTECT_HEALTH / _DOCS require a key there; CXR_AUTH_PROTECT_METRICS=false opens /metrics."""
    settings = tiny_settings.model_copy(
        update={
            "auth_enabled": True,
            "api_key_sha256s": [key_pair[1]],
            "auth_protect_health": True,
            "auth_protect_docs": True,
            "auth_protect_metrics": False,
        }
    )
    with TestClient(create_app(settings)) as local:
        for path in ("/healthz", "/readyz", "/docs", "/docs-assets/redoc.standalone.js", "/openapi.json"):
            assert_error(local.get(path), 401, "unauthorized")
            assert local.get(path, headers={"X-API-Key": key_pair[0]}).status_code == 200, path
        assert local.get("/metrics").status_code != 401  # 404 until a /metrics route is included


def test_keys_file_rotation_without_restart(tiny_settings, tmp_path):
    """Rewriting the keys file from key A to key B takes effect on the next request: A gets 403, B 200."""
    (key_a, digest_a), (key_b, digest_b) = make_key(), make_key()
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"# ward viewer\nold:{digest_a}\n")
    settings = tiny_settings.model_copy(update={"auth_enabled": True, "api_keys_file": keys_file})
    with TestClient(create_app(settings)) as local:
        assert local.get("/v1/models", headers={"X-API-Key": key_a}).status_code == 200
        assert local.get("/v1/models", headers={"X-API-Key": key_b}).status_code == 403
        stamp = keys_file.stat().st_mtime_ns
        keys_file.write_text(f"new:{digest_b}\n")
        os.utime(
            keys_file, ns=(stamp + 2_000_000_000, stamp + 2_000_000_000)
        )  # a coarse-mtime filesystem still sees a change
        assert_error(local.get("/v1/models", headers={"X-API-Key": key_a}), 403, "forbidden")
        assert local.get("/v1/models", headers={"X-API-Key": key_b}).status_code == 200
        keys_file.unlink()  # a removed file revokes its keys (fail closed)
        assert local.get("/v1/models", headers={"X-API-Key": key_b}).status_code == 403


def test_misconfiguration_stops_startup(tiny_settings, tmp_path):
    """Auth on with no digest, a plaintext key where a digest belongs, or a missing keys file fail in create_app."""
    on = {"auth_enabled": True}
    for update in ({}, {"api_key_sha256s": ["a-plaintext-key"]}, {"api_keys_file": tmp_path / "absent"}):
        with pytest.raises(ValueError) as raised:
            create_app(tiny_settings.model_copy(update=on | update))
        assert "a-plaintext-key" not in str(raised.value)


def test_auth_off_by_default(client, tiny_settings):
    """Without CXR_AUTH_ENABLED the shared client reaches /v1/models with no key."""
    assert tiny_settings.auth_enabled is False
    assert client.get("/v1/models").status_code == 200


def test_security_headers_on_results_and_errors(client, secured):
    """/v1 results and errors carry nosniff, DENY, no-referrer, no-store and the strict CSP; no HSTS by default."""
    for response in (client.get("/v1/models"), secured.get("/v1/models")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert "strict-transport-security" not in response.headers


def test_docs_csp_allows_this_origin_only(client):
    """/docs and /redoc get a policy that allows scripts from this origin and the page's own inline script (by hash),
    no other origin, and no framing; health is not no-store."""
    for page, inline in (("/docs", " 'sha256-"), ("/redoc", ";")):  # ReDoc's page has no inline script
        csp = client.get(page).headers["content-security-policy"]
        assert f"script-src 'self'{inline}" in csp and "frame-ancestors 'none'" in csp, csp
        assert "http" not in csp and "unsafe-eval" not in csp and "'unsafe-inline'; style" not in csp, csp
    assert "cache-control" not in client.get("/healthz").headers


def test_hsts_only_when_configured(tiny_settings):
    """CXR_HSTS=true adds Strict-Transport-Security to every response."""
    with TestClient(create_app(tiny_settings.model_copy(update={"hsts": True}))) as local:
        assert local.get("/healthz").headers["strict-transport-security"] == "max-age=31536000"


def test_cors_off_by_default(client):
    """With no configured origins, neither a request nor a preflight gets Access-Control-Allow-Origin."""
    origin = {"Origin": "https://viewer.example.org"}
    assert "access-control-allow-origin" not in client.get("/v1/models", headers=origin).headers
    preflight = client.options("/v1/predict", headers=origin | {"Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_for_configured_origin_before_auth(tiny_settings, key_pair):
    """A configured origin's preflight is answered (no key needed) with the allowed headers; others get none."""
    settings = tiny_settings.model_copy(
        update={
            "cors_allow_origins": ["https://viewer.example.org"],
            "auth_enabled": True,
            "api_key_sha256s": [key_pair[1]],
        }
    )
    with TestClient(create_app(settings)) as local:
        preflight = local.options(
            "/v1/predict",
            headers={
                "Origin": "https://viewer.example.org",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://viewer.example.org"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        actual = local.get("/v1/models", headers={"Origin": "https://viewer.example.org", "X-API-Key": key_pair[0]})
        assert actual.headers["access-control-allow-origin"] == "https://viewer.example.org"
        assert "x-request-id" in actual.headers["access-control-expose-headers"].lower()
        other = local.get("/v1/models", headers={"Origin": "https://evil.example.com", "X-API-Key": key_pair[0]})
        assert "access-control-allow-origin" not in other.headers


def test_new_key_helper_prints_key_and_its_digest(capsys):
    """`python -m service.api.auth new-key` prints a key, its sha256 and a keys-file line, and says it is not stored."""
    auth.main(["new-key", "--name", "ris"])
    out = capsys.readouterr().out
    assert "stored nowhere" in out
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    key, digest = lines["key"].strip(), lines["sha256"].strip()
    assert hashlib.sha256(key.encode()).hexdigest() == digest and len(key) >= 40
    assert lines["keys-file line"] == f"ris:{digest}"
    assert auth.parse_key_entry(lines["keys-file line"]) == ("ris", digest)
