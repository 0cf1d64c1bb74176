"""Metrics: VOC average precision at IoU 0.4, AUROC and operating points (golden values)."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    ImageDetections, auroc, finding_threshold, mean_average_precision, operating_point, youden_threshold,
)


def _image(pred, scores, pred_classes, gt, gt_classes) -> ImageDetections:
    return ImageDetections(np.array(pred, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                           np.array(pred_classes, np.int64), np.array(gt, np.float32).reshape(-1, 4), np.array(gt_classes, np.int64))


def test_perfect_detection_scores_one():
    """Every ground-truth box found, no false positive: AP = 1."""
    image = _image([[0, 0, 10, 10]], [0.9], [0], [[0, 0, 10, 10]], [0])
    assert mean_average_precision([image], ["a"], 0.4)["map"] == 1.0


def test_iou_threshold_decides_a_match():
    """A box with IoU 0.45 matches at 0.4 but not at 0.5 (the VinBigData metric uses 0.4)."""
    # prediction [0,0,10,10] vs ground truth [0,0,10,22.2]: IoU = 100/222 = 0.45
    image = _image([[0, 0, 10, 10]], [0.9], [0], [[0, 0, 10, 22.2]], [0])
    assert mean_average_precision([image], ["a"], 0.4)["map"] == 1.0
    assert mean_average_precision([image], ["a"], 0.5)["map"] == 0.0


def test_false_positive_ranked_first_halves_precision():
    """A higher-scored false positive before the true positive gives AP = 0.5 (all-point interpolation)."""
    image = _image([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0], [[0, 0, 10, 10]], [0])
    assert mean_average_precision([image], ["a"], 0.4)["map"] == 0.5


def test_duplicates_count_once_and_classes_without_truth_are_excluded():
    """A duplicate of a matched box is a false positive; a class with no ground truth is left out of the mean."""
    image = _image([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0], [[0, 0, 10, 10]], [0])
    result = mean_average_precision([image], ["a", "b"], 0.4)
    assert result["per_class"] == {"a": 1.0, "b": None} and result["map"] == 1.0


def test_auroc_golden_values():
    """AUROC is 1 for a perfect ranking, 0.5 for all-tied scores, and counts ties half."""
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == 0.5
    assert auroc(np.array([0, 1, 1]), np.array([0.5, 0.5, 0.9])) == 0.75
    assert auroc(np.array([1, 1]), np.array([0.2, 0.3])) is None


def test_operating_point_and_youden_threshold():
    """Youden's J picks the separating threshold, where sensitivity and specificity are both 1."""
    targets, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.6, 0.9])
    threshold = youden_threshold(targets, scores)
    assert threshold == 0.6
    assert operating_point(targets, scores, threshold) == {"sensitivity": 1.0, "specificity": 1.0, "f1": 1.0}


def test_finding_threshold_maximises_f1():
    """The finding threshold keeps the true boxes and cuts the lower-scored false positives (best F1)."""
    image = _image([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [70, 70, 80, 80]], [0.9, 0.7, 0.3, 0.2], [0] * 4,
                   [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])
    assert finding_threshold([image], 0) == pytest.approx(0.7)
    assert finding_threshold([image], 1) is None  # no ground truth for class 1
