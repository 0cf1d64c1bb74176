"""The thumbnail ridge baseline of the evaluation report: exact leave-one-out penalty choice, paired comparison,
and the report section."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import RIDGE_PENALTIES, compare, fit_ridge, markdown_section, thumbnails
from training.data import read_split


def _brute_force_loo_error(x: np.ndarray, y: np.ndarray, penalty: float) -> float:
    """Leave-one-out squared error by refitting ridge (with intercept, standardised features) n times."""
    errors = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        mean, scale = x[keep].mean(axis=0), x[keep].std(axis=0)
        xs = (x[keep] - mean) / scale
        weights = np.linalg.solve(xs.T @ xs + penalty * np.eye(x.shape[1]), xs.T @ (y[keep] - y[keep].mean()))
        errors.append((((x[i] - mean) / scale) @ weights + y[keep].mean() - y[i]) ** 2)
    return float(np.mean(errors))


def test_ridge_picks_the_penalty_of_least_leave_one_out_error():
    """The closed-form leave-one-out choice agrees with refitting n times (standardisation aside) and the fit
    predicts a linear signal far better than chance."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    y = (x[:, :2].sum(axis=1) + 0.8 * rng.normal(size=60) > 0).astype(float)
    model = fit_ridge(x, y[:, None])
    chosen = model.penalties[0]
    brute = {relative: _brute_force_loo_error(x, y, relative * x.shape[1]) for relative in RIDGE_PENALTIES[:8]}
    best = min(brute, key=brute.get)
    assert chosen == pytest.approx(best) or brute[chosen] <= 1.05 * brute[best]
    test = rng.normal(size=(400, 8))
    truth = test[:, :2].sum(axis=1) > 0
    scores = model.scores(test)[:, 0]
    assert np.corrcoef(scores, truth)[0, 1] > 0.6


def test_comparison_reports_paired_intervals_and_a_verdict():
    """A classifier that ranks perfectly beats a random baseline: difference interval above 0, verdict says so;
    swapped, the verdict says the classifier loses."""
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 2)) < 0.3).astype(float)
    perfect, noise = targets + 0.1 * rng.random((200, 2)), rng.random((200, 2))
    section = compare(targets, perfect, noise, ["a", "b"], resamples=200, seed=0, confidence=0.95)
    assert section["classifier_mean_auroc"] == 1.0 and section["mean_difference_ci"]["low"] > 0
    assert section["verdict"].startswith("the classifier beats the baseline") and "2 of 2" in section["verdict"]
    losing = compare(targets, noise, perfect, ["a", "b"], resamples=200, seed=0, confidence=0.95)
    assert losing["verdict"].startswith("THE CLASSIFIER LOSES") and "worse on a, b" in losing["verdict"]
    table = "\n".join(markdown_section(section | {"model": "ridge", "fitted_on": {"split": "train", "images": 9}}))
    assert "| macro mean | | 1.000 [" in table and "| a | " in table


def test_thumbnails_use_the_service_pipeline_at_48_pixels(tiny_dataset, tmp_path):
    """Thumbnails are prepare()'s 48² model input, and a cache returns the same values the second time."""
    from training.cache import PreprocessedCache

    records = read_split(tiny_dataset, "test")[:3]
    plain = thumbnails(records, threads=1)
    cache = PreprocessedCache(tmp_path)
    first, second = thumbnails(records, cache, threads=1), thumbnails(records, cache, threads=1)
    assert plain.shape == (3, 48 * 48)
    np.testing.assert_allclose(first, plain, atol=2e-3)  # float16 in the cache
    np.testing.assert_array_equal(first, second)
    assert len(list(tmp_path.glob("48px-*/*.npz"))) == 3


def test_an_evaluation_only_dataset_fits_the_baseline_on_its_validation_split(tmp_path):
    """A dataset made without training images (the demo pack's acceptance data: --n-train 0) still gets a baseline,
    fitted on its validation split and saying so; evaluated on that validation split, it says why there is none."""
    from training.baselines import evaluation_section
    from training.data import FusionConfig
    from training.synthetic import generate_dataset

    labels = ["Pneumonia", "No finding"]
    root = tmp_path / "eval-only"
    generate_dataset(root, n_train=0, n_validation=12, n_test=6, seed=5, difficulty="easy", size=(256, 224))
    evaluated = read_split(root, "test")
    probabilities = np.random.default_rng(0).random((len(evaluated), len(labels)))
    bootstrap = (20, 0, 0.95)
    section = evaluation_section(
        root, "test", "auto", FusionConfig(), evaluated, labels, probabilities, bootstrap, None, 1
    )
    assert section["fitted_on"] == {"split": "validation", "images": 12}
    assert "fitted on the validation split, 12 images" in "\n".join(markdown_section(section))
    on_validation = evaluation_section(
        root, "validation", "auto", FusionConfig(), read_split(root, "validation"), labels,
        np.zeros((12, len(labels))), bootstrap, None, 1,
    )  # fmt: skip
    assert on_validation == {
        "skipped": "eval-only has no training images to fit the baseline on, and its validation split is the one "
        "evaluated"
    }
