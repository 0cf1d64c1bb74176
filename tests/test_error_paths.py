"""The rest of the error table: 405, 429 (queue full), 503 (not ready), 500 (a bug, with request id); no PHI in logs."""

from __future__ import annotations

import asyncio
import logging
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.errors import Overloaded
from service.inference.batcher import Batcher
from tests.live import LiveService
from training.synthetic import dicom_bytes, synthesize_instance


def test_wrong_method_is_json_405(client):
    """GET on a POST-only endpoint answers 405 in the JSON error shape."""
    response = client.get("/v1/predict")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_full_queue_raises_overloaded_with_retry_after():
    """With one batch running and the queue full, the next image is refused (429) with Retry-After."""
    release = threading.Event()

    def slow_infer(images: np.ndarray):
        release.wait(10)
        return (images,)

    async def scenario():
        batcher = Batcher(slow_infer, max_batch_size=1, max_delay_s=0.0, max_queue_size=1)
        batcher.start()
        image = np.zeros((1, 4, 4), np.float32)
        running = asyncio.create_task(batcher.submit(image))
        await asyncio.sleep(0.05)  # the worker has taken it and is inferring
        queued = asyncio.create_task(batcher.submit(image))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(image)
        release.set()
        await asyncio.gather(running, queued)
        await batcher.stop()
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"


