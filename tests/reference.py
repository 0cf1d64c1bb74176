"""Straightforward versions of what the service does in a faster or more involved way, for tests to compare with."""

from __future__ import annotations

import numpy as np

from service.inference.postprocess import Detections


def at_operating_points(detections: Detections, thresholds: np.ndarray) -> Detections:
    """Keep the detections scoring at least their class's reporting threshold (thresholds[class]), after NMS.

    The service applies the thresholds before NMS instead (`select_detections(..., class_floors)`), which must
    keep exactly these.
    """
    keep = detections.scores >= thresholds[detections.classes]
    return Detections(detections.boxes[keep], detections.scores[keep], detections.classes[keep])
