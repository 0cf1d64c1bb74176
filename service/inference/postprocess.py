"""Model outputs -> findings and disease probabilities (pure numpy, shared with evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.dicom.preprocess import Letterbox


@dataclass(frozen=True)
class DetectionParams:
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    max_detections: int = 100
    pre_nms_top_k: int = 1000


@dataclass(frozen=True)
class Detections:
    """Detections of one image: xyxy boxes (K, 4), scores (K,), class indices (K,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against many."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    intersection = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return intersection / np.maximum(area + areas - intersection, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(int(best))
        if order.size:
            order = order[box_iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def select_detections(
    boxes: np.ndarray, scores: np.ndarray, params: DetectionParams, class_floors: np.ndarray | None = None
) -> Detections:
    """Dense (L, 4) boxes and (L, C) scores of one image -> class-wise NMS'd detections.

    `class_floors[c]`, when given, drops class c's candidates below it before NMS. Serving passes the
    reporting thresholds here: greedy NMS is class-wise and a box is only ever suppressed by a
    higher-scoring one, so the boxes kept above a threshold are the same as filtering after NMS
    (only the pre-NMS top-k and the max_detections cap can now keep more of them), while NMS runs over
    a handful of candidates instead of up to pre_nms_top_k; it was the largest CPU cost of the request
    handler (benchmarks/results/profile/).
    """
    keep_candidate = scores > params.score_threshold
    if class_floors is not None:
        keep_candidate &= scores >= class_floors[None, :]
    locations, classes = np.nonzero(keep_candidate)
    candidate_scores = scores[locations, classes]
    if candidate_scores.size > params.pre_nms_top_k:
        top = np.argpartition(-candidate_scores, params.pre_nms_top_k - 1)[: params.pre_nms_top_k]
        locations, classes, candidate_scores = locations[top], classes[top], candidate_scores[top]
    candidate_boxes = boxes[locations].astype(np.float32)
    kept: list[np.ndarray] = []
    for label in np.unique(classes):
        members = np.nonzero(classes == label)[0]
        kept.append(members[nms(candidate_boxes[members], candidate_scores[members], params.iou_threshold)])
    keep = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    keep = keep[np.argsort(-candidate_scores[keep], kind="stable")][: params.max_detections]
    return Detections(candidate_boxes[keep], candidate_scores[keep].astype(np.float32), classes[keep])


def to_original_space(detections: Detections, geometry: Letterbox) -> Detections:
    """Map boxes from the model input back to the original image's pixels, dropping empty ones."""
    boxes = geometry.to_original(detections.boxes)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Detections(boxes[nonempty], detections.scores[nonempty], detections.classes[nonempty])


def findings_json(detections: Detections, labels: list[str]) -> list[dict]:
    return [
        {
            "label": labels[int(label)],
            "score": float(score),
            "box": dict(zip(("x_min", "y_min", "x_max", "y_max"), (round(float(v), 2) for v in box))),
        }
        for box, score, label in zip(detections.boxes, detections.scores, detections.classes)
    ]


def diseases_json(probabilities: np.ndarray, labels: list[str], thresholds: dict[str, float]) -> list[dict]:
    return [
        {
            "label": label,
            "probability": float(probability),
            "threshold": float(thresholds[label]),
            "positive": bool(probability >= thresholds[label]),
        }
        for label, probability in zip(labels, probabilities)
    ]
