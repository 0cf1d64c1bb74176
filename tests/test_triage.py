"""Triage: the operating point chosen on validation, its evaluation with CIs, and its place in the SR."""

from __future__ import annotations

import numpy as np
import pytest

from service.inference.triage import TriageError, TriageRule
from service.viewer_outputs.codes import PRIORITY_VALUES, TRIAGE_PRIORITY
from service.viewer_outputs.sr import build_sr
from tests.dicom_checks import dciodvfy_errors, sr_qualitative_evaluations, uploaded
from training.synthetic import synthesize_instance
from training.triage import choose_threshold, triage_entry, triage_evaluation

LABELS = ["No finding", "Pneumonia"]
MODEL = {"pack": "demo-synthetic", "version": "0.1.0", "detector_sha256": "ab" * 32, "classifier_sha256": "cd" * 32}


def test_threshold_is_the_highest_that_reaches_the_target_sensitivity():
    """Ten abnormal scores 0.1..1.0: 90% sensitivity needs 9 of them expedited, so the threshold is 0.2."""
    targets = np.array([1] * 10 + [0] * 5)
    scores = np.concatenate([np.linspace(0.1, 1.0, 10), [0.05, 0.15, 0.5, 0.95, 0.0]])
    assert choose_threshold(targets, scores, 0.9) == pytest.approx(0.2)
    assert choose_threshold(targets, scores, 1.0) == pytest.approx(0.1)
    assert choose_threshold(np.zeros(3), np.ones(3), 0.9) == 0.0  # nothing abnormal: expedite everything


def test_manifest_entry_states_its_validation_numbers():
    """triage_entry: abnormality = 1 - P(No finding); sensitivity at the chosen point reaches the target."""
    rng = np.random.default_rng(0)
    normal = rng.random(200) < 0.4
    labels = np.stack([normal, ~normal], axis=1).astype(int)
    p_normal = np.clip(np.where(normal, 0.7, 0.3) + rng.normal(0, 0.2, 200), 0, 1)
    entry = triage_entry(labels, np.stack([p_normal, 1 - p_normal], axis=1), LABELS, "a test split")
    assert entry["label"] == "No finding" and entry["validation"]["abnormal"] == int((~normal).sum())
    assert entry["validation"]["sensitivity"] >= 0.9
    assert triage_entry(labels, labels, ["Other", "Pneumonia"], "x") is None


def test_evaluation_gives_auroc_and_operating_point_with_intervals():
    """Perfectly separated abnormality: AUROC 1; at a threshold between the groups sensitivity = specificity = 1."""
    normal = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    labels = np.stack([normal, 1 - normal], axis=1)
    p_normal = np.where(normal == 1, 0.9, 0.1)
    section = triage_evaluation(labels, np.stack([p_normal, 1 - p_normal], axis=1), LABELS, 0.5, resamples=50)
    assert (section["auroc"], section["sensitivity"], section["specificity"], section["expedited"]) == (1, 1, 1, 5)
    assert section["auroc_ci"]["low"] == 1.0 and section["sensitivity_ci"]["valid_resamples"] == 50


def test_malformed_manifest_entries_are_refused():
    """A triage entry naming an unknown label or a threshold outside [0, 1] does not load."""
    with pytest.raises(TriageError, match="not one of"):
        TriageRule.from_manifest({"triage": {"label": "Normal", "threshold": 0.3}}, LABELS)
    with pytest.raises(TriageError, match="not a probability"):
        TriageRule.from_manifest({"triage": {"label": "No finding", "threshold": 1.5}}, LABELS)
    assert TriageRule.from_manifest({}, LABELS) is None


def test_sr_carries_triage_as_a_qualitative_evaluation(tmp_path):
    """The SR's Qualitative Evaluations start with "Triage priority = Expedite", its abnormality and operating point."""
    ds, _ = synthesize_instance(seed=3, rows=400, cols=336, findings=["Consolidation"])
    source = uploaded(ds)
    result = {
        "findings": [],
        "diseases": [{"label": "Pneumonia", "probability": 0.71, "threshold": 0.42, "positive": True}],
        "triage": {"abnormality": 0.86, "priority": "expedite", "threshold": 0.31},
        "model": MODEL,
    }
    sr = build_sr(source, result)
    triage = sr_qualitative_evaluations(sr)[0]
    assert triage.ConceptNameCodeSequence[0].CodeValue == TRIAGE_PRIORITY.value
    assert triage.ConceptCodeSequence[0].CodeValue == PRIORITY_VALUES["expedite"].value
    (number,) = [i for i in triage.ContentSequence if i.ValueType == "NUM"]
    assert float(number.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.86)
    parameters = [i.TextValue for i in triage.ContentSequence if i.ValueType == "TEXT"]
    assert "operating point=0.31" in parameters
    assert dciodvfy_errors(sr, tmp_path) == []
    without = build_sr(source, {**result, "triage": None})
    assert all(
        i.ConceptNameCodeSequence[0].CodeValue != TRIAGE_PRIORITY.value for i in sr_qualitative_evaluations(without)
    )
