"""Evaluation report: bootstrap intervals over images; the JSON, markdown and PNG writers (synthetic arrays)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

from training import metrics
from training.evaluate import (
    BootstrapSpec,
    EvaluationInputs,
    command_line,
    detection_matches,
    get_args_parser,
    markdown_report,
    score,
    write_outputs,
)

LOCAL = ["Consolidation", "Pleural effusion"]
GLOBAL = ["No finding", "Pneumonia", "Bronchiolitis"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _images(rng: np.random.Generator, count: int, num_classes: int = 2) -> list[metrics.ImageDetections]:
    """Images with 0-2 boxes each, found (jittered) with probability 0.8, plus a stray; continuous scores (no ties)."""
    images = []
    for _ in range(count):
        boxes = int(rng.integers(0, 3))
        corner = rng.uniform(0, 300, size=(boxes, 2))
        gt = np.concatenate([corner, corner + rng.uniform(20, 80, size=(boxes, 2))], axis=1)
        gt_classes = rng.integers(0, num_classes, size=boxes)
        found = rng.random(boxes) < 0.8
        stray = rng.uniform(0, 300, size=(1, 2))
        pred = np.concatenate(
            [gt[found] + rng.normal(0, 3, size=(int(found.sum()), 4)), np.concatenate([stray, stray + 40], axis=1)]
        )
        pred_classes = np.concatenate([gt_classes[found], rng.integers(0, num_classes, size=1)])
        scores = np.concatenate([rng.uniform(0.4, 1.0, size=int(found.sum())), rng.uniform(0.0, 0.7, size=1)])
        images.append(
            metrics.ImageDetections(
                pred.astype(np.float32),
                scores.astype(np.float32),
                pred_classes.astype(np.int64),
                gt.astype(np.float32).reshape(-1, 4),
                gt_classes.astype(np.int64),
            )
        )
    return images


def _inputs(seed: int = 0, count: int = 120, perfect: bool = False) -> EvaluationInputs:
    """Synthetic evaluation inputs: a noisy (or perfect) classifier over three labels, and a decent detector."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((count, len(GLOBAL))) < [0.4, 0.3, 0.2]).astype(np.int64)
    if perfect:
        probabilities = np.where(
            targets == 1, rng.uniform(0.6, 1.0, targets.shape), rng.uniform(0.0, 0.4, targets.shape)
        )
    else:
        probabilities = 1 / (1 + np.exp(-(2.0 * (2 * targets - 1) + rng.normal(0, 1.5, targets.shape))))
    return EvaluationInputs(_images(rng, count), targets, probabilities, LOCAL, GLOBAL, dict.fromkeys(GLOBAL, 0.5))


def _score(inputs: EvaluationInputs, resamples: int = 200, seed: int = 0) -> dict:
    return score(inputs, detection_matches(inputs), BootstrapSpec(resamples=resamples, seed=seed))


def _intervals(report: dict) -> dict[str, tuple[float | None, dict]]:
    """{'section/label/metric': (point estimate, interval)} for every metric that has an interval."""
    found = {}
    sections = {"detection": report["detection"], "classification": report["classification"]}
    sections |= {f"ap/{label}": entry for label, entry in report["detection"]["per_class"].items()}
    sections |= {f"label/{label}": entry for label, entry in report["classification"]["per_label"].items()}
    for name, entry in sections.items():
        for key, interval in entry.items():
            if key.endswith("_ci"):
                found[f"{name}/{key[:-3]}"] = (entry[key[:-3]], interval)
    return found


def _replicate(items: list, counts: np.ndarray) -> list:
    return [item for item, count in zip(items, counts) for _ in range(int(count))]


def test_resample_counts_draw_n_images_per_resample_deterministically():
    """Each resample draws N images with replacement; the same seed draws the same resamples."""
    counts = metrics.resample_counts(50, 30, np.random.default_rng(7))
    assert counts.shape == (30, 50) and (counts.sum(axis=1) == 50).all() and (counts >= 0).all()
    np.testing.assert_array_equal(counts, metrics.resample_counts(50, 30, np.random.default_rng(7)))
    assert metrics.resample_counts(0, 3, np.random.default_rng(7)).shape == (3, 0)


