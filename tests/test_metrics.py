"""Metrics: average precision at IoU 0.4 with COCO-style matching (golden values, cross-checked with pycocotools) and
with VOC devkit matching (the VinBigData challenge metric, cross-checked with a re-implementation of voc_eval), AUROC
and operating points."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    ImageDetections,
    auroc,
    challenge_average_precision,
    class_average_precision,
    class_matches,
    finding_threshold,
    mean_average_precision,
    operating_point,
    with_no_finding_class,
    youden_threshold,
)


def _image(pred, scores, pred_classes, gt, gt_classes) -> ImageDetections:
    return ImageDetections(
        np.array(pred, np.float32).reshape(-1, 4),
        np.array(scores, np.float32),
        np.array(pred_classes, np.int64),
        np.array(gt, np.float32).reshape(-1, 4),
        np.array(gt_classes, np.int64),
    )


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
    image = _image(
        [[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [70, 70, 80, 80]],
        [0.9, 0.7, 0.3, 0.2],
        [0] * 4,
        [[0, 0, 10, 10], [20, 20, 30, 30]],
        [0, 0],
    )
    assert finding_threshold([image], 0) == pytest.approx(0.7)
    assert finding_threshold([image], 1) is None  # no ground truth for class 1


# ---- cross-check against pycocotools ---------------------------------------------------------
#
# pycocotools is an independent implementation of the same matching rule (per image and class, in
# score order, each prediction takes the best-IoU unmatched ground-truth box with IoU >= threshold;
# ties in score keep image order, then annotation order; IoU on xywh boxes with no +1 pixel). It
# reports 101-point interpolated AP, so we compare three ways:
#   1. our AP with interpolation="coco" equals COCOeval's to 1e-6 (in practice to the last bit);
#   2. our ranked hit/miss sequence equals the one COCOeval accumulates (the matching is identical,
#      so our all-point AP is exactly the VOC AP of pycocotools' own matches);
#   3. our all-point (VOC) AP is within 1/101 of COCOeval's: both integrate the same non-increasing
#      precision envelope p(r) over recall, one exactly, the other as the mean of p(0), p(0.01), ...,
#      p(1), and for a non-increasing p with values in [0, 1] the two differ by at most 1/101.
# COCOeval is configured for this: iouThrs = [threshold], one area range 'all' wide enough for any
# box, and maxDets larger than any image's prediction count.

COCO_TOLERANCE = 1e-6
INTERPOLATION_BOUND = 1.0 / 101.0


def _xywh(box: np.ndarray) -> list[float]:
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    return [x_min, y_min, x_max - x_min, y_max - y_min]


def _coco_annotation(annotation_id: int, image_id: int, box: np.ndarray, label: int) -> dict:
    """One COCO annotation; ids start at 1, because COCOeval treats a match to id 0 as no match."""
    xywh = _xywh(box)
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": int(label) + 1,
        "bbox": xywh,
        "area": xywh[2] * xywh[3],
        "iscrowd": 0,
    }


def _coco_evaluator(images: list[ImageDetections], num_classes: int, iou_threshold: float):
    """COCOeval run on the same boxes (image ids 1..N in list order, category id = class + 1)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ground_truth, detections = [], []
    for image_id, image in enumerate(images, start=1):
        for box, label in zip(image.gt_boxes, image.gt_classes):
            ground_truth.append(_coco_annotation(len(ground_truth) + 1, image_id, box, label))
        for box, score, label in zip(image.pred_boxes, image.pred_scores, image.pred_classes):
            detections.append(_coco_annotation(len(detections) + 1, image_id, box, label) | {"score": float(score)})

    def dataset(annotations: list[dict]) -> COCO:
        # Built directly rather than with COCO.loadRes, which cannot take an empty detection list.
        coco = COCO()
        coco.dataset = {
            "images": [{"id": i} for i in range(1, len(images) + 1)],
            "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
            "annotations": annotations,
        }
        coco.createIndex()
        return coco

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        evaluator = COCOeval(dataset(ground_truth), dataset(detections), "bbox")
        evaluator.params.iouThrs = np.array([iou_threshold])
        evaluator.params.maxDets = [100_000]
        evaluator.params.areaRng = [[0.0, 1e12]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _coco_class_ap(evaluator, label: int) -> float | None:
    precision = evaluator.eval["precision"][0, :, label, 0, 0]
    return None if np.all(precision == -1) else float(precision.mean())


def _coco_ranked_hits(evaluator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, hits) of one class in the order COCOeval.accumulate ranks them."""
    num_images = len(evaluator.params.imgIds)
    entries = [e for e in evaluator.evalImgs[label * num_images : (label + 1) * num_images] if e is not None]
    if not entries:
        return np.zeros(0), np.zeros(0, dtype=bool)
    scores = np.concatenate([np.asarray(e["dtScores"], dtype=np.float64) for e in entries])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e["dtMatches"][0] for e in entries])[order]
    return scores[order], matched > 0


def _assert_agrees_with_coco(images: list[ImageDetections], num_classes: int) -> None:
    for iou_threshold in (0.4, 0.5):
        evaluator = _coco_evaluator(images, num_classes, iou_threshold)
        for label in range(num_classes):
            reference = _coco_class_ap(evaluator, label)
            coco_style = class_average_precision(images, label, iou_threshold, interpolation="coco")
            voc_style = class_average_precision(images, label, iou_threshold)
            context = f"class {label} at IoU {iou_threshold}"
            if reference is None:
                assert coco_style is None and voc_style is None, context
                continue
            assert coco_style == pytest.approx(reference, abs=COCO_TOLERANCE), context
            assert abs(voc_style - reference) <= INTERPOLATION_BOUND + 1e-12, context
            scores, hits = _coco_ranked_hits(evaluator, label)
            matches = class_matches(images, label, iou_threshold)
            np.testing.assert_array_equal(matches.scores, scores, err_msg=context)
            np.testing.assert_array_equal(matches.hits, hits, err_msg=context)


def _random_images(
    seed: int, num_images: int = 80, num_classes: int = 3, tied_scores: bool = False
) -> list[ImageDetections]:
    """Ground-truth boxes, jittered predictions around them (IoUs spread across 0.4-0.5), duplicates, wrong classes and
    strays."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        count = int(rng.integers(0, 5))
        corner = rng.uniform(0, 400, size=(count, 2))
        size = rng.uniform(10, 120, size=(count, 2))
        gt = np.concatenate([corner, corner + size], axis=1)
        gt_classes = rng.integers(0, num_classes, size=count)
        if (
            count >= 2 and rng.random() < 0.5
        ):  # overlapping boxes of one class: a prediction can fall back to its second-best box
            gt[1] = gt[0] + rng.normal(0, 0.2, size=4) * np.tile(size[0], 2)
            gt[1, 2:] = np.maximum(gt[1, 2:], gt[1, :2] + 5)
            size[1], gt_classes[1] = gt[1, 2:] - gt[1, :2], gt_classes[0]
        boxes, classes = [], []
        for box, label, (width, height) in zip(gt, gt_classes, size):
            for _ in range(int(rng.choice([0, 1, 1, 2]))):  # missed, found, or found twice (duplicate)
                jitter = rng.normal(0, rng.uniform(0.0, 0.35), size=4) * np.array([width, height, width, height])
                boxes.append(box + jitter)
                classes.append(label if rng.random() > 0.1 else int(rng.integers(0, num_classes)))
        for _ in range(int(rng.integers(0, 3))):  # strays with no ground truth nearby
            corner = rng.uniform(0, 400, size=2)
            boxes.append(np.concatenate([corner, corner + rng.uniform(10, 120, size=2)]))
            classes.append(int(rng.integers(0, num_classes)))
        boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)  # keep jittered boxes valid
        scores = rng.random(len(boxes)).astype(np.float32)
        if tied_scores:
            scores = np.round(scores, 1).astype(np.float32)
        images.append(
            ImageDetections(
                boxes,
                scores,
                np.array(classes, dtype=np.int64),
                gt.astype(np.float32).reshape(-1, 4),
                gt_classes.astype(np.int64),
            )
        )
    return images


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_detections_agree_with_pycocotools(seed):
    """On random boxes, classes and scores, per-class AP at IoU 0.4 and 0.5 agrees with pycocotools (see the three
    checks above)."""
    _assert_agrees_with_coco(_random_images(seed), num_classes=3)


