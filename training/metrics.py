"""Detection, classification and calibration metrics, and their bootstrap over images (numpy only).

Detection: average precision per class at an IoU threshold, PASCAL VOC 2010+ all-point interpolation,
averaged over the classes that have ground truth, with one of two matching rules:

- `matching="coco"` (the default; reports call it "mAP@0.4 (COCO-style matching)"): within an image, a
  class's predictions are matched in score order, each to the best-overlapping ground-truth box of
  its class that is *still unmatched*, when that IoU is >= the threshold (pycocotools' rule; IoU in
  float64 with no "+1 pixel"). `interpolation="coco"` gives COCO's 101-point AP from the same
  matches, so tests compare with pycocotools exactly.
- `matching="voc"`: the PASCAL VOC devkit's rule (`voc_eval`), which the VinBigData challenge used:
  each prediction, in score order, takes the ground-truth box it overlaps most among *all* boxes of
  its class; it is a hit when that IoU is > the threshold and the box is not taken yet, and a false
  positive otherwise (a duplicate), even when another free box overlaps it enough. IoU follows the
  devkit's inclusive pixel convention (+1 on every width and height). `challenge_average_precision`
  adds the challenge's "No finding" class (a 1x1 box at [0, 0, 1, 1]); reports call it "VinBigData
  challenge mAP@0.4 (VOC matching, No finding as 1x1 box)".

Classification: AUROC (Mann-Whitney, ties counted half), ROC curves and per-label operating points.
Calibration: Brier score and expected calibration error (ECE) over equal-width probability bins.

Bootstrap: images are resampled with replacement. Matching never looks across images, so a
resample only re-weights each image's precomputed matches (`ClassMatches`): an image drawn c times
counts every one of its predictions and ground-truth boxes c times. A resample where a metric is
undefined (no ground truth of a class, no positive or no negative for a label) gives NaN for that
metric; `percentile_interval` skips those resamples and reports how many were valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.inference.postprocess import box_iou

Interpolation = Literal["voc", "coco"]
Matching = Literal["coco", "voc"]
# The VinBigData challenge's "No finding" prediction and ground truth: one 1x1 box in the corner.
NO_FINDING_BOX = np.array([0.0, 0.0, 1.0, 1.0])
# Equal-width bins of the expected calibration error and the reliability diagrams (Guo et al. 2017 use 15).
CALIBRATION_BINS = 15

# COCO's recall thresholds, built exactly as pycocotools builds them so 101-point AP agrees to the bit.
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


@dataclass(frozen=True)
class ImageDetections:
    """Predictions and ground truth of one image, in the same pixel space."""

    pred_boxes: np.ndarray  # (P, 4)
    pred_scores: np.ndarray  # (P,)
    pred_classes: np.ndarray  # (P,)
    gt_boxes: np.ndarray  # (G, 4)
    gt_classes: np.ndarray  # (G,)


@dataclass(frozen=True)
class ClassMatches:
    """One class's predictions over a list of images, best score first, each marked hit or miss.

    Rows of tied scores keep image order, then score order within an image (as pycocotools does).
    """

    scores: np.ndarray  # (P,) float64, non-increasing
    hits: np.ndarray  # (P,) bool: matched a ground-truth box
    image_index: np.ndarray  # (P,) int: which image each prediction came from
    gt_per_image: np.ndarray  # (N,) int: ground-truth boxes of the class in each image

    @property
    def num_gt(self) -> int:
        return int(self.gt_per_image.sum())


def precision_envelope(precision: np.ndarray) -> np.ndarray:
    """Running maximum from the right along the last axis (the interpolated precision)."""
    return np.maximum.accumulate(precision[..., ::-1], axis=-1)[..., ::-1]


def average_precision(recall: np.ndarray, precision: np.ndarray, interpolation: Interpolation = "voc") -> float:
    """AP of one ranked list of predictions, from its cumulative recall and precision.

    "voc": the area under the precision envelope (VOC 2010+ all-point interpolation).
    "coco": the mean of the envelope at 101 recall thresholds 0, 0.01, ..., 1, reading the envelope
    at the first prediction reaching each threshold and 0 beyond the last recall (pycocotools).
    """
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if interpolation == "coco":
        if not len(recall):
            return 0.0
        first = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")
        reached = first < len(recall)
        sampled = np.where(reached, precision_envelope(precision)[np.minimum(first, len(recall) - 1)], 0.0)
        return float(sampled.mean())
    if interpolation != "voc":
        raise ValueError(f"interpolation must be 'voc' or 'coco', not {interpolation!r}")
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = precision_envelope(np.concatenate([[0.0], precision, [0.0]]))
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def precision_recall(hits: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (recall, precision) after each prediction of a ranked list."""
    true_positives = np.cumsum(hits)
    return true_positives / max(num_gt, 1), true_positives / np.arange(1, len(hits) + 1)


