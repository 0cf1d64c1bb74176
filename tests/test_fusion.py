"""Multi-rater fusion: weighted box fusion across raters and label votes (hand-made golden cases)."""

from __future__ import annotations

import numpy as np
import pytest

from training.fusion import (
    FusionConfig,
    cluster_boxes,
    enough_support,
    fuse_rater_boxes,
    vote,
    vote_labels,
    weighted_box_fusion,
    weighted_mean_box,
)


def _fuse(boxes, labels, raters, iou_threshold=0.4):
    return weighted_box_fusion(np.array(boxes, dtype=np.float64), labels, raters, iou_threshold)


def test_two_overlapping_raters_fuse_into_their_mean():
    """Two raters' boxes of one class with IoU 0.67 become one box at their mean, support 2."""
    fused = _fuse([[0, 0, 10, 10], [2, 0, 12, 10]], ["A", "A"], ["R1", "R2"])
    assert fused.boxes.tolist() == [[1.0, 0.0, 11.0, 10.0]]
    assert fused.labels == ("A",) and fused.support.tolist() == [2]


def test_non_overlapping_boxes_stay_separate():
    """Boxes of one class from two raters that do not overlap are two findings."""
    fused = _fuse([[0, 0, 10, 10], [20, 20, 30, 30]], ["A", "A"], ["R1", "R2"])
    assert fused.boxes.tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert fused.support.tolist() == [1, 1]


def test_different_classes_never_fuse():
    """Identical boxes of two classes stay two boxes, grouped by class in first-seen order."""
    fused = _fuse([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10]], ["A", "B", "A"], ["R1", "R2", "R3"])
    assert fused.labels == ("A", "B")
    assert fused.boxes.tolist() == [[0.5, 0.0, 10.5, 10.0], [0, 0, 10, 10]]
    assert fused.support.tolist() == [2, 1]


def test_iou_exactly_at_the_threshold_fuses():
    """IoU 40/100 = 0.4 fuses at threshold 0.4 (>=, as the challenge metric matches) but not at 0.41."""
    boxes, labels, raters = [[0, 0, 10, 10], [0, 0, 10, 4]], ["A", "A"], ["R1", "R2"]
    assert _fuse(boxes, labels, raters, 0.4).boxes.tolist() == [[0.0, 0.0, 10.0, 7.0]]
    assert _fuse(boxes, labels, raters, 0.41).boxes.tolist() == [[0, 0, 10, 10], [0, 0, 10, 4]]


def test_one_rater_never_fuses_with_itself():
    """Two overlapping boxes by the same rater are two findings of that reading (a cluster takes one box per rater)."""
    fused = _fuse([[0, 0, 10, 10], [1, 0, 11, 10]], ["A", "A"], ["R1", "R1"])
    assert fused.boxes.tolist() == [[0, 0, 10, 10], [1, 0, 11, 10]]
    assert fused.support.tolist() == [1, 1]


def test_three_raters_with_one_outlier():
    """Two agreeing raters fuse (support 2); the third rater's distant box stays alone (support 1)."""
    fused = _fuse([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], ["A"] * 3, ["R1", "R2", "R3"])
    assert fused.boxes.tolist() == [[0.5, 0.5, 10.5, 10.5], [50, 50, 60, 60]]
    assert fused.support.tolist() == [2, 1]


def test_match_is_against_the_fused_box_not_the_first_member():
    """R3 overlaps R1 only 0.25 but the R1+R2 fused box 0.43, so all three fuse (WBF updates the cluster box)."""
    boxes = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [6, 0, 16, 10]], dtype=np.float64)
    assert cluster_boxes(boxes, ["R1", "R2", "R3"], 0.4) == [[0, 1, 2]]
    fused = weighted_box_fusion(boxes, ["A"] * 3, ["R1", "R2", "R3"], 0.4)
    np.testing.assert_allclose(fused.boxes, [[10 / 3, 0, 40 / 3, 10]])
    assert fused.support.tolist() == [3]


