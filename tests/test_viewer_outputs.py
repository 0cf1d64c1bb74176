"""Viewer outputs: DICOM SR (TID 1500), GSPS and PNG built from one JSON result."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ComprehensiveSRStorage

from service.viewer_outputs import DISCLAIMER
from service.viewer_outputs.codes import PRIVATE_SCHEME, code_for, private_code_value
from service.viewer_outputs.gsps import FINDINGS_LAYER, SUMMARY_LAYER, build_gsps
from service.viewer_outputs.png import render_png
from service.viewer_outputs.sr import build_sr
from training.labels import VINDR_CXR, VINDR_PCXR
from training.synthetic import dicom_bytes, synthesize_instance

UNKNOWN_LABEL = "Widened mediastinum (a label no table knows)"
MODEL = {"pack": "demo-synthetic", "version": "0.1.0", "detector_sha256": "ab" * 32, "classifier_sha256": "cd" * 32}


def _uploaded(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The source as the service holds it: parsed from Part 10 bytes, pixel data dropped."""
    source = pydicom.dcmread(io.BytesIO(dicom_bytes(ds)))
    del source.PixelData
    return source


@pytest.fixture(scope="module")
def phantom():
    ds, case = synthesize_instance(seed=5, rows=600, cols=500, findings=["Consolidation", "Cardiomegaly"])
    return _uploaded(ds), case


@pytest.fixture(scope="module")
def result(phantom) -> dict:
    source, case = phantom
    findings = [
        {
            "label": f.label,
            "score": score,
            "box": {"x_min": f.x_min, "y_min": f.y_min, "x_max": f.x_max, "y_max": f.y_max},
        }
        for f, score in zip(case.findings, (0.83, 0.6123456789))
    ]
    # A sub-pixel box and a label outside every table, as a pack trained on other labels sends.
    findings.append(
        {"label": UNKNOWN_LABEL, "score": 0.4, "box": {"x_min": 10.25, "y_min": 20.5, "x_max": 99.75, "y_max": 120.125}}
    )
    return {
        "request_id": "test",
        "instance": {"sop_instance_uid": source.SOPInstanceUID, "rows": source.Rows, "columns": source.Columns},
        "findings": findings,
        "diseases": [
            {"label": "Pneumonia", "probability": 0.71, "threshold": 0.42, "positive": True},
            {"label": "Other diseases", "probability": 0.1, "threshold": 0.3, "positive": False},
        ],
        "warnings": [],
        "model": MODEL,
    }


@pytest.fixture(scope="module")
def empty_result() -> dict:
    return {"request_id": "empty", "findings": [], "diseases": [], "warnings": [], "model": MODEL}


def _corners(box: dict) -> list[list[float]]:
    """The closed outline a viewer should draw, as (column, row) = (x, y) points."""
    x0, y0, x1, y1 = box["x_min"], box["y_min"], box["x_max"], box["y_max"]
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _dciodvfy_errors(ds: pydicom.Dataset, tmp_path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian package dicom3tools) is required in CI")
        pytest.skip("dciodvfy not on PATH (apt-get install dicom3tools)")
    path = tmp_path / "out.dcm"
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# --- codes -------------------------------------------------------------------------------------


def test_every_vindr_label_has_a_fixed_code():
    """Every VinDr-PCXR and VinDr-CXR label name has its own entry in the code table (no hashed fallback code)."""
    names = {label.name for label in VINDR_PCXR.labels + VINDR_CXR.labels}
    assert all(code_for(name).value != private_code_value(name) for name in names)


def test_standard_codes_for_common_labels():
    """Labels with a checked SNOMED CT / DCM concept get it; the others get the private scheme."""
    assert (code_for("Cardiomegaly").value, code_for("Cardiomegaly").scheme_designator) == ("8186001", "SCT")
    assert code_for("Pneumonia").value == "233604007"
    assert code_for("Pleural effusion").value == "60046008"
    assert code_for("Consolidation").value == "95436008"
    assert code_for("Bronchiolitis").value == "4120002"
    assert code_for("Reticulonodular opacity").scheme_designator == "DCM"
    pio = code_for("Peribronchovascular interstitial opacity or PIO")
    assert (pio.scheme_designator, pio.value) == (PRIVATE_SCHEME, "PCXR02")


def test_unknown_label_gets_a_deterministic_private_code():
    """An unlisted label falls back to a private code derived from its text, the same every time."""
    code = code_for(UNKNOWN_LABEL)
    assert code.scheme_designator == PRIVATE_SCHEME
    assert code.value == private_code_value(UNKNOWN_LABEL) == code_for(f"  {UNKNOWN_LABEL} ").value
    assert code.value != code_for("Another new label").value
    assert len(code.value) <= 16 and len(code_for("x" * 100).meaning) <= 64


# --- SR ----------------------------------------------------------------------------------------


