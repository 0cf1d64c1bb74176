"""Train/serve parity that can fail: the service's HTTP answers equal the training package's PyTorch evaluation.

A model trained in the test session (tests/conftest.py: a few steps on phantoms), exported and served; 24 phantoms
of different sizes and aspect ratios, both photometric interpretations, 8/12/16-bit, signed and unsigned, with and
without a VOI window, in 16 transfer syntaxes. The findings are reported at a score floor chosen in the widest gap
of the PyTorch scores with many boxes above it, so a drift of either side shows as a missing or extra finding instead of
hiding below a threshold. The negative checks drift one side (a one-pixel letterbox offset, a one-pixel shift in the
box mapping, another NMS IoU) and require the comparison to fail.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.dicom import pipeline, preprocess
from service.inference.calibration import Calibration
from service.settings import Settings
from tests.reference import at_operating_points
from training.data import Record
from training.evaluate import Predictions, predict_records, run_calibration, torch_infer_from_run
from training.synthetic import TRANSFER_SYNTAXES, dicom_bytes, synthesize_instance

BOX_TOLERANCE = 0.5  # original pixels
SCORE_TOLERANCE = 1e-3  # scores and probabilities
MIN_FINDINGS = 40  # over all images at the chosen floor
GAP = 2 * SCORE_TOLERANCE  # no PyTorch score within SCORE_TOLERANCE of the floor: a tolerated drift flips nothing

# (rows, columns, transfer syntax, photometric, bits stored or None to draw one the syntax can carry, findings)
CASES = [
    (512, 420, "explicit", "MONOCHROME2", 16, ["Consolidation"]),
    (420, 512, "explicit", "MONOCHROME1", 12, ["Pleural effusion", "Cardiomegaly"]),
    (300, 300, "implicit", "MONOCHROME2", 8, []),
    (640, 500, "big-endian", "MONOCHROME1", 16, ["Other opacity"]),
    (360, 610, "deflate", "MONOCHROME2", 12, ["Lung hyperinflation"]),
    (700, 560, "rle", "MONOCHROME1", 16, ["Consolidation", "Pleural effusion"]),
    (480, 400, "jpeg-baseline", "MONOCHROME2", 8, ["Peribronchovascular interstitial opacity or PIO"]),
    (520, 430, "jpeg-extended", "MONOCHROME1", 12, ["Cardiomegaly"]),
    (450, 380, "jpeg-lossless", "MONOCHROME2", 16, ["Reticulonodular opacity"]),
    (380, 450, "jpeg-lossless-sv1", "MONOCHROME1", 12, []),
    (600, 480, "jpeg-ls", "MONOCHROME2", 16, ["Bronchial thickening"]),
    (410, 330, "jpeg-ls-near", "MONOCHROME1", 12, ["Consolidation"]),
    (560, 460, "j2k", "MONOCHROME2", 16, ["Pleural effusion"]),
    (330, 520, "j2k-lossy", "MONOCHROME1", None, ["Other opacity", "Cardiomegaly"]),
    (500, 500, "htj2k", "MONOCHROME2", 12, ["Lung hyperinflation"]),
    (470, 390, "htj2k-rpcl", "MONOCHROME1", 16, []),
    (390, 470, "htj2k-lossy", "MONOCHROME2", None, ["Consolidation"]),
    (760, 620, "explicit", "MONOCHROME2", 8, ["Peribronchovascular interstitial opacity or PIO", "Pleural effusion"]),
    (256, 320, "implicit", "MONOCHROME1", 16, ["Cardiomegaly"]),
    (540, 440, "rle", "MONOCHROME2", 12, ["Reticulonodular opacity"]),
    (440, 360, "deflate", "MONOCHROME1", 8, ["Bronchial thickening"]),
    (610, 350, "explicit", "MONOCHROME2", 16, ["Other opacity"]),
    (350, 610, "jpeg-lossless", "MONOCHROME1", 16, ["Consolidation", "Lung hyperinflation"]),
    (530, 530, "j2k", "MONOCHROME2", 12, []),
]


@pytest.fixture(scope="module")
def parity_files(tmp_path_factory) -> list[Path]:
    """The phantoms, written as DICOM files; signed pixels and a missing VOI window on some of them."""
    folder = tmp_path_factory.mktemp("parity")
    files = []
    for index, (rows, columns, syntax, photometric, bits, findings) in enumerate(CASES):
        ds, _ = synthesize_instance(
            1000 + index,
            rows,
            columns,
            difficulty="easy",
            findings=findings,
            transfer_syntax=syntax,
            photometric=photometric,
            bits_stored=bits,
            signed=True if syntax in ("explicit", "big-endian") and bits == 16 else None,
            windowed=index % 4 != 0,
        )
        path = folder / f"{index:02d}.dicom"
        path.write_bytes(dicom_bytes(ds))
        files.append(path)
    return files


def _records(files: list[Path]) -> list[Record]:
    return [Record(path.stem, path, (), {}) for path in files]


def pytorch_evaluation(run: Path, files: list[Path], params=None) -> tuple[Predictions, list[str], list[str]]:
    """The training package's evaluation path: DICOM -> service preprocessing -> PyTorch -> postprocess, original px."""
    infer, spec, local_labels, global_labels, _, default_params = torch_infer_from_run(run)
    predictions = predict_records(_records(files), spec, infer, params or default_params, batch_size=5, threads=1)
    return predictions, local_labels, global_labels


