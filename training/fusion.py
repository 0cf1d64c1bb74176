"""Fusion of several radiologists' readings of one image into training targets (numpy only).

VinDr-CXR's training images were each read independently, and blind to each other, by three
radiologists (`rad_id`); its test images carry the consensus of five, and VinDr-PCXR's images one
reading each. This module turns the readings of one image into one set of targets:

Boxes: weighted box fusion (WBF; Solovyev, Wang & Gabruseva, "Weighted boxes fusion: ensembling
boxes from different object detection models", Image and Vision Computing 2021). Boxes are taken
in order of decreasing confidence (ties in input order); a box joins the cluster of its own class
whose fused box it overlaps most, when that IoU is at least `iou_threshold`, otherwise it starts a
cluster; a cluster's fused box is the confidence-weighted mean of its members' coordinates, and
radiologists all have confidence 1, so it is the plain mean. Departures from WBF as written for
ensembling detectors, both because the inputs are readers, not models:
- a cluster takes at most one box per rater: two overlapping boxes of one class drawn by the same
  radiologist are two findings in that reading, not two opinions about one finding;
- a match needs IoU >= threshold (the `ensemble_boxes` package uses >), the convention of the
  challenge metric in training/metrics.py, so two raters' boxes fuse exactly when the metric would
  count one as a hit on the other.
The default threshold, 0.4, is that metric's IoU for the same reason.

Each fused box records its support, the number of raters who marked it. `min_raters` drops boxes
with less support. The default, 1, keeps a finding marked by only one of three radiologists: the
readers were independent, a single mark is a radiologist's finding on the image, and dropping it
would teach the detector that the region is normal. The requirement is capped at the number of
raters who read the image, so single-reader images (VinDr-PCXR, consensus test rows) keep all boxes.

Image labels: vote. A label is positive when strictly more than `vote_threshold` of the image's
raters marked it. The default, 0.5, is the strict majority (2 of 3), the rule behind the VinDr-CXR
paper's label counts (its Table 2). A tie, exactly half (only possible with an even number of
readings, e.g. an image with two), is negative. Threshold 0 means "any rater"; 0.99 "all raters".
With the defaults, a box marked by one of three raters survives while that label's vote is
negative: boxes train the detector, votes the classifier, and each rule suits its target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.inference.postprocess import box_iou

DEFAULT_IOU_THRESHOLD = 0.4  # the VinBigData challenge metric's IoU (see module docstring)
DEFAULT_MIN_RATERS = 1
DEFAULT_VOTE_THRESHOLD = 0.5  # strict majority


@dataclass(frozen=True)
class FusionConfig:
    """How the readings of several raters become one image's targets (see module docstring)."""

    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    min_raters: int = DEFAULT_MIN_RATERS
    vote_threshold: float = DEFAULT_VOTE_THRESHOLD

    def __post_init__(self) -> None:
        # IoU 0 would fuse boxes that do not touch at all; a vote threshold of 1 could never be exceeded.
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if int(self.min_raters) != self.min_raters or self.min_raters < 1:
            raise ValueError(f"min_raters must be a positive integer, got {self.min_raters}")
        if not 0.0 <= self.vote_threshold < 1.0:
            raise ValueError(f"vote_threshold must be in [0, 1), got {self.vote_threshold}")


@dataclass(frozen=True)
class FusedBoxes:
    """Fused boxes of one image, clusters in order of creation, grouped by class in first-seen order."""

    boxes: np.ndarray  # (M, 4) float64 xyxy
    labels: tuple[str, ...]  # (M,)
    support: np.ndarray  # (M,) int64: raters whose boxes were fused into each box