def test_sr_round_trips_with_boxes_codes_and_probabilities(phantom, result):
    """The SR survives BytesIO; each ROI is the box's closed polygon with its label code and score."""
    source, _ = phantom
    written = _roundtrip(build_sr(source, result))
    assert written.SOPClassUID == ComprehensiveSRStorage
    sr = hd.sr.ComprehensiveSR.from_dataset(written)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(result["findings"])
    for group, finding in zip(groups, result["findings"]):
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_allclose(group.roi.value, _corners(finding["box"]), atol=1e-3)
        assert group.finding_type == code_for(finding["label"])
        (probability,) = group.get_measurements()
        assert probability.name.meaning == "Probability"
        assert probability.value == pytest.approx(finding["score"], abs=1e-6)
        assert group.tracking_uid is not None and finding["label"] in group.tracking_identifier


def test_sr_reports_diseases_against_their_thresholds(phantom, result):
    """Each disease is an image-level group with its probability and Present/Absent evaluation."""
    source, _ = phantom
    sr = hd.sr.srread(io.BytesIO(dicom_bytes(build_sr(source, result))))
    groups = sr.content.get_image_measurement_groups()
    assert [g.finding_type for g in groups] == [code_for(d["label"]) for d in result["diseases"]]
    for group, disease in zip(groups, result["diseases"]):
        assert group.get_measurements()[0].value == pytest.approx(disease["probability"])
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value.meaning == ("Present" if disease["positive"] else "Absent")


def test_sr_references_the_source_image_and_says_not_for_diagnosis(phantom, result):
    """Evidence and every ROI point at the source instance; the research disclaimer is on the SR."""
    source, _ = phantom
    written = _roundtrip(build_sr(source, result))
    sr = hd.sr.ComprehensiveSR.from_dataset(written)
    assert [e[2] for e in sr.get_evidence()] == [source.SOPInstanceUID]
    assert written.StudyInstanceUID == source.StudyInstanceUID and written.PatientID == source.PatientID
    for group in sr.content.get_planar_roi_measurement_groups():
        referenced = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert written.ContentQualification == "RESEARCH" and written.SeriesDescription.endswith(DISCLAIMER)
    assert written.PreliminaryFlag == "PRELIMINARY" and written.VerificationFlag == "UNVERIFIED"
    comments = [item.TextValue for item in written.ContentSequence[-1].ContentSequence]
    assert any("NOT FOR DIAGNOSTIC USE" in text for text in comments)
    assert PRIVATE_SCHEME in [item.CodingSchemeDesignator for item in written.CodingSchemeIdentificationSequence]


def test_sr_passes_dciodvfy(phantom, result, tmp_path):
    """dciodvfy reports no errors for the SR."""
    assert _dciodvfy_errors(build_sr(phantom[0], result), tmp_path) == []


# --- GSPS --------------------------------------------------------------------------------------


def _annotations(gsps: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    return {item.GraphicLayer: item for item in gsps.GraphicAnnotationSequence}


def test_gsps_round_trips_with_boxes_and_captions(phantom, result):
    """GSPS polylines equal the boxes; each box has a "label score" text at its top left corner."""
    source, _ = phantom
    gsps = _roundtrip(build_gsps(source, result))
    layer = _annotations(gsps)[FINDINGS_LAYER]
    for graphic, text, finding in zip(layer.GraphicObjectSequence, layer.TextObjectSequence, result["findings"]):
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        np.testing.assert_allclose(np.reshape(graphic.GraphicData, (-1, 2)), _corners(finding["box"]), atol=1e-3)
        assert text.UnformattedTextValue == f"{finding['label']} {finding['score']:.2f}"
        np.testing.assert_allclose(text.AnchorPoint, [finding["box"]["x_min"], finding["box"]["y_min"]], atol=1e-3)
    summary = [t.UnformattedTextValue for t in _annotations(gsps)[SUMMARY_LAYER].TextObjectSequence]
    assert summary == [DISCLAIMER, "Pneumonia 0.71 +", "Other diseases 0.10"]


def test_gsps_references_the_source_image(phantom, result):
    """The presentation state and each of its annotations apply to the source instance."""
    source, _ = phantom
    gsps = _roundtrip(build_gsps(source, result))
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence] == [source.SOPInstanceUID]
    for annotation in gsps.GraphicAnnotationSequence:
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert gsps.StudyInstanceUID == source.StudyInstanceUID and "NOT FOR DIAGNOSTIC USE" in gsps.ContentDescription


@pytest.mark.parametrize("photometric, shape", [("MONOCHROME1", "INVERSE"), ("MONOCHROME2", "IDENTITY")])
def test_gsps_keeps_the_image_display(photometric, shape):
    """The source window is carried over and MONOCHROME1 images stay inverted under the GSPS."""
    ds, _ = synthesize_instance(seed=6, rows=128, cols=112, findings=[], photometric=photometric, windowed=True)
    gsps = build_gsps(_uploaded(ds), {"findings": [], "diseases": []})
    assert gsps.PresentationLUTShape == shape
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (float(ds.WindowCenter), float(ds.WindowWidth))


