"""Triage: one abnormality number per image for a worklist to sort by, and a priority from a validated operating point.

    "triage": {"abnormality": 0.86, "priority": "expedite", "threshold": 0.31}

`abnormality` is the probability that the image is not "No finding": 1 - the (calibrated) probability the pack
reports for its "No finding" label, so it is as calibrated as the disease probabilities in the same answer and
agrees with them. `priority` is "expedite" when the abnormality is at or above the pack's triage operating
point, else "routine"; `threshold` is that operating point. It is chosen on a validation split, never on test
data: the highest threshold that still expedites a target share of the abnormal validation images (its
sensitivity, training/triage.py), so as many normal images as possible stay routine. The manifest states it:

    "triage": {"label": "No finding", "threshold": 0.31, "rule": "...", "target_sensitivity": 0.9,
               "validation": {"images": 225, "sensitivity": 0.91, "specificity": 0.62, ...}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PRIORITIES = ("routine", "expedite")


class TriageError(ValueError):
    """A manifest's triage entry is malformed or names a label the classifier does not have."""


@dataclass(frozen=True)
class TriageRule:
    label: str  # the classifier label whose complement is the abnormality
    index: int  # its position in the classifier's labels
    threshold: float  # abnormality at or above: expedite
    rule: str = ""
    validation: Mapping = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Mapping, labels: Sequence[str]) -> TriageRule | None:
        """The pack's rule; None when its manifest has no triage entry."""
        entry = manifest.get("triage")
        if entry is None:
            return None
        if not isinstance(entry, Mapping) or "threshold" not in entry or "label" not in entry:
            raise TriageError("the manifest's triage entry needs a label and a threshold")
        label, threshold = str(entry["label"]), float(entry["threshold"])
        if label not in labels:
            raise TriageError(f"the triage label {label!r} is not one of the classifier's labels {list(labels)}")
        if not 0.0 <= threshold <= 1.0:
            raise TriageError(f"the triage threshold {threshold} is not a probability")
        return cls(label, list(labels).index(label), threshold, str(entry.get("rule", "")), entry.get("validation", {}))

    def abnormality(self, probabilities: np.ndarray) -> np.ndarray:
        """(..., K) probabilities in the classifier's label order -> (...) abnormality."""
        return 1.0 - np.asarray(probabilities, dtype=np.float64)[..., self.index]

    def json(self, probabilities: np.ndarray) -> dict:
        """The answer's `triage` for one image's (K,) probabilities."""
        abnormality = float(self.abnormality(probabilities))
        priority = PRIORITIES[int(abnormality >= self.threshold)]
        return {"abnormality": abnormality, "priority": priority, "threshold": self.threshold}
