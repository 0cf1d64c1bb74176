"""Viewer outputs: DICOM SR (TID 1500), GSPS and PNG built from one JSON result."""

from __future__ import annotations

import io
import re

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.color import CIELabColor
from PIL import Image
from pydicom.uid import ComprehensiveSRStorage

from service.viewer_outputs import DISCLAIMER
from service.viewer_outputs.codes import PRIVATE_SCHEME, code_for, private_code_value, score_code
from service.viewer_outputs.gsps import FINDINGS_LAYER, SUMMARY_LAYER, build_gsps
from service.viewer_outputs.layout import label_colour, overlaps, place_caption
from service.viewer_outputs.png import render_png
from service.viewer_outputs.sr import build_sr
from tests.dicom_checks import dciodvfy_errors, uploaded
from training.labels import VINDR_CXR, VINDR_PCXR
from training.synthetic import synthesize_instance

UNKNOWN_LABEL = "Widened mediastinum (a label no table knows)"
MODEL = {"pack": "demo-synthetic", "version": "0.1.0", "detector_sha256": "ab" * 32, "classifier_sha256": "cd" * 32}


@pytest.fixture(scope="module")
def phantom():
    ds, case = synthesize_instance(seed=5, rows=600, cols=500, findings=["Consolidation", "Cardiomegaly"])
    return uploaded(ds), case


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


def _items(container: pydicom.Dataset, meaning: str) -> list[pydicom.Dataset]:
    """The children of `container` whose concept name has this meaning."""
    return [i for i in container.get("ContentSequence", []) if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _algorithm_of(item: pydicom.Dataset) -> tuple[str, str]:
    (name,), (version,) = _items(item, "Algorithm Name"), _items(item, "Algorithm Version")
    return name.TextValue, version.TextValue


def test_sr_round_trips_with_boxes_codes_and_scores(phantom, result):
    """Each box is a Planar ROI group: its closed polygon, label code, and "<finding> detection score" = JSON score."""
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
        (score,) = group.get_measurements()
        assert score.name == score_code(finding["label"]) and score.name.meaning.endswith(" detection score")
        assert score.name.meaning.startswith(code_for(finding["label"]).meaning[:40])
        assert (score.unit.value, score.unit.scheme_designator) == ("{score}", "UCUM")
        assert score.value == pytest.approx(finding["score"], abs=1e-6)
        assert group.tracking_uid is not None and finding["label"] in group.tracking_identifier


def test_sr_has_no_measurement_group_without_image_coordinates(phantom, result):
    """Every group under Imaging Measurements has a SCOORD on the source image (OHIF reads each group's first one)."""
    source, _ = phantom
    written = _roundtrip(build_sr(source, result))
    (measurements,) = _items(written, "Imaging Measurements")
    groups = measurements.ContentSequence
    assert len(groups) == len(result["findings"])
    for group in groups:
        (region,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert _algorithm_of(group) == (MODEL["pack"], MODEL["version"])


def test_sr_reports_diseases_as_qualitative_evaluations(phantom, result):
    """Each disease is "<disease> = Present/Absent" with its probability, threshold and algorithm."""
    source, _ = phantom
    written = _roundtrip(build_sr(source, result))
    (evaluations,) = _items(written, "Qualitative Evaluations")
    codes_ = [i for i in evaluations.ContentSequence if i.ValueType == "CODE"]
    assert [i.ConceptNameCodeSequence[0].CodeValue for i in codes_] == [
        code_for(d["label"]).value for d in result["diseases"]
    ]
    for item, disease in zip(codes_, result["diseases"]):
        assert item.ConceptCodeSequence[0].CodeMeaning == ("Present" if disease["positive"] else "Absent")
        (probability,) = _items(item, "Probability")
        assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(disease["probability"])
        assert _algorithm_of(item) == (MODEL["pack"], MODEL["version"])
        parameters = [p.TextValue for p in _items(item, "Algorithm Parameters")]
        assert f"decision threshold={disease['threshold']:.6g}" in parameters


def test_sr_image_library_holds_the_source_image(phantom, result):
    """The Image Library (TID 1600) lists the source image with its modality and size."""
    source, _ = phantom
    written = _roundtrip(build_sr(source, result))
    (library,) = _items(written, "Image Library")
    (group,) = library.ContentSequence
    (image,) = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    descriptors = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in image.ContentSequence}
    assert float(descriptors["Pixel Data Rows"].MeasuredValueSequence[0].NumericValue) == source.Rows
    assert descriptors["Modality"].ConceptCodeSequence[0].CodeValue == source.Modality


def test_sr_header_identifies_the_model_as_ihe_air_asks(phantom, result):
    """Manufacturer, model name, software versions, serial number, series date/time and UTC offset name the pack."""
    source, _ = phantom
    written = _roundtrip(build_sr(source, result))
    assert written.ManufacturerModelName == MODEL["pack"] and written.SoftwareVersions[0] == MODEL["version"]
    assert re.fullmatch(r"[0-9A-F]{16}", written.DeviceSerialNumber)
    assert written.SeriesDate == written.ContentDate and len(written.SeriesTime) >= 6
    assert re.fullmatch(r"[+-]\d{4}", written.TimezoneOffsetFromUTC)
    observer = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in written.ContentSequence}
    assert observer["Device Observer Serial Number"].TextValue == written.DeviceSerialNumber
    other = build_sr(source, result | {"model": MODEL | {"detector_sha256": "ef" * 32}})
    assert other.DeviceSerialNumber != written.DeviceSerialNumber  # the serial names the exact weights


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
    (comment,) = _items(_items(written, "Qualitative Evaluations")[0], "Comment")
    assert comment.TextValue.startswith(DISCLAIMER) and "3 localized finding(s)" in comment.TextValue
    assert PRIVATE_SCHEME in [item.CodingSchemeDesignator for item in written.CodingSchemeIdentificationSequence]