@pytest.mark.parametrize("seed", [10, 11])
def test_tied_scores_agree_with_pycocotools(seed):
    """With many tied scores (rounded to 0.1), ranking ties break the same way as pycocotools, so AP agrees."""
    _assert_agrees_with_coco(_random_images(seed, tied_scores=True), num_classes=3)


def test_no_predictions_at_all_agree_with_pycocotools():
    """No prediction anywhere: AP is 0 for classes with ground truth, as in pycocotools."""
    image = _image([], [], [], [[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1])
    _assert_agrees_with_coco([image, image], num_classes=2)
    assert class_average_precision([image], 0, 0.4) == 0.0
    assert class_average_precision([image], 0, 0.4, interpolation="coco") == 0.0


def test_class_without_ground_truth_is_undefined_like_pycocotools():
    """A class with predictions but no ground truth, and a class with neither, have no AP (None; -1 in pycocotools)."""
    image = _image([[0, 0, 10, 10], [5, 5, 30, 30]], [0.9, 0.8], [0, 1], [[0, 0, 10, 10]], [0])
    _assert_agrees_with_coco([image], num_classes=3)
    result = mean_average_precision([image], ["a", "b", "c"], 0.4)
    assert result["per_class"] == {"a": 1.0, "b": None, "c": None} and result["map"] == 1.0


def test_image_with_ground_truth_and_no_predictions_lowers_recall_like_pycocotools():
    """An image whose box is never predicted caps recall at 1/2: VOC AP 0.5, COCO AP 51/101."""
    found = _image([[0, 0, 10, 10]], [0.9], [0], [[0, 0, 10, 10]], [0])
    missed = _image([], [], [], [[0, 0, 10, 10]], [0])
    _assert_agrees_with_coco([found, missed], num_classes=1)
    assert class_average_precision([found, missed], 0, 0.4) == 0.5
    assert class_average_precision([found, missed], 0, 0.4, interpolation="coco") == pytest.approx(51 / 101)


def test_duplicate_predictions_on_one_box_agree_with_pycocotools():
    """Three copies of a prediction on one box: the best-scored is a hit, the others false positives."""
    image = _image(
        [[0, 0, 10, 10]] * 3 + [[50, 50, 70, 70]],
        [0.9, 0.8, 0.7, 0.6],
        [0] * 4,
        [[0, 0, 10, 10], [50, 50, 70, 70]],
        [0, 0],
    )
    _assert_agrees_with_coco([image], num_classes=1)
    np.testing.assert_array_equal(class_matches([image], 0, 0.4).hits, [True, False, False, True])


def test_tied_scores_across_images_agree_with_pycocotools():
    """Equal scores in different images and within an image, mixing hits and misses, rank as in pycocotools."""
    first = _image([[50, 50, 60, 60], [0, 0, 10, 10]], [0.5, 0.5], [0, 0], [[0, 0, 10, 10]], [0])
    second = _image([[0, 0, 10, 10], [70, 70, 90, 90]], [0.5, 0.5], [0, 0], [[0, 0, 10, 10], [30, 30, 40, 40]], [0, 0])
    _assert_agrees_with_coco([first, second], num_classes=1)
    np.testing.assert_array_equal(class_matches([first, second], 0, 0.4).hits, [False, True, True, False])


def test_prediction_falls_back_to_an_unmatched_overlapping_box_like_pycocotools():
    """When a prediction's best box is taken, it matches the best unmatched one above the threshold (not a false
    positive)."""
    image = _image([[0, 0, 10, 10], [0, 0, 10, 10.5]], [0.9, 0.8], [0, 0], [[0, 0, 10, 10], [0, 0, 10, 12]], [0, 0])
    _assert_agrees_with_coco([image], num_classes=1)
    np.testing.assert_array_equal(class_matches([image], 0, 0.5).hits, [True, True])


def test_iou_exactly_at_the_threshold_matches_like_pycocotools():
    """IoU exactly 0.5 matches at 0.5, exactly 0.4 matches at 0.4 only, and boxes that only touch never match."""
    at_half = _image([[0, 0, 10, 10]], [0.9], [0], [[0, 0, 10, 20]], [0])  # IoU 100/200
    at_forty = _image([[0, 0, 10, 10]], [0.8], [0], [[0, 0, 10, 25]], [0])  # IoU 100/250
    touching = _image([[10, 0, 20, 10]], [0.7], [0], [[0, 0, 10, 10]], [0])  # shared edge, IoU 0
    just_below = _image([[0, 0, 10, 10]], [0.6], [0], [[0, 0, 10, 25.5]], [0])  # IoU 100/255 < 0.4
    images = [at_half, at_forty, touching, just_below]
    _assert_agrees_with_coco(images, num_classes=1)
    np.testing.assert_array_equal(class_matches(images, 0, 0.4).hits, [True, True, False, False])
    np.testing.assert_array_equal(class_matches(images, 0, 0.5).hits, [True, False, False, False])


def test_coco_interpolation_golden_value():
    """101-point AP samples the envelope at recall 0, 0.01, ..., 1: a miss then a hit on one box gives 0.5."""
    image = _image([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0], [[0, 0, 10, 10]], [0])
    assert class_average_precision([image], 0, 0.4, interpolation="coco") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        class_average_precision([image], 0, 0.4, interpolation="11-point")  # type: ignore[arg-type]


# ---- the VinBigData challenge metric: VOC devkit matching ----------------------------------------
#
# `_voc_eval` below is a straightforward re-implementation of the PASCAL VOC devkit's Python
# `voc_eval` (as in py-faster-rcnn): all detections of a class sorted by confidence, each compared
# with every ground-truth box of its image (IoU with +1 on widths and heights), the best one taken;
# a hit if that IoU > the threshold and the box was not detected before, else a false positive; AP
# with all-point interpolation (use_07_metric=False). The one departure: the sort is stable, so
# tied scores keep image order (the devkit's default sort leaves their order unspecified).


def _voc_eval(images: list[ImageDetections], label: int, iou_threshold: float) -> float | None:
    class_records = {}
    npos = 0
    for index, image in enumerate(images):
        boxes = np.asarray(image.gt_boxes, dtype=np.float64)[np.asarray(image.gt_classes) == label]
        class_records[index] = {"bbox": boxes, "det": [False] * len(boxes)}
        npos += len(boxes)
    image_ids, confidence, boxes = [], [], []
    for index, image in enumerate(images):
        for box, score, cls in zip(image.pred_boxes, image.pred_scores, image.pred_classes):
            if cls == label:
                image_ids.append(index)
                confidence.append(float(score))
                boxes.append(np.asarray(box, dtype=np.float64))
    if npos == 0:
        return None
    sorted_ind = np.argsort(-np.array(confidence), kind="stable")
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        record = class_records[image_ids[sorted_ind[d]]]
        bb = boxes[sorted_ind[d]]
        ovmax, jmax = -np.inf, -1
        bbgt = record["bbox"]
        if bbgt.size > 0:
            ixmin = np.maximum(bbgt[:, 0], bb[0])
            iymin = np.maximum(bbgt[:, 1], bb[1])
            ixmax = np.minimum(bbgt[:, 2], bb[2])
            iymax = np.minimum(bbgt[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (bbgt[:, 2] - bbgt[:, 0] + 1.0) * (bbgt[:, 3] - bbgt[:, 1] + 1.0)
                - inters
            )
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), int(np.argmax(overlaps))
        if ovmax > iou_threshold:
            if not record["det"][jmax]:
                tp[d] = 1.0
                record["det"][jmax] = True
            else:
                fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 10, 11])