def test_missing_pack_is_not_ready_503_and_says_why(tiny_settings, tmp_path, caplog):
    """Without a loadable pack /readyz and /v1/predict answer 503 with a reason code; the path is only logged."""
    missing = tmp_path / "nowhere"
    with (
        caplog.at_level(logging.ERROR),
        TestClient(create_app(tiny_settings.model_copy(update={"models": missing}))) as broken,
    ):
        assert broken.get("/healthz").status_code == 200
        ready = broken.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "not ready", "reason": "pack_rejected"}
        response = broken.post("/v1/predict", content=b"x", headers={"Content-Type": "application/dicom"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert response.json()["error"]["code"] == "not_ready" and str(tmp_path) not in response.text
    assert f"no manifest.json in {missing}" in caplog.text


def test_inference_bug_is_500_with_request_id_and_service_recovers(tiny_settings, tiny_dataset):
    """An exception in inference fails that request with 500 internal_error and its request id; the next succeeds."""
    data = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    with TestClient(create_app(tiny_settings), raise_server_exceptions=False) as app_client:
        batcher = app_client.app.state.serving.batcher
        working = batcher._infer

        def broken(images):
            raise RuntimeError("simulated kernel failure")

        batcher._infer = broken
        response = app_client.post(
            "/v1/predict", content=data, headers={"Content-Type": "application/dicom", "X-Request-ID": "trace-42"}
        )
        assert response.status_code == 500
        assert response.json()["error"] == {
            "code": "internal_error",
            "request_id": "trace-42",
            "message": "An internal error occurred; report the request id.",
        }
        batcher._infer = working
        assert (
            app_client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"}).status_code
            == 200
        )


def test_polyglot_preamble_is_ignored(client):
    """Arbitrary bytes in the 128-byte preamble (e.g. a polyglot file) do not change the answer."""
    ds, _ = synthesize_instance(seed=21, rows=320, cols=288)
    data = dicom_bytes(ds)
    polyglot = b"MZ<script>alert(1)</script>".ljust(128, b"\xff") + data[128:]
    plain = client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"}).json()
    mixed = client.post("/v1/predict", content=polyglot, headers={"Content-Type": "application/dicom"})
    assert mixed.status_code == 200 and mixed.json()["diseases"] == plain["diseases"]


def test_logs_hold_hashed_uids_and_no_phi(client, caplog):
    """Posting a DICOM full of sentinel PHI (as JSON and as SR) logs its hashed image_id and no PHI or raw UIDs."""
    ds, _ = synthesize_instance(seed=22, rows=320, cols=288)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "SENTINEL^NAME", "SENTINEL-ID-9431", "20190417"
    ds.InstitutionName, ds.AccessionNumber = "SENTINEL HOSPITAL", "SENTINELACC"
    with caplog.at_level(logging.DEBUG):
        response = client.post("/v1/predict", content=dicom_bytes(ds), headers={"Content-Type": "application/dicom"})
        client.post("/v1/predict", content=dicom_bytes(ds)[:2000], headers={"Content-Type": "application/dicom"})
        # The SR is built with highdicom, whose INFO lines name the source dataset by its SOP Instance UID.
        report = client.post(
            "/v1/predict?format=sr", content=dicom_bytes(ds), headers={"Content-Type": "application/dicom"}
        )
    assert response.status_code == 200 and report.status_code == 200
    text = caplog.text
    assert response.json()["instance"]["image_id"] in text
    # One access line per request, with its final status and id.
    assert "POST /v1/predict 200 " in text and f"request_id={response.headers['X-Request-ID']}" in text
    assert "POST /v1/predict 400 " in text
    for secret in ("SENTINEL", "9431", "20190417", str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)):
        assert secret not in text


def test_uploads_are_never_written_to_disk(tiny_settings, tiny_dataset, monkeypatch):
    """Raw, multipart (large), SR, PNG and STOW requests open no file for writing and create no temporary file."""
    import builtins
    import io
    import tempfile

    data = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    settings = tiny_settings.model_copy(update={"decode_in_processes": False})  # decode here, where the guard sees it
    with TestClient(create_app(settings)) as local:
        written: list[str] = []
        real_open, real_io_open = builtins.open, io.open

        def guarded(opener):
            def open_(file, mode="r", *args, **kwargs):
                if isinstance(mode, str) and any(flag in mode for flag in "wax+"):
                    written.append(str(file))
                return opener(file, mode, *args, **kwargs)

            return open_

        def no_temp(*args, **kwargs):
            written.append("tempfile")
            raise AssertionError("temporary file created")

        monkeypatch.setattr(builtins, "open", guarded(real_open))
        monkeypatch.setattr(io, "open", guarded(real_io_open))
        for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
            monkeypatch.setattr(tempfile, name, no_temp)
        big = data + b"\0" * (2 * 1024 * 1024)  # above Starlette's 1 MiB spooling size, had it been used
        headers = {"Content-Type": "application/dicom"}
        assert local.post("/v1/predict", content=data, headers=headers).status_code == 200
        assert local.post("/v1/predict", files={"file": ("x.dcm", big, "application/dicom")}).status_code in (200, 400)
        assert local.post("/v1/predict", content=data, headers=headers, params={"format": "sr"}).status_code == 200
        assert local.post("/v1/predict", content=data, headers=headers, params={"format": "png"}).status_code == 200
        boundary = "b0undary"
        stow = (
            b"--"
            + boundary.encode()
            + b"\r\nContent-Type: application/dicom\r\n\r\n"
            + data
            + b"\r\n--"
            + boundary.encode()
            + b"--\r\n"
        )
        assert (
            local.post(
                "/v1/studies",
                content=stow,
                headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
            ).status_code
            == 200
        )
    assert written == []


# Run in the server process before the service starts: the SR builder fails the way highdicom does on a bad value,
# with the value in the message.
RAISE_WITH_PHI = """
import service.viewer_outputs.render as render

def build_sr(source, result):
    raise ValueError(f"Value {source.PatientName!r} of PatientName is invalid; PatientID {source.PatientID!r}")

render.build_sr = build_sr
"""


def test_internal_error_logs_type_and_frames_but_no_phi(tiny_pack, tmp_path):
    """A 500 on an image with sentinel PHI logs type and frames under the request id, not the PHI its message quotes."""
    ds, _ = synthesize_instance(seed=23, rows=320, cols=288)
    ds.PatientName, ds.PatientID = "SENTINEL^PHINAME", "SENTINEL-PHI-ID"
    with LiveService(tiny_pack, tmp_path / "server.log", prelude=RAISE_WITH_PHI) as server:
        response = httpx.post(
            f"{server.base}/v1/predict?format=sr",
            content=dicom_bytes(ds),
            headers={"Content-Type": "application/dicom", "X-Request-ID": "phi-trace-1"},
            timeout=30,
        )
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
        assert "SENTINEL" not in response.text
        assert httpx.get(f"{server.base}/readyz", timeout=5).status_code == 200  # still serving
    output = server.output()
    assert "SENTINEL" not in output and "PHINAME" not in output, output
    assert "unhandled exception request_id=phi-trace-1" in output and "builtins.ValueError" in output
    assert "in build_sr" in output  # where it failed: the frames are there


def test_scrubbed_traceback_keeps_a_decode_workers_frames_but_not_its_message():
    """An exception from a decode worker logs the worker's frames (file, line, function), never its message."""
    from concurrent.futures import ProcessPoolExecutor

    from service.api.request_context import scrubbed_traceback

    with ProcessPoolExecutor(1) as pool:
        failed = pool.submit(int, "SENTINEL-PHI-VALUE")
        try:
            failed.result()
        except ValueError as exc:
            logged = scrubbed_traceback(exc)
    assert "SENTINEL" not in logged and "builtins.ValueError" in logged
    assert "_RemoteTraceback" in logged and "in _process_worker" in logged  # the worker's own frames