def test_sr_passes_dciodvfy(phantom, result, tmp_path):
    """dciodvfy reports no errors for the SR."""
    assert dciodvfy_errors(build_sr(phantom[0], result), tmp_path) == []


# --- GSPS --------------------------------------------------------------------------------------


def _annotations(gsps: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    return {item.GraphicLayer: item for item in gsps.GraphicAnnotationSequence}


def test_gsps_round_trips_with_boxes_and_captions(phantom, result):
    """One layer per label: its polylines equal the boxes, each with a "label score" caption anchored at its corner."""
    source, _ = phantom
    gsps = _roundtrip(build_gsps(source, result))
    layers = _annotations(gsps)
    for order, finding in enumerate(result["findings"], 1):  # three different labels: three layers
        layer = layers[FINDINGS_LAYER.format(order)]
        (graphic,), (text,) = layer.GraphicObjectSequence, layer.TextObjectSequence
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        np.testing.assert_allclose(np.reshape(graphic.GraphicData, (-1, 2)), _corners(finding["box"]), atol=1e-3)
        assert text.UnformattedTextValue == f"{finding['label']} {finding['score']:.2f}"
        np.testing.assert_allclose(text.AnchorPoint, [finding["box"]["x_min"], finding["box"]["y_min"]], atol=1e-3)
        assert text.AnchorPointVisibility == "Y"
    summary = [t.UnformattedTextValue for t in layers[SUMMARY_LAYER].TextObjectSequence]
    assert summary == [DISCLAIMER, "Pneumonia 0.71 +", "Other diseases 0.10"]


def test_gsps_layers_recommend_the_labels_colours(phantom, result):
    """Each layer carries a recommended CIELab colour: the label's PNG colour for findings, white for the summary."""
    source, _ = phantom
    gsps = _roundtrip(build_gsps(source, result))
    colours = {
        layer.GraphicLayer: CIELabColor.from_dicom_value(layer.GraphicLayerRecommendedDisplayCIELabValue).to_rgb()
        for layer in gsps.GraphicLayerSequence
    }
    for order, finding in enumerate(result["findings"], 1):
        np.testing.assert_allclose(colours[FINDINGS_LAYER.format(order)], label_colour(finding["label"]), atol=2)
    np.testing.assert_allclose(colours[SUMMARY_LAYER], (255, 255, 255), atol=2)


def _caption_boxes(gsps: pydicom.Dataset) -> list[tuple[str, list[float], list[float], list[float]]]:
    return [
        (
            t.UnformattedTextValue,
            [*t.BoundingBoxTopLeftHandCorner, *t.BoundingBoxBottomRightHandCorner],
            list(t.AnchorPoint),
        )
        for a in gsps.GraphicAnnotationSequence
        if a.GraphicLayer != SUMMARY_LAYER
        for t in a.TextObjectSequence
    ]


@pytest.mark.parametrize("top", [300.0, 2.0])  # room above the box, and a box touching the top edge
def test_gsps_captions_of_coinciding_boxes_never_overlap(phantom, top):
    """Four boxes on one spot get four captions: pairwise disjoint, inside the image, each anchored to the box."""
    source, _ = phantom
    box = {"x_min": 420.0, "y_min": top, "x_max": 499.0, "y_max": top + 60}
    labels = ["Consolidation", "Cardiomegaly", "Consolidation", UNKNOWN_LABEL]
    findings = [{"label": label, "score": 0.5 + i / 10, "box": box} for i, label in enumerate(labels)]
    captions = _caption_boxes(_roundtrip(build_gsps(source, {"findings": findings, "diseases": [], "model": MODEL})))
    assert len(captions) == 4
    rects = [rect for _, rect, _ in captions]
    for i, a in enumerate(rects):
        assert 0 <= a[0] < a[2] <= source.Columns and 0 <= a[1] < a[3] <= source.Rows
        for b in rects[i + 1 :]:
            assert not overlaps(a, b), (a, b)
    assert all(anchor == [box["x_min"], box["y_min"]] for _, _, anchor in captions)
    if top > 100:  # the first caption sits right above its box, touching it
        assert min(rect[3] for rect in rects) == pytest.approx(top - 1.0)


def test_caption_placement_rule():
    """place_caption: above the corner if there is room, else inside; inside the image; stacked past taken ones."""
    assert place_caption((50, 40), (30, 10), (200, 100)) == (50, 29, 80, 39)
    assert place_caption((50, 5), (30, 10), (200, 100)) == (50, 5, 80, 15)
    assert place_caption((190, 40), (30, 10), (200, 100))[0] == 200 - 30 - 1
    first = place_caption((50, 40), (30, 10), (200, 100))
    second = place_caption((55, 40), (30, 10), (200, 100), taken=[first])
    assert second[1] == first[3] + 1 and not overlaps(first, second)
    assert place_caption((50, 40), (30, 10), (200, 100), floor=35)[1] == 40  # below a header: inside the box


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
    gsps = build_gsps(uploaded(ds), {"findings": [], "diseases": []})
    assert gsps.PresentationLUTShape == shape
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (float(ds.WindowCenter), float(ds.WindowWidth))


def test_gsps_windows_an_unwindowed_image_over_its_pixel_range():
    """Without a window in the image, the GSPS windows the stored range (after rescale) min-max."""
    ds, _ = synthesize_instance(seed=6, rows=128, cols=112, findings=[], windowed=False)
    gsps = build_gsps(uploaded(ds), {"findings": [], "diseases": []})
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    low, high = sorted(slope * v + intercept for v in (ds.SmallestImagePixelValue, ds.LargestImagePixelValue))
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == pytest.approx((low + high) / 2 + 0.5)
    assert float(voi.WindowWidth) == pytest.approx(high - low + 1)


def test_gsps_passes_dciodvfy(phantom, result, tmp_path):
    """dciodvfy reports no errors for the GSPS."""
    assert dciodvfy_errors(build_gsps(phantom[0], result), tmp_path) == []


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
    assert dciodvfy_errors(sr_ds, tmp_path) == []

    gsps = build_gsps(source, empty_result)
    assert list(_annotations(_roundtrip(gsps))) == [SUMMARY_LAYER]
    assert dciodvfy_errors(gsps, tmp_path) == []

    png = Image.open(io.BytesIO(render_png(case.density, empty_result)))
    assert png.size == (source.Columns, source.Rows)


def test_sr_without_findings_says_so_under_an_extended_title(phantom, result, tmp_path):
    """No boxes: no Imaging Measurements, title "Chest CAD Report" (a CID 7021 extension), "No localized findings"."""
    source, _ = phantom
    written = _roundtrip(build_sr(source, result | {"findings": []}))
    (title,) = written.ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("112000", "DCM", "Chest CAD Report")
    assert (title.ContextIdentifier, title.ContextGroupExtensionFlag) == ("7021", "Y")
    assert title.ContextGroupLocalVersion and title.ContextGroupExtensionCreatorUID
    assert written.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert _items(written, "Imaging Measurements") == [] and len(_items(written, "Image Library")) == 1
    (evaluations,) = _items(written, "Qualitative Evaluations")
    assert len([i for i in evaluations.ContentSequence if i.ValueType == "CODE"]) == len(result["diseases"])
    (comment,) = _items(evaluations, "Comment")
    assert "No localized findings" in comment.TextValue
    assert dciodvfy_errors(written, tmp_path) == []
    with_boxes = _roundtrip(build_sr(source, result))
    assert with_boxes.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert "ContextGroupExtensionFlag" not in with_boxes.ConceptNameCodeSequence[0]


def test_sparse_header_is_enough_and_left_untouched(phantom, result, tmp_path):
    """A source without optional Type 2 attributes still works, and the caller's dataset is unchanged."""
    source = pydicom.Dataset(phantom[0])
    for keyword in ("StudyID", "AccessionNumber", "PatientSex", "BodyPartExamined", "ReferringPhysicianName"):
        delattr(source, keyword)
    before = pydicom.Dataset(source)
    sr_ds, gsps = build_sr(source, result), build_gsps(source, result)
    assert source == before and "StudyID" not in source
    assert dciodvfy_errors(sr_ds, tmp_path) == [] and dciodvfy_errors(gsps, tmp_path) == []


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