def choose_floor(predictions: Predictions) -> float:
    """A reporting floor in the widest score gap below the top MIN_FINDINGS boxes; no score within GAP / 2 of it."""
    scores = np.sort(np.concatenate([d.scores for d in predictions.detections]).astype(np.float64))[::-1]
    gaps = scores[MIN_FINDINGS - 1 : -1] - scores[MIN_FINDINGS:]  # gaps[i]: below rank MIN_FINDINGS + i
    if not len(gaps) or gaps.max() <= GAP:
        raise AssertionError(f"no score gap wider than {GAP} below the top {MIN_FINDINGS} of {len(scores)} boxes")
    rank = MIN_FINDINGS + int(np.argmax(gaps))
    return float((scores[rank - 1] + scores[rank]) / 2)


def differences(
    served: list[dict],
    predictions: Predictions,
    calibration: Calibration | None,
    local_labels: list[str],
    global_labels: list[str],
    floor: float,
) -> list[str]:
    """Every way the HTTP answers and the PyTorch evaluation disagree (empty when they are the same)."""
    found = []
    raw = np.asarray(predictions.probabilities, dtype=np.float64)
    probabilities = calibration.calibrate_columns(global_labels, raw) if calibration is not None else raw
    for index, answer in enumerate(served):
        expected = at_operating_points(predictions.detections[index], np.full(len(local_labels), floor))
        for label_index, label in enumerate(local_labels):
            mine = np.flatnonzero(expected.classes == label_index)
            theirs = [f for f in answer["findings"] if f["label"] == label]
            if len(mine) != len(theirs):
                found.append(f"image {index} {label}: {len(theirs)} findings served, {len(mine)} evaluated")
                continue
            mine = mine[np.argsort(-expected.scores[mine], kind="stable")]
            theirs = sorted(theirs, key=lambda f: -f["score"])
            for k, finding in zip(mine, theirs):
                box = np.array([finding["box"][key] for key in ("x_min", "y_min", "x_max", "y_max")])
                if np.abs(box - expected.boxes[k]).max() > BOX_TOLERANCE:
                    found.append(f"image {index} {label}: box {box} vs {expected.boxes[k]}")
                if abs(finding["score"] - float(expected.scores[k])) > SCORE_TOLERANCE:
                    found.append(f"image {index} {label}: score {finding['score']} vs {expected.scores[k]}")
        served_probabilities = [disease["probability"] for disease in answer["diseases"]]
        if np.abs(np.array(served_probabilities) - probabilities[index]).max() > SCORE_TOLERANCE:
            found.append(f"image {index}: probabilities {served_probabilities} vs {probabilities[index].tolist()}")
    return found


