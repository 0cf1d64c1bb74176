"""POST /v1/studies (STOW-RS style): several instances per request, per-instance results and failures."""

from __future__ import annotations

import threading

import pydicom
import pytest
import uvicorn

from service.api.app import create_app
from tests.live import free_port, wait_until_ready

BOUNDARY = "c0ffee-boundary"


def _related(*bodies: bytes, part_type: str = "application/dicom") -> tuple[bytes, dict]:
    payload = (
        b"".join(
            b"--" + BOUNDARY.encode() + b"\r\nContent-Type: " + part_type.encode() + b"\r\n\r\n" + body + b"\r\n"
            for body in bodies
        )
        + b"--"
        + BOUNDARY.encode()
        + b"--\r\n"
    )
    return payload, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}


def _test_files(tiny_dataset, count: int) -> list[bytes]:
    return [path.read_bytes() for path in sorted((tiny_dataset / "test").glob("*.dicom"))[:count]]


def test_all_instances_succeed_with_200_and_json_results(client, tiny_dataset):
    """Three good instances give 200 and, with Accept: application/json, one prediction each in order."""
    files = _test_files(tiny_dataset, 3)
    body, headers = _related(*files)
    response = client.post("/v1/studies", content=body, headers=headers | {"Accept": "application/json"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["instance"]["sop_instance_uid"] for r in results] == [
        pydicom.dcmread(__import__("io").BytesIO(f)).SOPInstanceUID for f in files
    ]
    assert response.json()["failures"] == []


def test_partial_failure_gives_202_with_reasons(client, tiny_dataset):
    """One broken instance among good ones gives 202, the good results, and the failure with its reason."""
    good = _test_files(tiny_dataset, 2)
    body, headers = _related(good[0], b"not a dicom at all" * 20, good[1])
    response = client.post("/v1/studies", content=body, headers=headers | {"Accept": "application/json"})
    assert response.status_code == 202
    assert len(response.json()["results"]) == 2
    (failure,) = response.json()["failures"]
    assert failure["index"] == 1 and failure["code"] == "not_dicom"


def test_no_instance_succeeds_gives_409_dicomweb_response(client):
    """When every instance fails, the default DICOMweb answer is 409 with a FailedSOPSequence."""
    body, headers = _related(b"junk" * 50, b"more junk" * 50)
    response = client.post("/v1/studies", content=body, headers=headers)
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/dicom+json")
    failed = pydicom.Dataset.from_json(response.json()).FailedSOPSequence
    assert [item.FailureReason for item in failed] == [0xC000, 0xC000]


def test_wrong_media_type_gets_415(client, tiny_dataset):
    """A STOW request that is not multipart/related is refused with 415."""
    response = client.post(
        "/v1/studies", content=_test_files(tiny_dataset, 1)[0], headers={"Content-Type": "application/dicom"}
    )
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_chunked_upload_without_content_length_is_accepted(client, tiny_dataset):
    """A body streamed in chunks (no Content-Length, as dicomweb-client sends large studies) is read fully."""
    body, headers = _related(*_test_files(tiny_dataset, 2))

    def chunks():
        for start in range(0, len(body), 7000):
            yield body[start : start + 7000]

    response = client.post("/v1/studies", content=chunks(), headers=headers | {"Accept": "application/json"})
    assert response.status_code == 200 and len(response.json()["results"]) == 2


@pytest.fixture(scope="module")
def live_server(tiny_settings):
    """The app served by uvicorn on a free loopback port, as a real client would reach it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until_ready(f"http://127.0.0.1:{port}", 60)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_dicomweb_client_stores_a_study(live_server, tiny_dataset):
    """dicomweb-client's store_instances (chunked multipart/related) gets every instance referenced, none failed."""
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(path) for path in sorted((tiny_dataset / "test").glob("*.dicom"))[:3]]
    web = DICOMwebClient(url=f"{live_server}/v1", chunk_size=50_000)  # small chunks: exercises chunked transfer
    response = web.store_instances(datasets)
    referenced = [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence]
    assert referenced == [ds.SOPInstanceUID for ds in datasets]
    assert "FailedSOPSequence" not in response
