"""Calibration: the calibrators (service side), their fitting and selection (training side), ECE and Brier, and the
service reporting calibrated probabilities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from service.inference.calibration import Calibration, CalibrationError, Calibrator, logit, sigmoid
from service.inference.modelpack import ModelPack, PackError
from training.calibration import fit_calibration, fit_calibrator, select_calibrator
from training.metrics import (
    bootstrap_brier,
    bootstrap_ece,
    brier_score,
    expected_calibration_error,
    reliability_bins,
)


def _miscalibrated(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw outputs, 0/1 outcomes, true probabilities): outcomes drawn from sigmoid(z), the model says
    sigmoid(2.5 z + 1), overconfident and biased upwards like a pos_weight-trained classifier."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.2, count)
    truth = sigmoid(z)
    outcomes = (rng.random(count) < truth).astype(np.int64)
    return sigmoid(2.5 * z + 1.0), outcomes, truth


def test_calibrator_formulas():
    """Temperature divides the logit, Platt scales and shifts it, isotonic interpolates its breakpoints and clips."""
    raw = np.array([0.1, 0.5, 0.9])
    assert np.allclose(Calibrator("identity").apply(raw), raw)
    assert np.allclose(Calibrator("temperature", {"temperature": 2.0}).apply(raw), sigmoid(logit(raw) / 2))
    platt = Calibrator("platt", {"slope": 0.5, "intercept": -1.0})
    assert np.allclose(platt.apply(raw), sigmoid(0.5 * logit(raw) - 1.0))
    isotonic = Calibrator("isotonic", {"x": [0.2, 0.6], "y": [0.1, 0.3]})
    assert np.allclose(isotonic.apply(np.array([0.0, 0.2, 0.4, 0.6, 1.0])), [0.1, 0.1, 0.2, 0.3, 0.3])


@pytest.mark.parametrize(
    "entry",
    [
        {"method": "softmax"},
        {"method": "platt", "slope": 1.0},
        {"method": "platt", "slope": -0.5, "intercept": 0.0},
        {"method": "temperature", "temperature": 0.0},
        {"method": "isotonic", "x": [0.1, 0.5], "y": [0.6, 0.2]},
        {"method": "isotonic", "x": [0.1, 0.5], "y": [0.2, 1.5]},
        "platt",
    ],
)
def test_malformed_calibrators_are_refused(entry):
    """Unknown methods, missing parameters, ranking-reversing slopes and non-monotone or out-of-range steps fail."""
    with pytest.raises(CalibrationError):
        Calibrator.from_manifest(entry)


def test_calibrators_round_trip_through_the_manifest():
    """A fitted calibrator written to the manifest and read back gives the same probabilities."""
    raw, outcomes, _ = _miscalibrated(500, seed=1)
    for method in ("identity", "temperature", "platt", "isotonic"):
        fitted = fit_calibrator(method, raw, outcomes)
        again = Calibrator.from_manifest(json.loads(json.dumps(fitted.to_manifest())))
        assert again.method == method
        np.testing.assert_allclose(again.apply(raw), fitted.apply(raw), rtol=0, atol=1e-12)


def test_isotonic_calibrator_predicts_what_scikit_learn_predicts():
    """The numpy interpolation the service runs equals IsotonicRegression.predict of the fitted model."""
    from sklearn.isotonic import IsotonicRegression

    raw, outcomes, _ = _miscalibrated(800, seed=2)
    reference = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, outcomes)
    probe = np.concatenate([np.linspace(0, 1, 201), raw[:50]])
    np.testing.assert_allclose(fit_calibrator("isotonic", raw, outcomes).apply(probe), reference.predict(probe))


def test_platt_scaling_recovers_the_distortion():
    """On outputs sigmoid(2.5 z + 1) of outcomes ~ sigmoid(z), Platt finds slope ~0.4 and intercept ~-0.4."""
    raw, outcomes, _ = _miscalibrated(20_000, seed=3)
    fitted = fit_calibrator("platt", raw, outcomes)
    assert fitted.parameters["slope"] == pytest.approx(0.4, abs=0.03)
    assert fitted.parameters["intercept"] == pytest.approx(-0.4, abs=0.06)


def test_calibration_lowers_ece_and_brier_on_held_out_data():
    """Fitted on one sample, Platt and isotonic cut ECE by more than half on another sample of the same distortion;
    temperature, which cannot remove a bias, helps less; all lower the Brier score."""
    raw, outcomes, _ = _miscalibrated(3000, seed=4)
    held_raw, held_outcomes, _ = _miscalibrated(3000, seed=5)
    before_ece, before_brier = expected_calibration_error(held_outcomes, held_raw), brier_score(held_outcomes, held_raw)
    assert before_ece > 0.1
    after = {}
    for method in ("temperature", "platt", "isotonic"):
        calibrated = fit_calibrator(method, raw, outcomes).apply(held_raw)
        after[method] = expected_calibration_error(held_outcomes, calibrated)
        assert after[method] < before_ece and brier_score(held_outcomes, calibrated) < before_brier, method
    assert after["platt"] < 0.4 * before_ece and after["isotonic"] < 0.4 * before_ece
    assert after["temperature"] > after["platt"]


def test_selection_takes_the_lowest_cross_validated_brier():
    """Every candidate is cross-validated; the chosen one has the lowest out-of-fold Brier (not identity here)."""
    raw, outcomes, _ = _miscalibrated(1500, seed=6)
    selection = select_calibrator(raw, outcomes, folds=5, seed=0)
    table = selection.out_of_fold
    assert set(table) == {"identity", "temperature", "platt", "isotonic"} and selection.folds == 5
    assert selection.calibrator.method == min(table, key=lambda method: table[method]["brier"])
    assert selection.calibrator.method != "identity"


def test_labels_with_too_few_positives_keep_the_raw_output_and_say_why():
    """With one positive nothing can be fitted: identity, with a note that the manifest carries."""
    raw = np.linspace(0.1, 0.9, 20)
    outcomes = np.zeros(20, dtype=np.int64)
    outcomes[-1] = 1
    calibration, selections = fit_calibration(raw[:, None], outcomes[:, None], ["Rare"])
    assert calibration.calibrators["Rare"].method == "identity"
    assert "1 positives" in selections["Rare"].note


def test_ece_and_brier_golden_values():
    """ECE is the image-weighted |observed - predicted| per bin; Brier the mean squared error."""
    probabilities = np.array([0.1, 0.1, 0.9, 0.9])
    outcomes = np.array([0, 1, 1, 1])
    # Bin of 0.1: observed 0.5 vs 0.1 (2 images); bin of 0.9: observed 1.0 vs 0.9 (2 images).
    assert expected_calibration_error(outcomes, probabilities) == pytest.approx((2 * 0.4 + 2 * 0.1) / 4)
    assert brier_score(outcomes, probabilities) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    bins = reliability_bins(outcomes, probabilities)
    assert sum(bins["images"]) == 4 and bins["observed_frequency"][1] == 0.5 and bins["mean_probability"][13] == 0.9


def test_bootstrap_ece_and_brier_equal_those_of_the_replicated_images():
    """A resample's ECE and Brier equal the metrics of the images repeated as often as they were drawn."""
    raw, outcomes, _ = _miscalibrated(60, seed=7)
    counts = np.random.default_rng(0).multinomial(60, np.full(60, 1 / 60), size=5)
    for row, resampled_ece, resampled_brier in zip(
        counts, bootstrap_ece(outcomes, raw, counts), bootstrap_brier(outcomes, raw, counts)
    ):
        repeated = np.repeat(np.arange(60), row)
        assert resampled_ece == pytest.approx(expected_calibration_error(outcomes[repeated], raw[repeated]))
        assert resampled_brier == pytest.approx(brier_score(outcomes[repeated], raw[repeated]))