def voc_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against many with the VOC devkit's inclusive pixels: every width and height gets +1."""
    width = np.maximum(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]) + 1.0, 0.0)
    height = np.maximum(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]) + 1.0, 0.0)
    intersection = width * height
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    areas = (others[:, 2] - others[:, 0] + 1.0) * (others[:, 3] - others[:, 1] + 1.0)
    return intersection / (area + areas - intersection)


def image_matches(
    image: ImageDetections, label: int, iou_threshold: float, matching: Matching = "coco"
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, hits) of one image's predictions of a class, best score first (ties keep their order).

    Greedy in score order, each ground-truth box matched at most once, so every prefix of a ranking
    built from these is the result of one score threshold. The two rules differ in what a prediction
    whose best box is already taken does (module docstring).
    """
    mine = np.nonzero(np.asarray(image.pred_classes) == label)[0]
    mine = mine[np.argsort(-np.asarray(image.pred_scores)[mine], kind="stable")]
    hits = np.zeros(len(mine), dtype=bool)
    # float64: float32 IoUs could land on the other side of the threshold than pycocotools' doubles.
    gt = np.asarray(image.gt_boxes, dtype=np.float64)[np.asarray(image.gt_classes) == label]
    taken = np.zeros(len(gt), dtype=bool)
    boxes = np.asarray(image.pred_boxes, dtype=np.float64)
    for rank, index in enumerate(mine):
        if taken.all():  # also true when the image has no ground truth of the class: the rest are misses
            break
        if matching == "voc":
            overlaps = voc_iou(boxes[index], gt)
            best = int(np.argmax(overlaps))  # the best box of all, taken or not
            if overlaps[best] > iou_threshold and not taken[best]:
                taken[best] = hits[rank] = True
            continue
        overlaps = box_iou(boxes[index], gt)
        overlaps[taken] = -1.0  # each ground-truth box matches at most one prediction
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold:
            taken[best] = hits[rank] = True
    return np.asarray(image.pred_scores, dtype=np.float64)[mine], hits


def class_matches(
    images: list[ImageDetections], label: int, iou_threshold: float, matching: Matching = "coco"
) -> ClassMatches:
    """Match one class in every image once; AP and every bootstrap resample are computed from this."""
    if matching not in ("coco", "voc"):
        raise ValueError(f"matching must be 'coco' or 'voc', not {matching!r}")
    per_image = [image_matches(image, label, iou_threshold, matching) for image in images]
    scores = np.concatenate([np.zeros(0)] + [scores for scores, _ in per_image])
    hits = np.concatenate([np.zeros(0, dtype=bool)] + [hits for _, hits in per_image])
    image_index = np.concatenate(
        [np.zeros(0, dtype=np.int64)]
        + [np.full(len(scores), i, dtype=np.int64) for i, (scores, _) in enumerate(per_image)]
    )
    order = np.argsort(-scores, kind="stable")
    gt_per_image = np.array([int((np.asarray(image.gt_classes) == label).sum()) for image in images], dtype=np.int64)
    return ClassMatches(scores[order], hits[order], image_index[order], gt_per_image)


def ranked_matches(
    images: list[ImageDetections], label: int, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """One class's predictions over all images, best score first: (scores, is-true-positive, ground-truth count)."""
    matches = class_matches(images, label, iou_threshold)
    return matches.scores, matches.hits, matches.num_gt


