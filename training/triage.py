"""The triage operating point of a pack, chosen on a validation split (service/inference/triage.py serves it).

The abnormality of an image is 1 - the probability of "No finding"; an image is abnormal when its "No finding"
label is 0. A worklist that expedites abnormal images should miss few of them, so the operating point is the
highest abnormality threshold whose sensitivity on the validation split reaches `TARGET_SENSITIVITY`: as many
normal images as possible stay routine while at least that share of abnormal ones is expedited. Its measured
sensitivity and specificity there go into the manifest beside it; the test split's, with confidence intervals,
into the evaluation report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.metrics import (
    auroc,
    bootstrap_auroc,
    bootstrap_operating_point,
    operating_point,
    percentile_interval,
    resample_counts,
)

NO_FINDING = "No finding"
TARGET_SENSITIVITY = 0.9


def abnormality(probabilities: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """(N, K) probabilities in `labels` order -> (N,) probability that the image is not "No finding"."""
    return 1.0 - np.asarray(probabilities, dtype=np.float64)[:, list(labels).index(NO_FINDING)]


def abnormal(image_labels: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """(N, K) 0/1 image labels -> (N,) True where the image is not "No finding"."""
    return np.asarray(image_labels)[:, list(labels).index(NO_FINDING)] < 0.5


def choose_threshold(targets: np.ndarray, scores: np.ndarray, target_sensitivity: float = TARGET_SENSITIVITY) -> float:
    """The highest threshold t (among the scores) with sensitivity(scores >= t) >= target_sensitivity.

    With no abnormal image the target cannot be measured: 0.0 (everything expedited) rather than a guess.
    """
    targets = np.asarray(targets).astype(bool)
    positives = np.sort(np.asarray(scores, dtype=np.float64)[targets])[::-1]
    if positives.size == 0:
        return 0.0
    # Expediting every image scoring >= the k-th highest abnormal score catches at least k abnormal images.
    needed = int(np.ceil(target_sensitivity * positives.size - 1e-9))
    return float(positives[max(needed, 1) - 1])


def triage_entry(
    image_labels: np.ndarray,
    probabilities: np.ndarray,
    labels: Sequence[str],
    where: str,
    target_sensitivity: float = TARGET_SENSITIVITY,
) -> dict | None:
    """The manifest's `triage` entry from a validation split's labels and probabilities (the ones the service
    reports); None when the classifier has no "No finding" label to triage by."""
    if NO_FINDING not in labels:
        return None
    targets, scores = abnormal(image_labels, labels), abnormality(probabilities, labels)
    threshold = choose_threshold(targets, scores, target_sensitivity)
    measured = operating_point(targets, scores, threshold)
    return {
        "label": NO_FINDING,
        "threshold": threshold,
        "target_sensitivity": target_sensitivity,
        "rule": f"abnormality = 1 - P({NO_FINDING}); expedite at or above the highest threshold whose sensitivity "
        f"for abnormal images reaches {target_sensitivity:g} on {where}",
        "validation": {
            "images": int(len(targets)),
            "abnormal": int(targets.sum()),
            "sensitivity": measured["sensitivity"],
            "specificity": measured["specificity"],
        },
    }


def triage_evaluation(
    image_labels: np.ndarray,
    probabilities: np.ndarray,
    labels: Sequence[str],
    threshold: float | None,
    resamples: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict | None:
    """The evaluation report's `triage`: AUROC of the abnormality for abnormal vs normal images, and sensitivity
    and specificity at the pack's operating point, each with a percentile bootstrap interval (images resampled
    with replacement, `resamples` times; None without). None for a classifier without "No finding"."""
    if NO_FINDING not in labels:
        return None
    targets, scores = abnormal(image_labels, labels), abnormality(probabilities, labels)
    counts = resample_counts(len(targets), resamples, np.random.default_rng(seed)) if resamples else None

    def ci(values: np.ndarray) -> dict | None:
        return percentile_interval(values, confidence) if counts is not None else None

    section: dict = {
        "score": f"abnormality = 1 - P({NO_FINDING}), as the service reports it",
        "images": int(len(targets)),
        "abnormal": int(targets.sum()),
        "auroc": auroc(targets, scores),
        "auroc_ci": ci(bootstrap_auroc(targets, scores, counts)) if counts is not None else None,
        "threshold": threshold,
    }
    if threshold is not None:
        point = operating_point(targets, scores, threshold)
        resampled = bootstrap_operating_point(targets, scores, threshold, counts) if counts is not None else {}
        for name in ("sensitivity", "specificity"):
            section[name], section[f"{name}_ci"] = point[name], ci(resampled[name]) if resampled else None
        section["expedited"] = int((scores >= threshold).sum())
    return section


def markdown_section(section: dict | None) -> list[str]:
    if not section:
        return []

    def cell(name: str) -> str:
        value, interval = section.get(name), section.get(f"{name}_ci")
        if value is None:
            return "n/a"
        if interval and interval.get("low") is not None:
            return f"{value:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"
        return f"{value:.3f}"

    threshold = "none in the pack" if section["threshold"] is None else f"{section['threshold']:.3f}"
    return [
        "",
        "## Triage",
        "",
        f'Score: {section["score"]}; abnormal = not labelled "{NO_FINDING}" ({section["abnormal"]} of '
        f"{section['images']} images). Operating point (chosen on validation data, never on this split): "
        f"expedite at abnormality >= {threshold}.",
        "",
        "| AUROC | sensitivity | specificity | expedited |",
        "| ---: | ---: | ---: | ---: |",
        f"| {cell('auroc')} | {cell('sensitivity')} | {cell('specificity')} | {section.get('expedited', 'n/a')} |",
    ]