def test_gsps_windows_an_unwindowed_image_over_its_pixel_range():
    """Without a window in the image, the GSPS windows the stored range (after rescale) min-max."""
    ds, _ = synthesize_instance(seed=6, rows=128, cols=112, findings=[], windowed=False)
    gsps = build_gsps(_uploaded(ds), {"findings": [], "diseases": []})
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    low, high = sorted(slope * v + intercept for v in (ds.SmallestImagePixelValue, ds.LargestImagePixelValue))
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == pytest.approx((low + high) / 2 + 0.5)
    assert float(voi.WindowWidth) == pytest.approx(high - low + 1)


def test_gsps_passes_dciodvfy(phantom, result, tmp_path):
    """dciodvfy reports no errors for the GSPS."""
    assert _dciodvfy_errors(build_gsps(phantom[0], result), tmp_path) == []


# --- PNG ---------------------------------------------------------------------------------------


def test_png_has_source_size_and_drawn_boxes(phantom, result):
    """The PNG decodes at the source's size, box edges are coloured and far pixels are untouched."""
    source, case = phantom
    png = Image.open(io.BytesIO(render_png(case.density, result)))
    assert png.format == "PNG" and png.size == (source.Columns, source.Rows)
    pixels = np.asarray(png.convert("RGB")).astype(int)
    plain = np.rint(np.clip(case.density, 0, 1) * 255).astype(int)
    for finding in result["findings"]:
        box = finding["box"]
        row, column = int((box["y_min"] + box["y_max"]) / 2), int(round(box["x_min"]))
        assert pixels[row, column].tolist() != [plain[row, column]] * 3
    assert pixels[-1, -1].tolist() == [plain[-1, -1]] * 3


# --- nothing found -----------------------------------------------------------------------------


def test_empty_result_gives_valid_outputs(phantom, empty_result, tmp_path):
    """No findings and no diseases still give a valid SR, GSPS and PNG."""
    source, case = phantom
    sr_ds = build_sr(source, empty_result)
    sr = hd.sr.ComprehensiveSR.from_dataset(_roundtrip(sr_ds))
    assert sr.content.get_planar_roi_measurement_groups() == []
    (nothing,) = sr.content.get_image_measurement_groups()
    assert nothing.finding_type.meaning == "None"
    assert _dciodvfy_errors(sr_ds, tmp_path) == []

    gsps = build_gsps(source, empty_result)
    assert list(_annotations(_roundtrip(gsps))) == [SUMMARY_LAYER]
    assert _dciodvfy_errors(gsps, tmp_path) == []

    png = Image.open(io.BytesIO(render_png(case.density, empty_result)))
    assert png.size == (source.Columns, source.Rows)


def test_sparse_header_is_enough_and_left_untouched(phantom, result, tmp_path):
    """A source without optional Type 2 attributes still works, and the caller's dataset is unchanged."""
    source = pydicom.Dataset(phantom[0])
    for keyword in ("StudyID", "AccessionNumber", "PatientSex", "BodyPartExamined", "ReferringPhysicianName"):
        delattr(source, keyword)
    before = pydicom.Dataset(source)
    sr_ds, gsps = build_sr(source, result), build_gsps(source, result)
    assert source == before and "StudyID" not in source
    assert _dciodvfy_errors(sr_ds, tmp_path) == [] and _dciodvfy_errors(gsps, tmp_path) == []


@pytest.mark.parametrize(
    "keyword,value",
    [("StudyDate", "2019-99-99"), ("StudyTime", "25:61"), ("PatientBirthDate", "yesterday"), ("StudyID", "X" * 40)],
)
def test_unreadable_type2_values_are_blanked_not_fatal(keyword, value):
    """A copied patient/study attribute whose value is invalid for its VR is emptied, and SR and GSPS still build."""
    from service.viewer_outputs.gsps import build_gsps
    from service.viewer_outputs.sr import build_sr

    ds, case = synthesize_instance(seed=31, rows=300, cols=260, findings=["Consolidation"])
    with pydicom.config.disable_value_validation():
        setattr(ds, keyword, value)
    result = {
        "findings": [
            {
                "label": f.label,
                "score": 0.9,
                "box": {"x_min": f.x_min, "y_min": f.y_min, "x_max": f.x_max, "y_max": f.y_max},
            }
            for f in case.findings
        ],
        "diseases": [],
        "model": {"pack": "p", "version": "1", "detector_sha256": "0" * 64, "classifier_sha256": "0" * 64},
    }
    for build in (build_sr, build_gsps):
        assert getattr(build(ds, result), keyword) == ""