def test_voc_matching_agrees_with_the_devkit(seed):
    """On random boxes (duplicates, overlapping boxes, ties), VOC-matched AP equals the devkit's voc_eval at 0.4 and
    0.5."""
    images = _random_images(seed, tied_scores=seed >= 10)
    for iou_threshold in (0.4, 0.5):
        for label in range(3):
            ours = class_average_precision(images, label, iou_threshold, matching="voc")
            reference = _voc_eval(images, label, iou_threshold)
            assert (ours is None) == (reference is None)
            if reference is not None:
                assert ours == pytest.approx(reference, abs=1e-12), (seed, iou_threshold, label)


def test_voc_and_coco_matching_differ_where_the_best_box_is_taken():
    """A second prediction whose best box is taken is a false positive under VOC, a hit on the free box under COCO."""
    image = _image([[0, 0, 10, 10], [0, 0, 10, 10.5]], [0.9, 0.8], [0, 0], [[0, 0, 10, 10], [0, 0, 10, 12]], [0, 0])
    np.testing.assert_array_equal(class_matches([image], 0, 0.5).hits, [True, True])
    np.testing.assert_array_equal(class_matches([image], 0, 0.5, matching="voc").hits, [True, False])
    assert _voc_eval([image], 0, 0.5) == class_average_precision([image], 0, 0.5, matching="voc") == 0.5


