"""Detection and classification metrics (numpy only).

Detection: the VinBigData challenge metric, PASCAL VOC (2010+, all-point interpolated) average
precision per class at an IoU threshold of 0.4, averaged over the classes that have ground truth.
Classification: AUROC (Mann-Whitney, ties counted half), and per-label operating points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.postprocess import box_iou


@dataclass(frozen=True)
class ImageDetections:
    """Predictions and ground truth of one image, in the same pixel space."""

    pred_boxes: np.ndarray  # (P, 4)
    pred_scores: np.ndarray  # (P,)
    pred_classes: np.ndarray  # (P,)
    gt_boxes: np.ndarray  # (G, 4)
    gt_classes: np.ndarray  # (G,)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (VOC 2010+ all-point interpolation)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def ranked_matches(images: list[ImageDetections], label: int, iou_threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """One class's predictions over all images, best score first: (scores, is-true-positive, ground-truth count).

    Predictions are matched greedily per image in score order, each ground-truth box at most once
    (PASCAL VOC), so every prefix of the ranking is the result of one score threshold.
    """
    num_gt = sum(int((image.gt_classes == label).sum()) for image in images)
    scores, hits = [], []
    for image in images:
        gt = image.gt_boxes[image.gt_classes == label]
        taken = np.zeros(len(gt), dtype=bool)
        mine = np.nonzero(image.pred_classes == label)[0]
        for index in mine[np.argsort(-image.pred_scores[mine], kind="stable")]:
            scores.append(float(image.pred_scores[index]))
            if len(gt) == 0:
                hits.append(False)
                continue
            overlaps = box_iou(image.pred_boxes[index], gt)
            overlaps[taken] = -1.0  # each ground-truth box matches at most one prediction
            best = int(np.argmax(overlaps))
            matched = overlaps[best] >= iou_threshold
            taken[best] |= matched
            hits.append(bool(matched))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.asarray(scores, dtype=np.float64)[order], np.asarray(hits, dtype=bool)[order], num_gt


def class_average_precision(images: list[ImageDetections], label: int, iou_threshold: float) -> float | None:
    """AP of one class over a set of images; None when the class has no ground truth."""
    scores, hits, num_gt = ranked_matches(images, label, iou_threshold)
    if num_gt == 0:
        return None
    if not len(scores):
        return 0.0
    true_positives = np.cumsum(hits)
    false_positives = np.cumsum(~hits)
    recall = true_positives / num_gt
    precision = true_positives / np.maximum(true_positives + false_positives, 1e-9)
    return average_precision(recall, precision)


def finding_threshold(images: list[ImageDetections], label: int, iou_threshold: float = 0.4) -> float | None:
    """The score threshold whose reported boxes have the best F1 against the ground truth.

    None when the class has no ground truth or no prediction (no operating point can be chosen).
    """
    scores, hits, num_gt = ranked_matches(images, label, iou_threshold)
    if num_gt == 0 or not len(scores):
        return None
    true_positives = np.cumsum(hits)
    reported = np.arange(1, len(scores) + 1)
    f1 = 2 * true_positives / (reported + num_gt)
    # Only cut between distinct scores: a threshold keeps every box scoring at least as much.
    last_of_score = np.append(scores[1:] != scores[:-1], True)
    best = int(np.argmax(np.where(last_of_score, f1, -1.0)))
    return float(scores[best])


def mean_average_precision(images: list[ImageDetections], labels: list[str], iou_threshold: float) -> dict:
    """{"map": mean over classes with ground truth, "per_class": {label: AP or None}}."""
    per_class = {name: class_average_precision(images, i, iou_threshold) for i, name in enumerate(labels)}
    present = [ap for ap in per_class.values() if ap is not None]
    return {"map": float(np.mean(present)) if present else None, "per_class": per_class}


def auroc(targets: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    targets = np.asarray(targets).astype(bool)
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average ranks over ties so equal scores count as half a correct ordering.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start:start + count]] = start + (count + 1) / 2.0
    return float((ranks[targets].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def youden_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (0.5 when undefined)."""
    targets = np.asarray(targets).astype(bool)
    if targets.all() or not targets.any():
        return 0.5
    candidates = np.unique(scores)
    best, best_j = 0.5, -1.0
    for threshold in candidates:
        predicted = scores >= threshold
        sensitivity = (predicted & targets).sum() / targets.sum()
        specificity = (~predicted & ~targets).sum() / (~targets).sum()
        if sensitivity + specificity - 1 > best_j:
            best, best_j = float(threshold), float(sensitivity + specificity - 1)
    return best


def operating_point(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Sensitivity, specificity and F1 at a threshold."""
    targets = np.asarray(targets).astype(bool)
    predicted = np.asarray(scores) >= threshold
    tp, fp = int((predicted & targets).sum()), int((predicted & ~targets).sum())
    fn, tn = int((~predicted & targets).sum()), int((~predicted & ~targets).sum())
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
    }
