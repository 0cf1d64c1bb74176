"""Subgroups: header attributes to groups (age bands, sex, view, vendor, modality), the flag rule, and the report's
subgroup section with counts and intervals."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from training import subgroups
from training.evaluate import BootstrapSpec, EvaluationInputs, detection_matches, score, subgroup_section


def _header(**values) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("age", "band"),
    [("000D", "<1 y"), ("011M", "<1 y"), ("012M", "1-5 y"), ("004Y", "1-5 y"), ("005Y", "5-10 y"), ("009Y", "5-10 y"),
     ("010Y", "10-18 y"), ("017Y", "10-18 y"), ("030Y", ">=18 y"), ("", None), ("abc", None)],
)  # fmt: skip
def test_age_bands_follow_the_pediatric_split(age, band):
    """DICOM ages fall into <1, 1-5, 5-10, 10-18 years (lower bound inclusive); unreadable ages into none."""
    assert subgroups.age_band(age) == band


def test_attributes_come_from_the_header_and_missing_ones_are_no_group():
    """Sex, view, vendor and modality are read as written (normalised case); absent tags give None, not 'unknown'."""
    # A mapping stands in for the header here: pydicom would warn about the lower-case code strings.
    full = subgroups.attributes_of(
        {"PatientAge": "018M", "PatientSex": "f", "ViewPosition": "ap", "Manufacturer": "Vendor A", "Modality": "dx"}
    )
    assert full == {"age_band": "1-5 y", "sex": "F", "view": "AP", "manufacturer": "Vendor A", "modality": "DX"}
    assert subgroups.attributes_of(_header(PatientSex="")) == dict.fromkeys(subgroups.ATTRIBUTES)


def test_groups_list_each_value_with_its_images_in_a_stable_order():
    """Groups come attribute by attribute, age bands in age order, and list the indices of their images."""
    attributes = [
        {"age_band": "5-10 y", "sex": "M", "view": "PA"},
        {"age_band": "<1 y", "sex": "F", "view": "AP"},
        {"age_band": "<1 y", "sex": "M", "view": None},
    ]
    found = subgroups.groups(attributes)
    assert list(found) == [
        ("age_band", "<1 y"),
        ("age_band", "5-10 y"),
        ("sex", "F"),
        ("sex", "M"),
        ("view", "AP"),
        ("view", "PA"),
    ]
    assert found[("age_band", "<1 y")] == [1, 2] and found[("sex", "M")] == [0, 2]


def test_flags_small_groups_and_groups_whose_interval_reaches_below_the_margin():
    """Under 30 images: insufficient; CI lower bound more than 0.05 below overall: possibly worse; CI upper bound
    below overall: worse; a tight interval near the overall value: no flag."""
    overall = {"mean_auroc": 0.80, "map40": 0.50}
    fine = {"mean_auroc": {"low": 0.76, "high": 0.84}, "map40": {"low": 0.46, "high": 0.55}}
    metrics = {"mean_auroc": 0.80, "map40": 0.50}
    assert subgroups.flags(100, metrics, fine, overall) == []
    assert subgroups.flags(12, metrics, fine, overall) == ["insufficient data: 12 images (< 30)"]
    wide = fine | {"mean_auroc": {"low": 0.70, "high": 0.85}}
    assert subgroups.flags(100, metrics, wide, overall) == [
        "possibly worse: mean_auroc CI lower bound 0.700 < overall 0.800 - 0.05"
    ]
    below = fine | {"map40": {"low": 0.30, "high": 0.45}}
    assert subgroups.flags(100, metrics | {"map40": 0.38}, below, overall) == [
        "worse: map40 CI upper bound 0.450 < overall 0.500"
    ]
    assert "insufficient data: map40 undefined in the group" in subgroups.flags(
        100, metrics | {"map40": None}, fine, overall
    )


def test_report_has_each_group_with_counts_intervals_and_flags():
    """The subgroup section gives every group its image count, metrics with intervals and flags; a group where the
    classifier is random is flagged against the overall AUROC."""
    from tests.test_evaluate_report import _inputs

    inputs = _inputs(seed=3, count=160)
    rng = np.random.default_rng(0)
    attributes = [{"sex": "M" if i % 2 else "F", "view": "AP" if i < 20 else "PA"} for i in range(160)]
    # Scramble the probabilities of the AP images: the model knows nothing there.
    probabilities = inputs.probabilities.copy()
    probabilities[:20] = rng.random((20, probabilities.shape[1]))
    inputs = EvaluationInputs(
        inputs.images, inputs.targets, probabilities, inputs.local_labels, inputs.global_labels, inputs.thresholds,
        attributes=attributes,
    )  # fmt: skip
    spec = BootstrapSpec(resamples=100, seed=0)
    overall = score(inputs, detection_matches(inputs), spec)
    section = subgroup_section(inputs, spec, overall)
    groups = {(g["attribute"], g["value"]): g for g in section["groups"]}
    assert set(groups) == {("sex", "F"), ("sex", "M"), ("view", "AP"), ("view", "PA")}
    assert groups[("view", "AP")]["images"] == 20 and groups[("sex", "M")]["images"] == 80
    assert groups[("view", "PA")]["mean_auroc_ci"]["low"] is not None
    assert any(flag.startswith("insufficient data: 20 images") for flag in groups[("view", "AP")]["flags"])
    assert any("mean_auroc" in flag and "worse" in flag for flag in groups[("view", "AP")]["flags"])
    assert sum(groups[("sex", value)]["images"] for value in ("F", "M")) == 160