def test_voc_matching_needs_iou_strictly_above_the_threshold():
    """VOC IoU uses inclusive pixels (+1) and the threshold is strict: IoU exactly 0.4 is a miss, just above a hit."""
    # +1 convention: [0,0,9,9] is 10x10 = 100 px; [0,0,9,24] is 10x25 = 250 px; IoU = 100/250 = 0.4 exactly.
    at_forty = _image([[0, 0, 9, 9]], [0.9], [0], [[0, 0, 9, 24]], [0])
    above = _image([[0, 0, 9, 9]], [0.9], [0], [[0, 0, 9, 23]], [0])  # 100/240
    np.testing.assert_array_equal(class_matches([at_forty], 0, 0.4, matching="voc").hits, [False])
    np.testing.assert_array_equal(class_matches([above], 0, 0.4, matching="voc").hits, [True])
    assert class_average_precision([at_forty], 0, 0.4, matching="voc") == _voc_eval([at_forty], 0, 0.4) == 0.0


def test_challenge_metric_scores_no_finding_as_a_1x1_box():
    """The challenge adds a "No finding" class: one [0,0,1,1] prediction per image scored by the normal-image
    confidence, ground truth on images without boxes; its AP follows how well normals are ranked first."""
    normal = _image([], [], [], [], [])
    abnormal = _image([[0, 0, 10, 10]], [0.9], [0], [[0, 0, 10, 10]], [0])
    images = [normal, abnormal, normal, abnormal]
    truth = np.array([True, False, True, False])
    ranked_first = challenge_average_precision(images, ["a"], np.array([0.9, 0.2, 0.8, 0.1]), truth)
    assert ranked_first["per_class"] == {"a": 1.0, "No finding": 1.0} and ranked_first["map"] == 1.0
    # Ranked normal, abnormal, abnormal, normal: hits at ranks 1 and 4 -> AP = 0.5 * 1 + 0.5 * 0.5.
    interleaved = challenge_average_precision(images, ["a"], np.array([0.9, 0.8, 0.1, 0.7]), truth)
    assert interleaved["per_class"]["No finding"] == pytest.approx(0.75)
    assert interleaved["map"] == pytest.approx((1.0 + 0.75) / 2)
    scored = with_no_finding_class(images, np.array([0.9, 0.8, 0.1, 0.7]), truth, 1)
    assert _voc_eval(scored, 1, 0.4) == pytest.approx(0.75)  # the devkit agrees on the No finding class too


def test_no_finding_class_without_normal_images_is_left_out_of_the_mean():
    """With no image free of boxes, "No finding" has no ground truth: undefined, and not averaged in."""
    abnormal = _image([[0, 0, 10, 10]], [0.9], [0], [[0, 0, 10, 10]], [0])
    result = challenge_average_precision([abnormal], ["a"], np.array([0.3]), np.array([False]))
    assert result["per_class"] == {"a": 1.0, "No finding": None} and result["map"] == 1.0


def test_finding_threshold_is_undefined_when_no_box_hits():
    """When every candidate is a miss no threshold gives F1 > 0: None (the caller's documented default), never the top
    score."""
    image = _image([[50, 50, 60, 60], [70, 70, 80, 80]], [0.9, 0.6], [0, 0], [[0, 0, 10, 10]], [0])
    assert finding_threshold([image], 0) is None