def test_fused_coordinates_are_confidence_weighted():
    """WBF's fused box is the confidence-weighted mean; higher confidence goes first."""
    np.testing.assert_allclose(
        weighted_mean_box(np.array([[0, 0, 10, 10], [4, 0, 14, 10]]), np.array([3.0, 1.0])), [1.0, 0.0, 11.0, 10.0]
    )
    boxes = np.array([[0, 0, 10, 10], [4, 0, 14, 10]], dtype=np.float64)
    fused = weighted_box_fusion(boxes, ["A", "A"], ["R1", "R2"], 0.4, weights=np.array([1.0, 3.0]))
    assert fused.boxes.tolist() == [[3.0, 0.0, 13.0, 10.0]]
    assert cluster_boxes(boxes, ["R1", "R2"], 0.4, np.array([1.0, 3.0])) == [[1, 0]]


def test_min_raters_drops_single_marks_and_is_capped_at_the_readers():
    """min_raters=2 drops a box one of three raters marked, but not the boxes of an image read once."""
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float64)
    kept = fuse_rater_boxes(boxes, ["A"] * 3, ["R1", "R2", "R3"], 3, FusionConfig(min_raters=2))
    assert kept.boxes.tolist() == [[0.5, 0.5, 10.5, 10.5]] and kept.support.tolist() == [2]
    default = fuse_rater_boxes(boxes, ["A"] * 3, ["R1", "R2", "R3"], 3)
    assert default.support.tolist() == [2, 1]
    single = fuse_rater_boxes(boxes[:1], ["A"], ["R1"], 1, FusionConfig(min_raters=2))
    assert single.boxes.tolist() == [[0, 0, 10, 10]]
    assert enough_support(np.array([1, 2, 3]), 3, 3).tolist() == [False, False, True]


def test_no_boxes_fuse_to_an_empty_set():
    """An image where every rater said "No finding" has no fused box (shape (0, 4))."""
    fused = weighted_box_fusion(np.zeros((0, 4)), [], [], 0.4)
    assert fused.boxes.shape == (0, 4) and fused.labels == () and fused.support.tolist() == []


def test_mismatched_inputs_are_rejected():
    """Boxes, labels and raters must line up one to one."""
    with pytest.raises(ValueError, match="2 boxes, 1 labels"):
        weighted_box_fusion(np.zeros((2, 4)), ["A"], ["R1", "R2"], 0.4)


def test_vote_majority_and_ties():
    """Strict majority by default: 2 of 3 positive, 1 of 3 negative, a 2-of-4 tie negative."""
    three = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # raters x labels
    assert vote(three).tolist() == [1, 0, 0]
    assert vote(np.array([[1], [1], [0], [0]])).tolist() == [0]
    assert vote(np.array([[1], [1], [1], [0]])).tolist() == [1]


def test_vote_threshold_is_configurable():
    """Threshold 0 = any rater; 0.99 = all raters; a single reading passes through."""
    three = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0]])
    assert vote(three, 0.0).tolist() == [1, 1, 0]
    assert vote(three, 0.99).tolist() == [1, 0, 0]
    assert vote(np.array([[1, 0]])).tolist() == [1, 0]


def test_vote_labels_over_rater_dicts():
    """Label dicts vote per name; a name a reading lacks is a negative vote."""
    readings = [{"A": 1, "B": 0, "No finding": 0}, {"A": 1, "B": 1}, {"A": 0, "B": 0, "No finding": 1}]
    assert vote_labels(readings) == {"A": 1, "B": 0, "No finding": 0}
    assert vote_labels(readings, 0.0) == {"A": 1, "B": 1, "No finding": 1}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iou_threshold": 0.0},
        {"iou_threshold": 1.5},
        {"min_raters": 0},
        {"min_raters": 1.5},
        {"vote_threshold": 1.0},
        {"vote_threshold": -0.1},
    ],
)
def test_fusion_config_rejects_meaningless_values(kwargs):
    """IoU must be in (0, 1], min_raters a positive integer, the vote threshold in [0, 1)."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        FusionConfig(**kwargs)
