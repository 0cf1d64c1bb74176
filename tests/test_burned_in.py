"""format=sc: a Secondary Capture with the boxes, captions and research banner burned in, in the source's study."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from service.viewer_outputs import DISCLAIMER
from service.viewer_outputs.layout import label_colour
from service.viewer_outputs.sc import build_sc
from service.viewer_outputs.uids import SERIES_NUMBERS
from tests.dicom_checks import dciodvfy_errors, uploaded
from tests.dicom_node_live import destinations, running_node, wait_for
from tests.orthanc import running_orthanc
from training.synthetic import synthesize_instance

MODEL = {"pack": "demo-synthetic", "version": "0.1.0", "detector_sha256": "ab" * 32, "classifier_sha256": "cd" * 32}


@pytest.fixture(scope="module")
def phantom():
    ds, case = synthesize_instance(seed=12, rows=480, cols=400, findings=["Pleural effusion"], windowed=True)
    assert "VOILUTFunction" in ds  # the phantom carries it; the burned-in image must not
    return uploaded(ds), case


@pytest.fixture(scope="module")
def result(phantom) -> dict:
    (finding,) = phantom[1].findings
    box = {"x_min": finding.x_min, "y_min": finding.y_min, "x_max": finding.x_max, "y_max": finding.y_max}
    return {
        "findings": [{"label": finding.label, "score": 0.8, "box": box}],
        "diseases": [{"label": "Pneumonia", "probability": 0.7, "threshold": 0.4, "positive": True}],
        "model": MODEL,
    }


@pytest.fixture(scope="module")
def sc(phantom, result) -> pydicom.Dataset:
    source, case = phantom
    buffer = io.BytesIO()
    build_sc(source, case.density, result).save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_sc_is_a_derived_image_in_the_source_study_with_its_own_series(phantom, sc):
    """Secondary Capture, same study and patient, series 9903 of its own, DERIVED, burned-in, source referenced."""
    source, _ = phantom
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SeriesNumber == SERIES_NUMBERS["sc"] and sc.SeriesDescription.endswith(DISCLAIMER)
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDescription"):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.ManufacturerModelName == MODEL["pack"] and sc.SoftwareVersions[0] == MODEL["version"]


def test_sc_carries_no_window_or_voi_lut_function(sc):
    """The pixels are display values: no VOI LUT Function (OHIF renders it black), no window, RGB 8-bit."""
    for keyword in ("VOILUTFunction", "WindowCenter", "WindowWidth", "RescaleSlope", "VOILUTSequence"):
        assert keyword not in sc
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)


def test_sc_has_the_boxes_and_banner_burned_in(phantom, result, sc):
    """The image has the source's size; each box's edges carry its label colour; the top rows hold the banner."""
    source, case = phantom
    pixels = sc.pixel_array.astype(int)
    assert pixels.shape == (source.Rows, source.Columns, 3)
    for finding in result["findings"]:
        box = {k: int(round(v)) for k, v in finding["box"].items()}
        colour = np.array(label_colour(finding["label"]))
        left_edge = pixels[box["y_min"] + 5 : box["y_max"] - 5, box["x_min"]]
        assert (np.abs(left_edge - colour).max(axis=1) <= 1).mean() > 0.9
    plain = np.rint(np.clip(case.density, 0, 1) * 255).astype(int)
    banner_rows = pixels[:8]
    assert (banner_rows != plain[:8, :, None]).any(axis=2).mean() > 0.2  # dark backing and white text
    assert (pixels[-1, -1] == plain[-1, -1]).all()  # far from every drawing: the image itself


def test_sc_passes_dciodvfy(phantom, result, tmp_path):
    """dciodvfy reports no errors for the burned-in image."""
    source, case = phantom
    assert dciodvfy_errors(build_sc(source, case.density, result), tmp_path) == []


def test_sc_over_http_is_the_same_object_each_time(client, tiny_dataset):
    """format=sc returns a Secondary Capture of the posted image's size, with the same UIDs when posted again."""
    data = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    headers = {"Content-Type": "application/dicom"}
    first, second = (client.post("/v1/predict?format=sc", content=data, headers=headers) for _ in range(2))
    assert first.status_code == 200 and first.headers["content-type"] == "application/dicom"
    a, b = (pydicom.dcmread(io.BytesIO(r.content)) for r in (first, second))
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert a.SOPClassUID == SecondaryCaptureImageStorage and (a.Rows, a.Columns) == (source.Rows, source.Columns)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.StudyInstanceUID == source.StudyInstanceUID


def test_sc_leaves_the_source_untouched(phantom, result):
    """Building the burned-in image does not modify the caller's dataset."""
    source, case = phantom
    before = copy.deepcopy(source)
    build_sc(source, case.density, result)
    assert source == before


@pytest.mark.slow
def test_dicom_node_delivers_burned_in_images_into_their_studies(tmp_path, tiny_pack):
    """A DICOM node destination asking for "sc" receives one burned-in image per instance, in the instance's study."""
    from pynetdicom import AE

    sent = {}
    for seed in (2001, 2002):
        ds, _ = synthesize_instance(seed, 256, 256, transfer_syntax="explicit")
        sent[str(ds.SOPInstanceUID)] = (str(ds.StudyInstanceUID), ds)
    with running_orthanc(tmp_path / "orthanc") as pacs:
        routes = destinations({"kind": "stow", "url": pacs.dicomweb_url, "outputs": ["sc"]})
        with running_node(tmp_path / "node", tiny_pack, CXR_DICOM_DESTINATIONS=routes) as node:
            modality = AE(ae_title="MODALITY")
            for sop_class in {ds.SOPClassUID for _, ds in sent.values()}:
                modality.add_requested_context(sop_class, ExplicitVRLittleEndian)
            association = modality.associate("127.0.0.1", node.dicom_port, ae_title="PCXR-AI")
            assert association.is_established
            try:
                statuses = [association.send_c_store(ds).Status for _, ds in sent.values()]
            finally:
                association.release()
            assert statuses == [0x0000, 0x0000]
            wait_for(lambda: node.jobs(state="delivered")["node"]["jobs_by_state"] == {"delivered": 2}, 120, "2 jobs")
        stored = [pacs.tags(instance["ID"]) for instance in pacs.instances()]
    assert [tags["SOPClassUID"] for tags in stored] == [SecondaryCaptureImageStorage] * 2
    for tags in stored:
        source = tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]
        assert tags["StudyInstanceUID"] == sent[source][0] and tags["SeriesNumber"] == str(SERIES_NUMBERS["sc"])
