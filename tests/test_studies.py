"""POST /v1/studies (STOW-RS style): several instances per request, per-instance results and failures."""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import io
import re
import threading
from pathlib import Path

import httpx
import pydicom
import pytest
import uvicorn

from service.api.app import create_app
from service.viewer_outputs.codes import PRIORITY_VALUES, TRIAGE_PRIORITY
from tests.dicom_checks import sr_qualitative_evaluations
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
        pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files
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


# --- study-scoped STOW and result objects back ---------------------------------------------------


def _study_of(data: bytes) -> str:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID


def _objects(response) -> list[pydicom.Dataset]:
    """The parts of a multipart/related; type="application/dicom" answer, read as DICOM."""
    kind = response.headers["content-type"]
    assert kind.startswith('multipart/related; type="application/dicom"'), kind
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + kind.encode() + b"\r\n\r\n" + response.content
    )
    parts = list(message.iter_parts())
    assert all(part.get_content_type() == "application/dicom" for part in parts)
    return [pydicom.dcmread(io.BytesIO(part.get_payload(decode=True))) for part in parts]


def test_study_scoped_store_accepts_its_own_study(client, tiny_dataset):
    """POST /v1/studies/{study} with instances of that study stores (predicts) them all: 200."""
    (data,) = _test_files(tiny_dataset, 1)
    body, headers = _related(data, data)
    response = client.post(f"/v1/studies/{_study_of(data)}", content=body, headers=headers)
    assert response.status_code == 200, response.text
    referenced = pydicom.Dataset.from_json(response.json()).ReferencedSOPSequence
    assert len(referenced) == 2 and "FailedSOPSequence" not in pydicom.Dataset.from_json(response.json())


def test_study_scoped_store_fails_instances_of_another_study(client, tiny_dataset):
    """An instance of another study fails with reason 0xA901 (202 when others pass, 409 when none does)."""
    mine, other = _test_files(tiny_dataset, 2)
    assert _study_of(mine) != _study_of(other)
    body, headers = _related(mine, other)
    response = client.post(f"/v1/studies/{_study_of(mine)}", content=body, headers=headers)
    assert response.status_code == 202
    answer = pydicom.Dataset.from_json(response.json())
    (failed,) = answer.FailedSOPSequence
    assert failed.FailureReason == 0xA901
    assert failed.ReferencedSOPInstanceUID == pydicom.dcmread(io.BytesIO(other)).SOPInstanceUID
    body, headers = _related(other)
    response = client.post(
        f"/v1/studies/{_study_of(mine)}", content=body, headers=headers | {"Accept": "application/json"}
    )
    assert response.status_code == 409
    assert response.json()["failures"][0]["code"] == "study_instance_uid_mismatch"


def test_study_uid_in_the_path_must_be_a_uid(client, tiny_dataset):
    """A path segment that is not a UID is refused before the body is read (422 invalid_request)."""
    body, headers = _related(*_test_files(tiny_dataset, 1))
    response = client.post("/v1/studies/not-a-uid", content=body, headers=headers)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_store_returns_the_srs_as_multipart_when_asked(client, tiny_dataset):
    """Accept: multipart/related; type="application/dicom" returns one SR per instance, as /v1/predict makes it."""
    files = _test_files(tiny_dataset, 2)
    body, headers = _related(*files)
    response = client.post(
        "/v1/studies", content=body, headers=headers | {"Accept": 'multipart/related; type="application/dicom"'}
    )
    assert response.status_code == 200, response.text
    srs = _objects(response)
    assert [sr.Modality for sr in srs] == ["SR", "SR"]
    for sr, data in zip(srs, files):
        single = client.post("/v1/predict?format=sr", content=data, headers={"Content-Type": "application/dicom"})
        assert sr.SOPInstanceUID == pydicom.dcmread(io.BytesIO(single.content)).SOPInstanceUID
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == _study_of(data)


def test_store_answers_carry_the_triage_of_a_single_predict(client, tiny_dataset):
    """Issue 17: the STOW path gives each instance the triage /v1/predict gives it, in JSON and in its SR."""
    files = _test_files(tiny_dataset, 2)
    body, headers = _related(*files)
    results = client.post("/v1/studies", content=body, headers=headers | {"Accept": "application/json"}).json()
    srs = _objects(client.post("/v1/studies?format=sr", content=body, headers=headers))
    for result, sr, data in zip(results["results"], srs, files, strict=True):
        single = client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"}).json()
        assert result["triage"] is not None and result["triage"] == single["triage"]
        (priority,) = [
            item
            for item in sr_qualitative_evaluations(sr)
            if item.ConceptNameCodeSequence[0].CodeValue == TRIAGE_PRIORITY.value
        ]
        assert priority.ConceptCodeSequence[0].CodeValue == PRIORITY_VALUES[single["triage"]["priority"]].value


def test_format_chooses_the_objects_returned(client, tiny_dataset):
    """format=gsps&format=sc (no Accept) returns a GSPS and a burned-in image per instance, in that order."""
    (data,) = _test_files(tiny_dataset, 1)
    body, headers = _related(data)
    response = client.post("/v1/studies?format=gsps&format=sc", content=body, headers=headers)
    assert response.status_code == 200, response.text
    gsps, sc = _objects(response)
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert client.post("/v1/studies?format=png", content=body, headers=headers).status_code == 422


def test_partial_failure_with_objects_names_the_failures_in_warnings(client, tiny_dataset):
    """With result objects, a failed instance gives 202, the others' objects, and a Warning header naming it."""
    (good,) = _test_files(tiny_dataset, 1)
    body, headers = _related(b"not a dicom at all" * 20, good)
    response = client.post("/v1/studies?format=sr", content=body, headers=headers)
    assert response.status_code == 202
    assert len(_objects(response)) == 1
    assert "part 0: not_dicom" in response.headers["warning"] and response.headers["warning"].startswith("299 ")


def test_unproducible_accept_gets_406(client, tiny_dataset):
    """An Accept the store cannot produce (XML, a single application/dicom) is refused with 406."""
    body, headers = _related(*_test_files(tiny_dataset, 1))
    for accept in ("application/dicom+xml", 'multipart/related; type="image/jpeg"'):
        response = client.post("/v1/studies", content=body, headers=headers | {"Accept": accept})
        assert response.status_code == 406, accept


def _readme_block(containing: str) -> str:
    """The README's python code block that contains `containing`."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if containing in b]
    return block


def test_readme_dicomweb_client_example_runs_as_printed(live_server, tiny_dataset):
    """The README's dicomweb-client example (server URL, phantom folder swapped) prints an SR and a burned-in image."""
    code = _readme_block("keep_result_objects").replace("http://127.0.0.1:8000", live_server)
    code = code.replace("/tmp/phantoms/test/*.dicom", str(tiny_dataset / "test" / "*.dicom"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    lines = [line.split() for line in printed.getvalue().splitlines()]
    assert [(line[0], line[1]) for line in lines] == [("SR", "9901"), ("OT", "9903")]
    first = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    single = httpx.post(
        f"{live_server}/v1/predict?format=sr", content=first, headers={"Content-Type": "application/dicom"}, timeout=60
    )
    assert lines[0][2] == pydicom.dcmread(io.BytesIO(single.content)).SOPInstanceUID  # the same SR as /v1/predict