def weighted_mean_box(boxes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Coordinates averaged with the given weights (WBF's fused box)."""
    weights = np.asarray(weights, dtype=np.float64)
    return (np.asarray(boxes, dtype=np.float64) * weights[:, None]).sum(axis=0) / weights.sum()


def cluster_boxes(
    boxes: np.ndarray, raters: Sequence[str], iou_threshold: float, weights: np.ndarray | None = None
) -> list[list[int]]:
    """WBF clusters of one class's boxes: lists of input indices, at most one box per rater each."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    weights = np.ones(len(boxes)) if weights is None else np.asarray(weights, dtype=np.float64)
    clusters: list[list[int]] = []
    fused: list[np.ndarray] = []
    for index in np.argsort(-weights, kind="stable"):
        open_clusters = [
            k for k, members in enumerate(clusters) if raters[index] not in {raters[member] for member in members}
        ]
        if open_clusters:
            overlaps = box_iou(boxes[index], np.stack([fused[k] for k in open_clusters]))
            best = int(np.argmax(overlaps))  # ties go to the earliest cluster
            if overlaps[best] >= iou_threshold:
                chosen = open_clusters[best]
                clusters[chosen].append(int(index))
                fused[chosen] = weighted_mean_box(boxes[clusters[chosen]], weights[clusters[chosen]])
                continue
        clusters.append([int(index)])
        fused.append(boxes[index])
    return clusters


def weighted_box_fusion(
    boxes: np.ndarray,
    labels: Sequence[str],
    raters: Sequence[str],
    iou_threshold: float,
    weights: np.ndarray | None = None,
) -> FusedBoxes:
    """WBF of one image's boxes from several raters; boxes of different classes never fuse."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    weights = np.ones(len(boxes)) if weights is None else np.asarray(weights, dtype=np.float64)
    if not len(boxes) == len(labels) == len(raters) == len(weights):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels, {len(raters)} raters, {len(weights)} weights")
    fused_boxes, fused_labels, support = [], [], []
    for label in dict.fromkeys(labels):  # classes in first-seen order, so the output order is reproducible
        mine = np.array([i for i, name in enumerate(labels) if name == label])
        for members in cluster_boxes(boxes[mine], [raters[i] for i in mine], iou_threshold, weights[mine]):
            fused_boxes.append(weighted_mean_box(boxes[mine[members]], weights[mine[members]]))
            fused_labels.append(label)
            support.append(len({raters[i] for i in mine[members]}))
    return FusedBoxes(
        np.array(fused_boxes, dtype=np.float64).reshape(-1, 4), tuple(fused_labels), np.array(support, dtype=np.int64)
    )


def enough_support(support: np.ndarray, num_raters: int, min_raters: int) -> np.ndarray:
    """Which boxes have the required support, the requirement capped at the raters who read the image."""
    return np.asarray(support) >= min(min_raters, max(num_raters, 1))


def fuse_rater_boxes(
    boxes: np.ndarray,
    labels: Sequence[str],
    raters: Sequence[str],
    num_raters: int,
    config: FusionConfig = FusionConfig(),
) -> FusedBoxes:
    """One image's training boxes: WBF across raters, then the `min_raters` filter.

    `num_raters` counts every rater who read the image, including those who drew no box.
    """
    fused = weighted_box_fusion(boxes, labels, raters, config.iou_threshold)
    keep = enough_support(fused.support, num_raters, config.min_raters)
    return FusedBoxes(
        fused.boxes[keep], tuple(label for label, kept in zip(fused.labels, keep) if kept), fused.support[keep]
    )


def vote(votes: np.ndarray, threshold: float = DEFAULT_VOTE_THRESHOLD) -> np.ndarray:
    """(R raters, L labels) 0/1 votes -> (L,) 0/1: positive when more than `threshold` of the raters marked it."""
    votes = np.atleast_2d(np.asarray(votes))
    positives = (votes != 0).sum(axis=0)
    # Counts against threshold x raters, so that a tie (2 of 4 at 0.5) compares equal and is negative.
    return (positives > threshold * len(votes)).astype(np.int64)


def vote_labels(readings: Sequence[Mapping[str, int]], threshold: float = DEFAULT_VOTE_THRESHOLD) -> dict[str, int]:
    """Image labels from several raters' label dicts; a label a reading lacks counts as a negative vote."""
    names = list(dict.fromkeys(name for reading in readings for name in reading))
    if not readings or not names:
        return dict.fromkeys(names, 0)
    votes = np.array([[reading.get(name, 0) for name in names] for reading in readings])
    return dict(zip(names, (int(value) for value in vote(votes, threshold))))