def matches_average_precision(matches: ClassMatches, interpolation: Interpolation = "voc") -> float | None:
    """AP of one class's matches; None when the class has no ground truth, 0 when it has no prediction."""
    if matches.num_gt == 0:
        return None
    if not len(matches.scores):
        return 0.0
    return average_precision(*precision_recall(matches.hits, matches.num_gt), interpolation)


def class_average_precision(
    images: list[ImageDetections],
    label: int,
    iou_threshold: float,
    interpolation: Interpolation = "voc",
    matching: Matching = "coco",
) -> float | None:
    """AP of one class over a set of images; None when the class has no ground truth."""
    return matches_average_precision(class_matches(images, label, iou_threshold, matching), interpolation)


def finding_threshold(images: list[ImageDetections], label: int, iou_threshold: float = 0.4) -> float | None:
    """The score threshold whose reported boxes have the best F1 against the ground truth.

    None when no threshold gives F1 > 0 (no ground truth, no prediction, or no prediction that hits):
    the caller then falls back to a documented default, never to the top score of a list of misses.
    """
    scores, hits, num_gt = ranked_matches(images, label, iou_threshold)
    if num_gt == 0 or not hits.any():
        return None
    true_positives = np.cumsum(hits)
    reported = np.arange(1, len(scores) + 1)
    f1 = 2 * true_positives / (reported + num_gt)
    # Only cut between distinct scores: a threshold keeps every box scoring at least as much.
    last_of_score = np.append(scores[1:] != scores[:-1], True)
    best = int(np.argmax(np.where(last_of_score, f1, -1.0)))
    return float(scores[best])


def mean_average_precision(
    images: list[ImageDetections],
    labels: list[str],
    iou_threshold: float,
    interpolation: Interpolation = "voc",
    matching: Matching = "coco",
) -> dict:
    """{"map": mean over classes with ground truth, "per_class": {label: AP or None}}."""
    per_class = {
        name: class_average_precision(images, i, iou_threshold, interpolation, matching)
        for i, name in enumerate(labels)
    }
    present = [ap for ap in per_class.values() if ap is not None]
    return {"map": float(np.mean(present)) if present else None, "per_class": per_class}


def with_no_finding_class(
    images: list[ImageDetections], no_finding_scores: np.ndarray, no_finding_truth: np.ndarray, no_finding_class: int
) -> list[ImageDetections]:
    """The images as the VinBigData challenge scored them: a "No finding" class with one 1x1 box.

    Every image gets a "No finding" prediction at [0, 0, 1, 1] scoring `no_finding_scores[i]` (the
    challenge's "14 <confidence> 0 0 1 1"), and the images whose `no_finding_truth` is true (no box
    at all in the ground truth) get a "No finding" ground-truth box at the same place.
    """
    scored = []
    for image, score, normal in zip(images, np.asarray(no_finding_scores), np.asarray(no_finding_truth, dtype=bool)):
        gt_boxes, gt_classes = np.asarray(image.gt_boxes).reshape(-1, 4), np.asarray(image.gt_classes)
        if normal:
            gt_boxes = np.concatenate([gt_boxes, NO_FINDING_BOX[None]])
            gt_classes = np.append(gt_classes, no_finding_class)
        scored.append(
            ImageDetections(
                np.concatenate([np.asarray(image.pred_boxes).reshape(-1, 4), NO_FINDING_BOX[None]]),
                np.append(np.asarray(image.pred_scores, dtype=np.float64), float(score)),
                np.append(np.asarray(image.pred_classes), no_finding_class),
                gt_boxes,
                gt_classes,
            )
        )
    return scored


