"""Bad input gets a clear 4xx JSON error (never a 500), and the service keeps serving afterwards."""

from __future__ import annotations

import pytest

from training.synthetic import dicom_bytes, synthesize_instance


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code and body["message"] and body["request_id"] == response.headers["X-Request-ID"]
    return body


@pytest.mark.parametrize(
    "body", [b"", b"hello, this is not a DICOM file" * 10, b"\x00" * 200, b"%PDF-1.7\n" + b"x" * 500]
)
def test_non_dicom_bodies_get_400(client, body):
    """Empty bodies, text, zeros and other file types are rejected as not DICOM."""
    _error(client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom"}), 400, "not_dicom")


def test_truncated_dicom_gets_4xx(client):
    """A DICOM cut off in the middle of its pixel data is a client error, not a crash."""
    ds, _ = synthesize_instance(seed=1, rows=300, cols=260)
    data = dicom_bytes(ds)
    response = client.post("/v1/predict", content=data[: len(data) // 2], headers={"Content-Type": "application/dicom"})
    assert 400 <= response.status_code < 500 and "error" in response.json()


def test_unsupported_content_type_gets_415(client):
    """A body that is neither application/dicom nor multipart/form-data gets 415."""
    _error(
        client.post("/v1/predict", content=b"{}", headers={"Content-Type": "application/json"}),
        415,
        "unsupported_media_type",
    )


def test_multipart_without_file_field_gets_422_invalid_request(client):
    """A form with no 'file' field is an invalid request (422 invalid_request), not a malformed DICOM."""
    _error(client.post("/v1/predict", files={"image": ("x.dcm", b"abc", "application/dicom")}), 422, "invalid_request")
    _error(client.post("/v1/predict", data={"note": "no file"}, files={"other": ("a", b"")}), 422, "invalid_request")


def test_colour_image_gets_422(client):
    """Valid DICOM that is not a grayscale radiograph is unusable (422)."""
    ds, _ = synthesize_instance(seed=2, rows=64, cols=64)
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3
    _error(
        client.post("/v1/predict", content=dicom_bytes(ds), headers={"Content-Type": "application/dicom"}),
        422,
        "unusable_image",
    )


def test_dicom_without_pixels_gets_422(client):
    """A DICOM object with no Pixel Data (e.g. a report) is unusable (422)."""
    ds, _ = synthesize_instance(seed=3, rows=64, cols=64)
    del ds.PixelData
    _error(
        client.post("/v1/predict", content=dicom_bytes(ds), headers={"Content-Type": "application/dicom"}),
        422,
        "unusable_image",
    )


def test_oversized_declared_body_gets_413(client):
    """A Content-Length above the limit is refused before the body is read."""
    response = client.post(
        "/v1/predict", content=b"x" * 1024, headers={"Content-Type": "application/dicom", "Content-Length": str(10**12)}
    )
    _error(response, 413, "payload_too_large")


def test_unknown_route_is_json_404(client):
    """Unknown paths answer in the same JSON error shape."""
    _error(client.get("/v1/nothing-here"), 404, "not_found")


def test_service_keeps_serving_after_bad_input(client, tiny_dataset):
    """After a burst of bad requests, a good DICOM still gets a 200."""
    for body in (b"", b"junk" * 100):
        client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom"})
    good = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    assert client.post("/v1/predict", content=good, headers={"Content-Type": "application/dicom"}).status_code == 200
