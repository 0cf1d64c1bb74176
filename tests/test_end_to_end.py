"""The vertical slice: generate -> train -> export -> serve -> predict, and the committed demo pack."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.inference.modelpack import ModelPack
from service.settings import DEFAULT_PACK, Settings
from training.synthetic import dicom_bytes, synthesize_instance


def _assert_valid_prediction(body: dict, rows: int, columns: int, pack: ModelPack) -> None:
    assert body["instance"]["rows"] == rows and body["instance"]["columns"] == columns
    assert [d["label"] for d in body["diseases"]] == pack.global_labels
    for disease in body["diseases"]:
        assert 0.0 <= disease["probability"] <= 1.0
        assert disease["positive"] == (disease["probability"] >= disease["threshold"])
    for finding in body["findings"]:
        box = finding["box"]
        assert finding["label"] in pack.local_labels
        assert 0 <= box["x_min"] < box["x_max"] <= columns and 0 <= box["y_min"] < box["y_max"] <= rows
    assert body["model"]["detector_sha256"] == pack.manifest["detector"]["sha256"]
    assert {"decode", "preprocess", "queue", "inference", "total"} <= set(body["timing_ms"])


def test_trained_pack_serves_a_test_split_dicom(client, tiny_dataset, tiny_pack):
    """A DICOM from the generated test split, POSTed raw, gets findings and probabilities for the pack's labels."""
    path = sorted((tiny_dataset / "test").glob("*.dicom"))[0]
    response = client.post("/v1/predict", content=path.read_bytes(), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["instance"]["image_id"] == path.stem  # the VinDr image_id scheme: md5 of the SOP Instance UID
    _assert_valid_prediction(body, 400, 336, ModelPack.load(tiny_pack))


def test_multipart_upload_matches_raw_upload(client, tiny_dataset):
    """The same file sent as multipart/form-data field 'file' gives the same findings and probabilities."""
    data = sorted((tiny_dataset / "test").glob("*.dicom"))[1].read_bytes()
    raw = client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"}).json()
    form = client.post("/v1/predict", files={"file": ("image.dcm", data, "application/dicom")})
    assert form.status_code == 200, form.text
    assert form.json()["findings"] == raw["findings"] and form.json()["diseases"] == raw["diseases"]


def test_health_readiness_and_model_description(client, tiny_pack):
    """/healthz and /readyz answer, and /v1/models describes the pack and the provider in use."""
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    models = client.get("/v1/models").json()
    pack = ModelPack.load(tiny_pack)
    assert models["classifier_labels"] == pack.global_labels and models["detector_labels"] == pack.local_labels
    assert models["providers"] == ["CPUExecutionProvider"]
    # The per-label operating points of the findings, as the manifest ships them (0 where it has none).
    shipped = pack.manifest["detector"]["thresholds"]
    assert models["detector_thresholds"] == {
        label: pytest.approx(shipped.get(label, 0.0)) for label in pack.local_labels
    }
    assert models["thresholds"] == pytest.approx(pack.thresholds)


def test_concurrent_requests_are_batched_and_answered_individually(client, tiny_dataset):
    """Simultaneous requests share inference batches, and each gets the answer for its own image."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted((tiny_dataset / "test").glob("*.dicom"))[:6]
    single = {
        f.stem: client.post("/v1/predict", content=f.read_bytes(), headers={"Content-Type": "application/dicom"}).json()
        for f in files
    }
    with ThreadPoolExecutor(6) as pool:
        together = list(
            pool.map(
                lambda f: client.post(
                    "/v1/predict", content=f.read_bytes(), headers={"Content-Type": "application/dicom"}
                ).json(),
                files * 2,
            )
        )
    for answer in together:
        alone = single[answer["instance"]["image_id"]]
        got = np.array([d["probability"] for d in answer["diseases"]])
        np.testing.assert_allclose(got, [d["probability"] for d in alone["diseases"]], atol=2e-4)


@pytest.mark.skipif(not (DEFAULT_PACK / "manifest.json").exists(), reason="demo pack not built yet")
def test_demo_pack_answers_a_1643x1349_dicom():
    """The committed demo pack verifies, serves, and answers a generated 1643x1349 DICOM (the paper's median size)."""
    pack = ModelPack.load(DEFAULT_PACK)
    ds, _ = synthesize_instance(seed=2024, rows=1643, cols=1349, findings=["Consolidation", "Cardiomegaly"])
    settings = Settings(models=DEFAULT_PACK, max_batch_size=2, providers=["CPUExecutionProvider"])
    with TestClient(create_app(settings)) as demo:
        response = demo.post("/v1/predict", content=dicom_bytes(ds), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text
    _assert_valid_prediction(response.json(), 1643, 1349, pack)
    assert json.loads((DEFAULT_PACK / "manifest.json").read_text())["intended_use"].startswith("Research use only")


def test_findings_are_reported_at_the_packs_operating_points(client, tiny_dataset, tiny_pack, tiny_settings):
    """Each reported finding scores at least its label's validation-chosen threshold; a floor setting overrides them."""
    pack = ModelPack.load(tiny_pack)
    thresholds = pack.manifest["detector"]["thresholds"]
    assert set(thresholds) == set(pack.local_labels)
    data = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    headers = {"Content-Type": "application/dicom"}
    reported = client.post("/v1/predict", content=data, headers=headers).json()["findings"]
    assert all(f["score"] >= thresholds[f["label"]] for f in reported)
    with TestClient(create_app(tiny_settings.model_copy(update={"finding_score_floor": 0.0}))) as everything:
        every = everything.post("/v1/predict", content=data, headers=headers).json()["findings"]
    assert [f for f in every if f["score"] >= thresholds[f["label"]]] == reported