@pytest.fixture(scope="module")
def parity(tiny_run, tiny_pack, parity_files):
    """(served answers, PyTorch predictions, labels, calibration, floor): the clean comparison's two sides."""
    predictions, local_labels, global_labels = pytorch_evaluation(tiny_run, parity_files)
    floor = choose_floor(predictions)
    settings = Settings(
        models=tiny_pack,
        providers=["CPUExecutionProvider"],
        max_batch_size=4,
        max_queue_delay_ms=2,
        finding_score_floor=floor,
    )
    with TestClient(create_app(settings)) as client:
        served = []
        for path in parity_files:
            response = client.post(
                "/v1/predict", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
            )
            assert response.status_code == 200, response.text
            served.append(response.json())
    return served, predictions, local_labels, global_labels, run_calibration(tiny_run, global_labels), floor


def test_the_parity_set_is_varied(parity_files):
    """At least 20 images, both photometric interpretations, 8/12/16 bits, signed and unsigned, 16 transfer syntaxes,
    portrait, landscape and square."""
    import pydicom

    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in parity_files]
    assert len(headers) >= 20
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {int(h.BitsStored) for h in headers} == {8, 12, 16}
    assert {int(h.PixelRepresentation) for h in headers} == {0, 1}
    assert {str(h.file_meta.TransferSyntaxUID) for h in headers} == {
        str(TRANSFER_SYNTAXES[name]) for name in TRANSFER_SYNTAXES
    }
    assert {np.sign(int(h.Rows) - int(h.Columns)) for h in headers} == {-1, 0, 1}


def test_http_answers_equal_pytorch_evaluation(parity):
    """Every served finding (label, box within 0.5 px, score within 1e-3) and probability (within 1e-3) equals the
    PyTorch evaluation's, with the same set of findings, on many findings."""
    served, predictions, local_labels, global_labels, calibration, floor = parity
    assert calibration is not None  # the run was calibrated when it was exported
    assert sum(len(answer["findings"]) for answer in served) >= MIN_FINDINGS
    assert differences(served, predictions, calibration, local_labels, global_labels, floor) == []


def test_parity_fails_when_the_letterbox_drifts_by_one_pixel(parity, tiny_run, parity_files, monkeypatch):
    """Preprocessing drift: the evaluation side places the image one model pixel off the top-left corner."""
    served, _, local_labels, global_labels, calibration, floor = parity
    original = preprocess.letterbox

    def shifted(image, size):
        canvas, geometry = original(image, size)
        moved = np.zeros_like(canvas)
        moved[1:, 1:] = canvas[:-1, :-1]
        return moved, geometry

    monkeypatch.setattr(pipeline, "letterbox", shifted)  # the name prepare() calls
    drifted, _, _ = pytorch_evaluation(tiny_run, parity_files)
    assert differences(served, drifted, calibration, local_labels, global_labels, floor)


def test_parity_fails_when_the_box_mapping_drifts_by_one_pixel(parity, tiny_run, parity_files, monkeypatch):
    """Postprocessing drift: boxes mapped back to the original image one pixel to the right."""
    served, _, local_labels, global_labels, calibration, floor = parity
    original = preprocess.Letterbox.to_original
    monkeypatch.setattr(
        preprocess.Letterbox, "to_original", lambda self, boxes: original(self, boxes) + np.float32([1, 0, 1, 0])
    )
    drifted, _, _ = pytorch_evaluation(tiny_run, parity_files)
    problems = differences(served, drifted, calibration, local_labels, global_labels, floor)
    assert problems and all("box" in problem for problem in problems)


def test_parity_fails_when_nms_changes(parity, tiny_run, parity_files):
    """Postprocessing drift: the evaluation side suppresses overlapping boxes at IoU 0.3 instead of the pack's 0.5."""
    served, _, local_labels, global_labels, calibration, floor = parity
    params = torch_infer_from_run(tiny_run)[5]
    drifted, _, _ = pytorch_evaluation(tiny_run, parity_files, replace(params, iou_threshold=0.3))
    assert any(
        "findings served" in p for p in differences(served, drifted, calibration, local_labels, global_labels, floor)
    )