def challenge_average_precision(
    images: list[ImageDetections],
    labels: list[str],
    no_finding_scores: np.ndarray,
    no_finding_truth: np.ndarray,
    iou_threshold: float = 0.4,
) -> dict:
    """The VinBigData challenge metric: VOC-devkit matching at IoU > 0.4 over `labels` plus "No finding" (1x1 box).

    {"map": mean over the classes with ground truth, "per_class": {label: AP or None, "No finding": AP or None}}.
    """
    scored = with_no_finding_class(images, no_finding_scores, no_finding_truth, len(labels))
    return mean_average_precision(scored, [*labels, "No finding"], iou_threshold, matching="voc")


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
        ranks[order[start : start + count]] = start + (count + 1) / 2.0
    return float((ranks[targets].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def roc_curve(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(false-positive rate, true-positive rate, threshold) from the strictest threshold to the most lenient.

    One point per distinct score (a threshold keeps every score >= it) after a first point (0, 0) at
    threshold +inf. None when only one class is present.
    """
    targets = np.asarray(targets).astype(bool)
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    sorted_scores, sorted_targets = np.asarray(scores, dtype=np.float64)[order], targets[order]
    last_of_score = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    true_positives = np.cumsum(sorted_targets)[last_of_score]
    false_positives = np.cumsum(~sorted_targets)[last_of_score]
    return (
        np.concatenate([[0.0], false_positives / negatives]),
        np.concatenate([[0.0], true_positives / positives]),
        np.concatenate([[np.inf], sorted_scores[last_of_score]]),
    )


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


def brier_score(targets: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Mean squared difference between the probability and the 0/1 outcome; None without images."""
    targets, probabilities = np.asarray(targets, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    return float(np.mean((probabilities - targets) ** 2)) if len(targets) else None


def calibration_bin_index(probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Which of `bins` equal-width bins on [0, 1] each probability falls in (1.0 in the last one)."""
    return np.minimum((np.asarray(probabilities, dtype=np.float64) * bins).astype(np.int64), bins - 1).clip(0)


def reliability_bins(targets: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Per bin: images, mean predicted probability and observed frequency (None in an empty bin)."""
    targets, probabilities = np.asarray(targets, dtype=np.float64), np.asarray(probabilities, dtype=np.float64)
    index = calibration_bin_index(probabilities, bins)
    count = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, weights=probabilities, minlength=bins)
    observed = np.bincount(index, weights=targets, minlength=bins)
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "images": count.tolist(),
        "mean_probability": [float(p / n) if n else None for p, n in zip(predicted, count)],
        "observed_frequency": [float(o / n) if n else None for o, n in zip(observed, count)],
    }


def expected_calibration_error(
    targets: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> float | None:
    """ECE: the image-weighted mean over equal-width bins of |observed frequency - mean probability|."""
    if not len(np.asarray(targets)):
        return None
    return float(bootstrap_ece(targets, probabilities, np.ones((1, len(np.asarray(targets)))), bins)[0])


# ---- bootstrap over images -------------------------------------------------------------------


def resample_counts(num_images: int, num_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, N) how often each image is drawn in each resample of N images with replacement."""
    if num_images == 0:
        return np.zeros((num_resamples, 0), dtype=np.int64)
    draws = rng.integers(0, num_images, size=(num_resamples, num_images))
    # One bincount for all rows: shift row b's image indices into the range [b*N, (b+1)*N).
    flat = (draws + np.arange(num_resamples)[:, None] * num_images).ravel()
    return np.bincount(flat, minlength=num_resamples * num_images).reshape(num_resamples, num_images)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (the metric is undefined there)."""
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def bootstrap_average_precision(matches: ClassMatches, counts: np.ndarray) -> np.ndarray:
    """All-point (VOC) AP of the class in each resample: (B,), NaN where a resample has no ground truth of it.

    The copies of a prediction from an image drawn c times are all hits or all misses and share one
    rank, so they count as one row of weight c: the precision envelope of a run of hits is its value
    at the run's end, and a run of misses never sets the envelope, so this equals the AP of the
    expanded ranking (copies kept together among tied scores).
    """
    counts = np.asarray(counts, dtype=np.float64)
    num_gt = counts @ matches.gt_per_image
    weights = counts[:, matches.image_index]  # (B, P)
    true_positives = np.cumsum(weights * matches.hits, axis=1)
    reported = np.cumsum(weights, axis=1)
    # Rows of weight 0 (image not drawn) repeat the previous precision and add no recall.
    envelope = precision_envelope(true_positives / np.maximum(reported, 1e-12))
    area = np.sum(weights * matches.hits * envelope, axis=1)  # recall steps are weight / num_gt
    return _ratio(area, num_gt)


def bootstrap_auroc(targets: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC (ties count half) in each resample: (B,), NaN where a resample lacks positives or negatives."""
    targets = np.asarray(targets).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if not len(scores):
        return np.full(len(counts), np.nan)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    group_starts = np.flatnonzero(np.append(True, sorted_scores[1:] != sorted_scores[:-1]))
    weights = counts[:, order]
    # Drawn positives and negatives per distinct score, lowest score first: (B, U).
    positives = np.add.reduceat(weights * targets[order], group_starts, axis=1)
    negatives = np.add.reduceat(weights * ~targets[order], group_starts, axis=1)
    negatives_below = np.cumsum(negatives, axis=1) - negatives
    wins = np.sum(positives * (negatives_below + 0.5 * negatives), axis=1)
    return _ratio(wins, positives.sum(axis=1) * negatives.sum(axis=1))


def bootstrap_brier(targets: np.ndarray, probabilities: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Brier score in each resample: (B,), NaN for an empty resample."""
    squared = (np.asarray(probabilities, dtype=np.float64) - np.asarray(targets, dtype=np.float64)) ** 2
    counts = np.asarray(counts, dtype=np.float64)
    return _ratio(counts @ squared, counts.sum(axis=1))


def bootstrap_ece(
    targets: np.ndarray, probabilities: np.ndarray, counts: np.ndarray, bins: int = CALIBRATION_BINS
) -> np.ndarray:
    """ECE in each resample: (B,). Per bin, |sum of (outcome - probability)| over its drawn images, summed, / images."""
    residual = np.asarray(targets, dtype=np.float64) - np.asarray(probabilities, dtype=np.float64)
    members = np.eye(bins)[calibration_bin_index(probabilities, bins)]  # (N, bins) one-hot
    counts = np.asarray(counts, dtype=np.float64)
    return _ratio(np.abs(counts @ (members * residual[:, None])).sum(axis=1), counts.sum(axis=1))


def bootstrap_operating_point(
    targets: np.ndarray, scores: np.ndarray, threshold: float, counts: np.ndarray
) -> dict[str, np.ndarray]:
    """Sensitivity, specificity and F1 at a fixed threshold in each resample: (B,) each, NaN where undefined."""
    targets = np.asarray(targets).astype(bool)
    predicted = np.asarray(scores) >= threshold
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp = counts @ (predicted & targets), counts @ (predicted & ~targets)
    fn, tn = counts @ (~predicted & targets), counts @ (~predicted & ~targets)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def nan_mean_rows(values: np.ndarray) -> np.ndarray:
    """Mean of each row over its defined (non-NaN) entries; NaN for a row with none (no RuntimeWarning)."""
    values = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(values)
    return _ratio(np.where(defined, values, 0.0).sum(axis=1), defined.sum(axis=1))


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> dict[str, float | int | None]:
    """Percentile bootstrap interval over the resamples where the metric is defined (NaN = skipped).

    {"low", "high", "valid_resamples"}; low/high are None when no resample was valid.
    """
    valid = np.asarray(samples, dtype=np.float64)
    valid = valid[~np.isnan(valid)]
    if not len(valid):
        return {"low": None, "high": None, "valid_resamples": 0}
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(valid, [tail, 100.0 - tail])
    return {"low": float(low), "high": float(high), "valid_resamples": int(len(valid))}