def test_calibration_is_named_per_output_so_other_outputs_can_have_one():
    """calibrate(name, raw) serves any named output (a triage score, say), and unknown names are an error."""
    calibration = Calibration.from_manifest(
        {"calibration": {"calibrators": {"abnormality": {"method": "temperature", "temperature": 2.0}}}}
    )
    assert calibration.calibrate("abnormality", np.array([0.5]))[0] == pytest.approx(0.5)
    with pytest.raises(KeyError):
        calibration.calibrate("Pneumonia", np.array([0.5]))
    with pytest.raises(CalibrationError, match="no calibrator for Pneumonia"):
        Calibration.from_manifest({"calibration": {"calibrators": {}}}, required=["Pneumonia"])


def test_pack_without_calibration_does_not_load(tiny_pack, tmp_path):
    """Calibration is part of the pack format: a manifest without it (or missing a label's calibrator) fails to load."""
    copy = tmp_path / "pack"
    shutil.copytree(tiny_pack, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    label = manifest["classifier"]["labels"][0]
    del manifest["calibration"]["calibrators"][label]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackError, match=f"no calibrator for {label}"):
        ModelPack.load(copy)
    del manifest["calibration"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="no calibration"):
        ModelPack.load(copy)
    assert ModelPack.load(copy, require_calibration=False).name == manifest["name"]


def test_service_reports_calibrated_probabilities(tiny_pack, tiny_dataset, tmp_path):
    """With Platt calibrators in the manifest, /v1/predict's probability is the calibrated model output, and
    /v1/models names each label's method."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.dicom.pipeline import prepare
    from service.inference.modelpack import OnnxModels
    from service.settings import Settings

    copy = tmp_path / "pack"
    shutil.copytree(tiny_pack, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    labels = manifest["classifier"]["labels"]
    manifest["calibration"]["calibrators"] = {
        label: {"method": "platt", "slope": 0.5 + 0.1 * k, "intercept": -1.0 + 0.2 * k}
        for k, label in enumerate(labels)
    }
    (copy / "manifest.json").write_text(json.dumps(manifest))
    pack = ModelPack.load(copy)
    settings = Settings(models=copy, providers=["CPUExecutionProvider"], max_batch_size=2, max_queue_delay_ms=1)
    body = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    prepared = prepare(body, pack.input_specs)
    raw = OnnxModels(pack, settings=settings).run(*(image[None] for image in prepared.inputs))[2]  # heatmaps may follow
    expected = [sigmoid((0.5 + 0.1 * k) * logit(raw[0, k]) - 1.0 + 0.2 * k) for k in range(len(labels))]
    assert np.max(np.abs(np.array(expected) - raw[0])) > 0.05  # the calibrators change what is reported
    with TestClient(create_app(settings)) as client:
        served = client.post("/v1/predict", content=body, headers={"Content-Type": "application/dicom"}).json()
        models = client.get("/v1/models").json()
    np.testing.assert_allclose([d["probability"] for d in served["diseases"]], expected, atol=1e-6)
    assert models["calibration"] == dict.fromkeys(labels, "platt")