def test_bootstrap_ap_equals_ap_of_the_replicated_images():
    """Re-weighting precomputed matches gives exactly the AP of the image list with each image repeated as drawn."""
    images = _images(np.random.default_rng(1), 40)
    counts = metrics.resample_counts(len(images), 20, np.random.default_rng(2))
    for label in range(2):
        samples = metrics.bootstrap_average_precision(metrics.class_matches(images, label, 0.4), counts)
        expected = [
            metrics.mean_average_precision(_replicate(images, row), LOCAL, 0.4)["per_class"][LOCAL[label]]
            for row in counts
        ]
        np.testing.assert_allclose(
            samples, [np.nan if value is None else value for value in expected], rtol=0, atol=1e-12
        )
    ones = np.ones((1, len(images)), dtype=np.int64)
    point = metrics.mean_average_precision(images, LOCAL, 0.5)["per_class"][LOCAL[0]]
    assert metrics.bootstrap_average_precision(metrics.class_matches(images, 0, 0.5), ones)[0] == pytest.approx(
        point, abs=1e-12
    )


def test_bootstrap_auroc_and_operating_point_equal_the_replicated_labels():
    """Weighted AUROC (with tied scores) and sensitivity / specificity / F1 equal those of the replicated samples."""
    rng = np.random.default_rng(3)
    targets = rng.random(60) < 0.3
    scores = np.round(rng.random(60), 1)  # many ties: they count half
    counts = metrics.resample_counts(60, 25, rng)
    samples = metrics.bootstrap_auroc(targets, scores, counts)
    points = metrics.bootstrap_operating_point(targets, scores, 0.5, counts)
    for b, row in enumerate(counts):
        repeated_targets, repeated_scores = np.repeat(targets, row), np.repeat(scores, row)
        expected = metrics.auroc(repeated_targets, repeated_scores)
        assert np.isnan(samples[b]) if expected is None else samples[b] == pytest.approx(expected, abs=1e-12)
        for name, value in metrics.operating_point(repeated_targets, repeated_scores, 0.5).items():
            assert np.isnan(points[name][b]) if value is None else points[name][b] == pytest.approx(value, abs=1e-12)


def test_bootstrap_is_deterministic_with_a_seed():
    """The same seed gives the same intervals; another seed gives different ones."""
    inputs = _inputs(seed=4)
    first, again, other = _score(inputs, seed=11), _score(inputs, seed=11), _score(inputs, seed=12)
    assert first == again
    assert first["detection"]["map40_ci"] != other["detection"]["map40_ci"]


def test_intervals_contain_the_point_estimates():
    """For a realistic classifier and detector, every interval brackets its point estimate."""
    report = _score(_inputs(seed=5, count=200), resamples=300)
    intervals = _intervals(report)
    assert {
        "detection/map40",
        "detection/map50",
        "classification/mean_auroc",
        "classification/mean_f1",
        "ap/Consolidation/ap40",
        "label/Pneumonia/auroc",
        "label/Pneumonia/sensitivity",
    } <= set(intervals)
    for name, (value, interval) in intervals.items():
        assert interval["low"] <= value <= interval["high"], name
        assert interval["valid_resamples"] == 300, name


def test_perfect_classifier_has_degenerate_intervals_at_one():
    """Perfectly separated probabilities give AUROC, sensitivity, specificity and F1 of 1 with interval [1, 1]."""
    report = _score(_inputs(seed=6, perfect=True))
    for label, entry in report["classification"]["per_label"].items():
        for name in ("auroc", "sensitivity", "specificity", "f1"):
            assert entry[name] == 1.0, (label, name)
            assert (entry[f"{name}_ci"]["low"], entry[f"{name}_ci"]["high"]) == (1.0, 1.0), (label, name)
    assert report["classification"]["mean_auroc_ci"]["low"] == 1.0


def test_label_with_one_class_only_has_no_interval():
    """A label with no positive has no AUROC, sensitivity or F1 (None, 0 valid resamples) and is not in the means."""
    inputs = _inputs(seed=7)
    inputs.targets[:, 2] = 0
    report = _score(inputs)
    entry = report["classification"]["per_label"]["Bronchiolitis"]
    assert entry["positives"] == 0 and entry["auroc"] is None and entry["sensitivity"] is None
    assert entry["auroc_ci"] == {"low": None, "high": None, "valid_resamples": 0}
    assert entry["specificity_ci"]["valid_resamples"] == 200  # negatives are in every resample
    defined = [report["classification"]["per_label"][label]["auroc"] for label in GLOBAL[:2]]
    assert report["classification"]["mean_auroc"] == pytest.approx(np.mean(defined))


