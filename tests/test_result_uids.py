"""Result objects get UIDs derived from the source instance and the pack: re-running gives the same objects."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from pydicom.uid import RE_VALID_UID

from service.viewer_outputs.gsps import build_gsps
from service.viewer_outputs.sr import build_sr
from service.viewer_outputs.uids import SERIES_NUMBERS, derived_uid, result_uids
from training.synthetic import synthesize_instance

MODEL = {"pack": "demo-synthetic", "version": "0.1.0", "detector_sha256": "ab" * 32, "classifier_sha256": "cd" * 32}
BUILDERS = {"sr": build_sr, "gsps": build_gsps}


def _result(model: dict = MODEL) -> dict:
    return {
        "findings": [
            {"label": "Consolidation", "score": 0.8, "box": {"x_min": 10, "y_min": 20, "x_max": 60, "y_max": 90}}
        ],
        "diseases": [{"label": "Pneumonia", "probability": 0.7, "threshold": 0.4, "positive": True}],
        "model": model,
    }


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return synthesize_instance(seed=41, rows=160, cols=128, findings=["Consolidation"])[0]


def _tracking_uids(sr: pydicom.Dataset) -> list[str]:
    found = []

    def walk(items):
        for item in items:
            if item.get("ValueType") == "UIDREF":
                found.append(item.UID)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_same_image_and_pack_give_the_same_uids(source, kind):
    """Building an output twice from the same source and pack gives the same SOP Instance and Series UIDs."""
    first, second = BUILDERS[kind](source, _result()), BUILDERS[kind](source, _result())
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SeriesNumber == second.SeriesNumber == SERIES_NUMBERS[kind]
    assert len(first.SOPInstanceUID) <= 64 and RE_VALID_UID.match(first.SOPInstanceUID)
    assert first.SOPInstanceUID.startswith("2.25.")


def test_sr_content_uids_are_stable_too(source):
    """Tracking UIDs inside the SR (one per finding and result) repeat across runs and differ from each other."""
    first, second = _tracking_uids(build_sr(source, _result())), _tracking_uids(build_sr(source, _result()))
    assert first == second and len(set(first)) == len(first) >= 2


@pytest.mark.parametrize(
    "change",
    [{"version": "0.2.0"}, {"pack": "another-pack"}, {"detector_sha256": "ef" * 32}, {"classifier_sha256": "0" * 64}],
)
def test_another_pack_gives_a_new_series_and_new_instances(source, change):
    """A new pack version (or other weights under the same version) writes new objects in a new series."""
    for build in BUILDERS.values():
        old, new = build(source, _result()), build(source, _result(MODEL | change))
        assert new.SOPInstanceUID != old.SOPInstanceUID and new.SeriesInstanceUID != old.SeriesInstanceUID
        assert new.SeriesNumber == old.SeriesNumber
        if {"pack", "version"} & set(change):  # the description tells the two series apart
            assert new.SeriesDescription != old.SeriesDescription


def test_images_of_one_study_share_one_result_series(source):
    """Two images of the same study get different result instances in the same result series per kind."""
    other = copy.deepcopy(source)
    other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    a, b = result_uids(source, MODEL, "sr"), result_uids(other, MODEL, "sr")
    assert a.series_instance_uid == b.series_instance_uid and a.sop_instance_uid != b.sop_instance_uid
    kinds = [result_uids(source, MODEL, kind) for kind in SERIES_NUMBERS]
    assert len({k.sop_instance_uid for k in kinds}) == len({k.series_instance_uid for k in kinds}) == len(kinds)


def test_derived_uid_parts_cannot_run_together():
    """The parts are joined unambiguously: ("ab", "c") and ("a", "bc") give different UIDs."""
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    assert derived_uid("ab", "c") == derived_uid("ab", "c")


def test_series_description_names_the_pack_and_keeps_the_disclaimer(source):
    """Series Description says kind, pack and version and ends with the full disclaimer, within 64 characters."""
    sr = build_sr(source, _result(MODEL | {"pack": "p" * 80}))
    assert len(sr.SeriesDescription) <= 64 and sr.SeriesDescription.endswith("RESEARCH - NOT FOR DIAGNOSTIC USE")
    assert build_sr(source, _result()).SeriesDescription.startswith("SR demo-synthetic 0.1.0")


@pytest.mark.parametrize("output", sorted(BUILDERS))
def test_reposting_an_image_gives_the_same_objects_over_http(client, tiny_dataset, output):
    """POSTing the same DICOM twice to /v1/predict returns objects with the same UIDs (a PACS deduplicates them)."""
    data = sorted((tiny_dataset / "test").glob("*.dicom"))[2].read_bytes()
    headers = {"Content-Type": "application/dicom"}
    first, second = (
        pydicom.dcmread(io.BytesIO(client.post(f"/v1/predict?format={output}", content=data, headers=headers).content))
        for _ in range(2)
    )
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert first.InstanceNumber == source.InstanceNumber and first.StudyInstanceUID == source.StudyInstanceUID
