"""/v1/predict returns DICOM SR, GSPS and PNG whose boxes are the JSON boxes, chosen by format or Accept."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image


def _dicom(tiny_dataset, index: int = 0) -> bytes:
    return sorted((tiny_dataset / "test").glob("*.dicom"))[index].read_bytes()


def _post(client, data: bytes, params: dict | None = None, accept: str | None = None):
    headers = {"Content-Type": "application/dicom"} | ({"Accept": accept} if accept else {})
    return client.post("/v1/predict", content=data, params=params or {}, headers=headers)


def _json_boxes(client, data: bytes) -> np.ndarray:
    findings = _post(client, data).json()["findings"]
    return np.array([[f["box"][k] for k in ("x_min", "y_min", "x_max", "y_max")] for f in findings]).reshape(-1, 4)


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _corners(points: np.ndarray) -> list[float]:
    xs, ys = points[:, 0], points[:, 1]
    return [xs.min(), ys.min(), xs.max(), ys.max()]


def test_sr_polylines_equal_json_boxes(client, tiny_dataset):
    """format=sr returns a Comprehensive SR whose closed 5-point polylines are the JSON boxes."""
    data = _dicom(tiny_dataset)
    response = _post(client, data, {"format": "sr"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(response.content))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    polylines = [
        np.array(item.GraphicData, dtype=float).reshape(-1, 2)
        for item in _walk(sr.ContentSequence)
        if item.get("ValueType") == "SCOORD"
    ]
    assert all(len(p) == 5 and np.allclose(p[0], p[-1]) for p in polylines)
    boxes = _json_boxes(client, data)
    np.testing.assert_allclose(sorted(_corners(p) for p in polylines), sorted(boxes.tolist()), atol=0.01)
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID


def test_gsps_graphics_equal_json_boxes(client, tiny_dataset):
    """format=gsps returns a presentation state referencing the image, with one polyline per JSON box."""
    data = _dicom(tiny_dataset, 1)
    response = _post(client, data, {"format": "gsps"})
    assert response.status_code == 200
    gsps = pydicom.dcmread(io.BytesIO(response.content))
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    referenced = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert referenced == source.SOPInstanceUID
    polylines = [
        np.array(g.GraphicData, dtype=float).reshape(-1, 2)
        for annotation in gsps.GraphicAnnotationSequence
        for g in annotation.get("GraphicObjectSequence", [])
    ]
    np.testing.assert_allclose(
        sorted(_corners(p) for p in polylines), sorted(_json_boxes(client, data).tolist()), atol=0.01
    )


@pytest.mark.parametrize("how", [{"params": {"format": "png"}}, {"accept": "image/png"}])
def test_png_has_the_images_size(client, tiny_dataset, how):
    """format=png or Accept: image/png returns a PNG exactly the size of the original image."""
    response = _post(client, _dicom(tiny_dataset), how.get("params"), how.get("accept"))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (336, 400)  # (columns, rows) of the tiny dataset


def test_accept_application_dicom_defaults_to_sr(client, tiny_dataset):
    """Accept: application/dicom without a format gives the SR."""
    response = _post(client, _dicom(tiny_dataset), accept="application/dicom")
    assert pydicom.dcmread(io.BytesIO(response.content)).Modality == "SR"


def test_unoffered_accept_gets_406_and_bad_format_gets_422(client, tiny_dataset):
    """An Accept nothing here can produce is 406; an unknown format value is a 422 validation error."""
    response = _post(client, _dicom(tiny_dataset), accept="text/html")
    assert response.status_code == 406 and response.json()["error"]["code"] == "not_acceptable"
    response = _post(client, _dicom(tiny_dataset), {"format": "jpeg"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