def test_resamples_without_positives_are_skipped_and_counted():
    """A label with a single positive is undefined in resamples that miss it: those are skipped and counted."""
    inputs = _inputs(seed=8, count=50)
    inputs.targets[:, 1] = 0
    inputs.targets[3, 1] = 1
    report = _score(inputs, resamples=300)
    valid = report["classification"]["per_label"]["Pneumonia"]["auroc_ci"]["valid_resamples"]
    assert 100 < valid < 300  # P(image 3 never drawn) = (49/50)^50, about 0.36
    assert f"auroc of Pneumonia: {valid} of 300" in markdown_report(report | {"split": "test"}, "t")


def test_percentile_interval_of_known_samples():
    """The 95% interval is the 2.5th and 97.5th percentiles of the defined samples."""
    samples = np.append(np.arange(101, dtype=np.float64), np.nan)
    assert metrics.percentile_interval(samples) == {
        "low": pytest.approx(2.5),
        "high": pytest.approx(97.5),
        "valid_resamples": 101,
    }


def test_report_writer_writes_tables_and_plots(tmp_path):
    """JSON keeps the established keys, markdown has the tables with intervals and the command, PNGs are images."""
    inputs = _inputs(seed=9)
    matches = detection_matches(inputs)
    args = get_args_parser().parse_args(
        ["--data", "data/x", "--pack", "models/p", "--out", str(tmp_path), "--bootstrap", "100"]
    )
    report = {
        "source": "pack p 0.1.0",
        "data": "data/x",
        "split": "test",
        "command": command_line(args),
        "thresholds_method": "Youden's J on validation",
    } | score(inputs, matches, BootstrapSpec(100, 0))
    written = write_outputs(tmp_path, "test", report, inputs, matches, "Evaluation of pack p on x/test")
    assert [path.name for path in written] == [
        "evaluation_test.json",
        "evaluation_test.md",
        "pr_curves_test.png",
        "roc_curves_test.png",
        "reliability_test.png",
    ]
    saved = json.loads((tmp_path / "evaluation_test.json").read_text())
    assert {"map40", "map50", "per_class", "map40_ci"} <= set(saved["detection"])
    assert {"mean_auroc", "per_label", "mean_auroc_ci", "mean_f1"} <= set(saved["classification"])
    text = (tmp_path / "evaluation_test.md").read_text()
    assert {"map40", "map40_ci", "per_class", "name"} <= set(saved["challenge"])
    assert {"mean_ece_raw", "mean_ece", "mean_brier_raw", "mean_brier", "per_label"} <= set(saved["calibration"])
    for expected in (
        "| mAP@0.4 (COCO-style matching) |",
        "| mAP@0.5 (COCO-style matching) |",
        "| VinBigData challenge mAP@0.4 (VOC matching, No finding as 1x1 box) |",
        "## Calibration",
        "reliability_test.png",
        "| local label | boxes | AP@0.4 | AP@0.5 |",
        "| global label | positives | threshold |",
        "| macro mean |",
        "| Consolidation |",
        "| Pneumonia |",
        "--bootstrap 100",
        "Youden's J",
        "120 images",
        "pr_curves_test.png",
        "roc_curves_test.png",
    ):
        assert expected in text, expected
    mean_auroc = saved["classification"]["mean_auroc_ci"]
    assert f"[{mean_auroc['low']:.3f}, {mean_auroc['high']:.3f}]" in text
    for name in ("pr_curves_test.png", "roc_curves_test.png", "reliability_test.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name


def test_command_line_reproduces_the_options():
    """The recorded command line parses back to the same options."""
    args = get_args_parser().parse_args(["--data", "data/a b", "--run", "runs/r", "--bootstrap", "50", "--seed", "3"])
    again = get_args_parser().parse_args(shlex.split(command_line(args))[3:])
    assert vars(again) == vars(args)


def test_no_bootstrap_gives_point_estimates_only():
    """--bootstrap 0 reports the same point estimates with intervals set to None."""
    inputs = _inputs(seed=10)
    without, with_ci = _score(inputs, resamples=0), _score(inputs, resamples=50)
    assert without["detection"]["map40"] == with_ci["detection"]["map40"] and without["detection"]["map40_ci"] is None
    assert "[" not in markdown_report(without | {"split": "test"}, "t").split("## Detection")[1].split("![")[0]
