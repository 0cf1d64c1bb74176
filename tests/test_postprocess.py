"""Detection postprocess: NMS and class-wise selection (golden arrays)."""

import numpy as np
import pytest

from service.dicom.preprocess import Letterbox
from service.inference.postprocess import (
    DetectionParams,
    Detections,
    box_iou,
    nms,
    select_detections,
    to_original_space,
)
from tests.reference import at_operating_points


def test_box_iou_golden_values():
    """IoU of a box with itself, a half-overlapping box and a disjoint box."""
    box = np.array([0, 0, 10, 10], dtype=np.float32)
    others = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=np.float32)
    np.testing.assert_allclose(box_iou(box, others), [1.0, 50 / 150, 0.0], atol=1e-6)


def test_nms_keeps_best_of_overlapping_and_all_disjoint():
    """Greedy NMS drops a lower-scored box overlapping a kept one above the IoU threshold."""
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.8, 0.9, 0.7], dtype=np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [1, 2])


def test_selection_is_class_wise_and_thresholded():
    """Overlapping boxes of different classes both survive; low scores and extra detections are dropped."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([[0.9, 0.8], [0.1, 0.02], [0.04, 0.3]], dtype=np.float32)  # (L, C)
    found = select_detections(boxes, scores, DetectionParams(score_threshold=0.05, iou_threshold=0.5))
    # class 0: the identical 0.1 box is suppressed by the 0.9 one; class 1: two disjoint boxes survive
    assert found.classes.tolist() == [0, 1, 1]
    np.testing.assert_allclose(found.scores, [0.9, 0.8, 0.3], rtol=1e-6)
    capped = select_detections(boxes, scores, DetectionParams(score_threshold=0.05, max_detections=2))
    np.testing.assert_allclose(capped.scores, [0.9, 0.8])


def test_boxes_map_to_original_space_and_clip():
    """Model-space boxes are scaled to the original image and clipped to its bounds."""
    geometry = Letterbox(rows=1000, columns=500, size=100)  # resized to 100 x 50
    found = Detections(np.array([[10, 20, 60, 120]], dtype=np.float32), np.array([0.5], np.float32), np.array([0]))
    np.testing.assert_allclose(to_original_space(found, geometry).boxes, [[100, 200, 500, 1000]])


@pytest.mark.parametrize("seed", range(8))
def test_thresholds_before_nms_keep_the_same_findings_as_after(seed):
    """Serving filters by the reporting thresholds before NMS; for overlapping dense outputs that gives exactly
    what thresholding NMS's output gives (when neither the top-k nor the cap binds)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 230, size=(12, 2))
    picks = rng.integers(0, len(centres), size=400)
    sizes = rng.uniform(10, 60, size=(400, 2))
    jitter = rng.normal(0, 4, size=(400, 2))
    boxes = np.concatenate([centres[picks] + jitter - sizes / 2, centres[picks] + jitter + sizes / 2], axis=1).astype(
        np.float32
    )
    scores = rng.beta(0.6, 2.0, size=(400, 5)).astype(np.float32)
    floors = rng.uniform(0.1, 0.7, size=5).astype(np.float32)
    params = DetectionParams(score_threshold=0.05, iou_threshold=0.5, max_detections=10_000, pre_nms_top_k=10_000)
    after = at_operating_points(select_detections(boxes, scores, params), floors)
    before = select_detections(boxes, scores, params, floors)
    assert len(after.scores) > 5
    np.testing.assert_array_equal(before.classes, after.classes)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.boxes, after.boxes)
