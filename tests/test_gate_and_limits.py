"""Intended-use warnings and strict mode, and the decode time bound, through the API."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.api.app import create_app
from training.synthetic import dicom_bytes, synthesize_instance


def _post(client, data: bytes):
    return client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"})


def _adult_lateral() -> bytes:
    ds, _ = synthesize_instance(seed=11, rows=320, cols=288)
    ds.PatientAge, ds.ViewPosition = "045Y", "LL"
    return dicom_bytes(ds)


def test_out_of_distribution_image_is_answered_with_warnings(client):
    """By default an adult lateral image is still predicted, with one warning per reason."""
    response = _post(client, _adult_lateral())
    assert response.status_code == 200
    warnings = response.json()["warnings"]
    assert len(warnings) == 2 and any("lateral" in w for w in warnings)


def test_strict_mode_rejects_out_of_distribution_with_422(tiny_settings):
    """With strict intended use on, the same image gets 422 out_of_intended_use naming the reasons."""
    with TestClient(create_app(tiny_settings.model_copy(update={"strict_intended_use": True}))) as strict:
        response = _post(strict, _adult_lateral())
        assert response.status_code == 422
        assert (
            response.json()["error"]["code"] == "out_of_intended_use"
            and "lateral" in response.json()["error"]["message"]
        )
        ds, _ = synthesize_instance(seed=12, rows=320, cols=288)
        assert _post(strict, dicom_bytes(ds)).status_code == 200


def test_decode_time_is_bounded_and_the_pool_recovers(tiny_settings):
    """An image whose decoding outlasts the bound gets 422 decode_timeout; the replaced workers serve the next one."""
    ds, _ = synthesize_instance(seed=13, rows=1643, cols=1349, transfer_syntax="rle")
    settings = tiny_settings.model_copy(update={"decode_timeout_s": 0.001, "decode_workers": 1})
    with TestClient(create_app(settings)) as slow:
        response = _post(slow, dicom_bytes(ds))
        assert response.status_code == 422 and response.json()["error"]["code"] == "decode_timeout"
        pool = slow.app.state.serving.decoder
        assert pool.replaced_workers == 1
        pool.timeout_s = 60.0
        small, _ = synthesize_instance(seed=14, rows=320, cols=288)
        assert _post(slow, dicom_bytes(small)).status_code == 200


def test_oversized_streamed_body_gets_413(tiny_settings):
    """A chunked body with no Content-Length is cut off with 413 once it passes the limit."""
    with TestClient(create_app(tiny_settings.model_copy(update={"max_body_bytes": 4096}))) as small:
        response = small.post(
            "/v1/predict", content=iter([b"x" * 1024] * 10), headers={"Content-Type": "application/dicom"}
        )
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_image_above_pixel_limit_gets_422(tiny_settings):
    """Rows x Columns above the configured cap is rejected from the header, before decoding."""
    ds, _ = synthesize_instance(seed=15, rows=600, cols=500)
    with TestClient(create_app(tiny_settings.model_copy(update={"max_pixels": 100_000}))) as capped:
        response = _post(capped, dicom_bytes(ds))
        assert response.status_code == 422 and "exceeds" in response.json()["error"]["message"]


def test_decoded_size_above_byte_limit_gets_422(tiny_settings):
    """Rows x Columns x bytes per pixel above the byte cap is rejected from the header, before decoding."""
    ds, _ = synthesize_instance(seed=16, rows=600, cols=500, bits_stored=16)
    with TestClient(create_app(tiny_settings.model_copy(update={"max_pixel_bytes": 500_000}))) as capped:
        response = _post(capped, dicom_bytes(ds))  # 600 x 500 x 2 bytes = 600,000
        assert response.status_code == 422 and "bytes" in response.json()["error"]["message"]
