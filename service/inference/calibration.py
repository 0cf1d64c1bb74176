"""Calibrators: raw model outputs -> calibrated probabilities (pure numpy, shared with evaluation).

A pack's classifier is trained with a weighted BCE (`pos_weight` up to 10), which pushes its sigmoid
outputs up for rare labels, so a raw output is a score, not a probability. Every pack therefore
ships one calibrator per output it calls a probability, fitted on a validation split
(`python -m training.calibrate`; the choice of method per label is measured there) and applied here
before anything is reported, so `probability` in the JSON, the SR and the GSPS is the calibrated one.

Manifest (`"calibration"`):

    {"method_selection": "...", "fitted_on": {...},
     "calibrators": {"Pneumonia": {"method": "platt", "slope": 0.71, "intercept": -0.42}, ...}}

Calibrators are keyed by output name, so any probability-like output can have one: the classifier's
labels today, and for example a triage "abnormality" output (`Calibration.calibrate("abnormality",
raw)`). Methods:

- `identity`: the raw output already is calibrated (kept only when that measured best);
- `temperature`: sigmoid(logit(p) / T), one parameter;
- `platt`: sigmoid(slope * logit(p) + intercept), Platt scaling on the logit;
- `isotonic`: a non-decreasing step function given by its breakpoints `x` -> `y`, interpolated
  linearly between them and clipped at the ends (what scikit-learn's IsotonicRegression predicts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

METHODS = ("identity", "temperature", "platt", "isotonic")
# Logits of probabilities this close to 0 or 1 are clipped: float32 sigmoid outputs saturate at 1.0.
LOGIT_EPSILON = 1e-7


class CalibrationError(ValueError):
    """A manifest's calibration entry is missing or malformed."""


def logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), LOGIT_EPSILON, 1.0 - LOGIT_EPSILON)
    return np.log(p) - np.log1p(-p)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(values, dtype=np.float64)))  # overflow-free


@dataclass(frozen=True)
class Calibrator:
    """One output's map from raw value to calibrated probability (module docstring)."""

    method: str
    parameters: Mapping[str, float | list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; one of {', '.join(METHODS)}")
        required = {"identity": (), "temperature": ("temperature",), "platt": ("slope", "intercept")}
        required["isotonic"] = ("x", "y")
        missing = [name for name in required[self.method] if name not in self.parameters]
        if missing:
            raise CalibrationError(f"{self.method} calibrator lacks {', '.join(missing)}")
        if self.method == "temperature" and not float(self.parameters["temperature"]) > 0:
            raise CalibrationError("temperature must be positive")
        if self.method == "platt" and not float(self.parameters["slope"]) > 0:
            # A non-positive slope would reverse or flatten the ranking: not a calibration of this output.
            raise CalibrationError("platt slope must be positive")
        if self.method == "isotonic":
            x, y = np.asarray(self.parameters["x"], float), np.asarray(self.parameters["y"], float)
            if len(x) < 1 or len(x) != len(y) or np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
                raise CalibrationError("isotonic breakpoints must be non-empty, of equal length and non-decreasing")
            if y.min() < 0 or y.max() > 1:
                raise CalibrationError("isotonic values must lie in [0, 1]")

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float64) for raw outputs in [0, 1], any shape."""
        raw = np.asarray(raw, dtype=np.float64)
        if self.method == "identity":
            return raw.copy()
        if self.method == "temperature":
            return sigmoid(logit(raw) / float(self.parameters["temperature"]))
        if self.method == "platt":
            return sigmoid(float(self.parameters["slope"]) * logit(raw) + float(self.parameters["intercept"]))
        x, y = np.asarray(self.parameters["x"], np.float64), np.asarray(self.parameters["y"], np.float64)
        return np.interp(raw, x, y)  # constant beyond the ends, like IsotonicRegression(out_of_bounds="clip")

    def to_manifest(self) -> dict:
        parameters = {
            k: (list(map(float, v)) if isinstance(v, list | tuple | np.ndarray) else float(v))
            for k, v in self.parameters.items()
        }
        return {"method": self.method} | parameters

    @classmethod
    def from_manifest(cls, entry: Mapping) -> Calibrator:
        if not isinstance(entry, Mapping) or "method" not in entry:
            raise CalibrationError(f"a calibrator must be an object with a method, not {entry!r}")
        return cls(str(entry["method"]), {k: v for k, v in entry.items() if k != "method"})


@dataclass(frozen=True)
class Calibration:
    """The calibrators of a pack, by output name."""

    calibrators: Mapping[str, Calibrator]

    @classmethod
    def from_manifest(cls, manifest: Mapping, required: Sequence[str] = ()) -> Calibration:
        """The manifest's "calibration"; every name in `required` must have a calibrator."""
        section = manifest.get("calibration")
        if not isinstance(section, Mapping) or not isinstance(section.get("calibrators"), Mapping):
            raise CalibrationError(
                "the manifest has no calibration (calibrators fitted on a validation split: "
                "python -m training.calibrate --pack PACK --data DIR --split validation)"
            )
        calibrators = {name: Calibrator.from_manifest(entry) for name, entry in section["calibrators"].items()}
        missing = [name for name in required if name not in calibrators]
        if missing:
            raise CalibrationError(f"no calibrator for {', '.join(missing)}")
        return cls(calibrators)

    def calibrate(self, name: str, raw: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the output `name` (KeyError when it has no calibrator)."""
        return self.calibrators[name].apply(raw)

    def calibrate_columns(self, names: Sequence[str], raw: np.ndarray) -> np.ndarray:
        """(..., K) raw outputs whose last axis is `names` -> calibrated, same shape, float64."""
        raw = np.asarray(raw, dtype=np.float64)
        calibrated = np.empty_like(raw)
        for k, name in enumerate(names):
            calibrated[..., k] = self.calibrate(name, raw[..., k])
        return calibrated

    def methods(self) -> dict[str, str]:
        return {name: calibrator.method for name, calibrator in self.calibrators.items()}
