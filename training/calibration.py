"""Fitting the calibrators a pack ships (service/inference/calibration.py applies them), and measuring them.

Per label, four candidates are fitted on the validation split: `identity` (raw output), `temperature`
(one parameter on the logit), `platt` (slope and intercept on the logit) and `isotonic` (a monotone
step function). Which one a label gets is decided by measurement, not taste: each candidate is
cross-validated on the validation split (stratified folds; the out-of-fold predictions are scored)
and the one with the lowest out-of-fold Brier score wins; ties go to the simpler method. Brier is a
proper scoring rule (it rewards exactly the true probability), whereas the expected calibration
error depends on the binning and is 0 for a model that always answers the prevalence; ECE is
reported beside it. The winner is then refitted on the whole validation split. The selection table
(every candidate's out-of-fold Brier and ECE per label) goes into the calibration report and the
manifest, and the held-out test split reports ECE and Brier before and after (training/evaluate.py).

Fitting uses scikit-learn (IsotonicRegression, LogisticRegression for Platt scaling) and SciPy (the
temperature's one-dimensional likelihood); the service applies the fitted parameters with numpy only.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.inference.calibration import Calibration, Calibrator, logit
from training.figures import save_png
from training.metrics import (
    CALIBRATION_BINS,
    bootstrap_brier,
    bootstrap_ece,
    brier_score,
    expected_calibration_error,
    reliability_bins,
)

CANDIDATES = ("identity", "temperature", "platt", "isotonic")  # simplest first: ties go to the earlier one
SELECTION_RULE = (
    "per label, the candidate (identity, temperature, platt, isotonic) with the lowest Brier score of its "
    "out-of-fold predictions in stratified {folds}-fold cross-validation on the calibration split, refitted on "
    "the whole split; ties go to the simpler method; labels with fewer than {minimum} positives or negatives "
    "keep the raw output (identity)"
)
MIN_CLASS_COUNT = 2  # fewer positives (or negatives) than this: nothing can be fitted, the raw output stays
RUN_CALIBRATION_FILE = "calibration.json"  # a run's calibrators and operating points (training.calibrate --run)


def read_run_calibration(run: Path) -> dict | None:
    """A run's calibration.json ({"calibration": the manifest section, "thresholds", ...}), or None."""
    path = Path(run) / RUN_CALIBRATION_FILE
    if not path.is_file():
        return None
    import json

    return json.loads(path.read_text())


def _validate(raw: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    raw, targets = np.asarray(raw, dtype=np.float64).ravel(), np.asarray(targets).astype(np.int64).ravel()
    if raw.shape != targets.shape:
        raise ValueError(f"{raw.shape[0]} outputs but {targets.shape[0]} targets")
    return raw, targets


def fit_temperature(raw: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of sigmoid(logit(raw) / T)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_expit

    z, y = logit(raw), targets.astype(np.float64)

    def nll(log_temperature: float) -> float:
        scaled = z / math.exp(log_temperature)
        return float(-np.mean(y * log_expit(scaled) + (1 - y) * log_expit(-scaled)))

    # T in [e^-5, e^5]: far beyond any useful sharpening or flattening of a sigmoid output.
    return float(math.exp(minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded").x))


def fit_calibrator(method: str, raw: np.ndarray, targets: np.ndarray) -> Calibrator:
    """One calibrator of `method` fitted to (raw output, 0/1 target) pairs."""
    raw, targets = _validate(raw, targets)
    if method == "identity":
        return Calibrator("identity")
    if method == "temperature":
        return Calibrator("temperature", {"temperature": fit_temperature(raw, targets)})
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # C=inf: plain maximum likelihood on the logit (Platt 1999), no shrinkage towards slope 0.
        model = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000).fit(logit(raw)[:, None], targets)
        slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
        if slope <= 0:  # outputs unrelated or inversely related to the label here: a flat map would lose them
            return Calibrator("temperature", {"temperature": fit_temperature(raw, targets)})
        return Calibrator("platt", {"slope": slope, "intercept": intercept})
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(raw, targets)
        return Calibrator("isotonic", {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()})
    raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(CANDIDATES)}")


def out_of_fold(method: str, raw: np.ndarray, targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Calibrated predictions for every image from a calibrator fitted on the other folds."""
    from sklearn.model_selection import StratifiedKFold

    raw, targets = _validate(raw, targets)
    predictions = np.empty_like(raw)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_part, held_out in splitter.split(raw[:, None], targets):
        predictions[held_out] = fit_calibrator(method, raw[fit_part], targets[fit_part]).apply(raw[held_out])
    return predictions


@dataclass(frozen=True)
class Selection:
    """The calibrator chosen for one label and the measurements that chose it."""

    calibrator: Calibrator
    folds: int  # 0 when nothing could be cross-validated
    out_of_fold: dict[str, dict[str, float | None]]  # candidate -> {"brier", "ece"}
    note: str | None = None


def select_calibrator(raw: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0) -> Selection:
    """The candidate with the lowest out-of-fold Brier score, refitted on all of (raw, targets)."""
    raw, targets = _validate(raw, targets)
    positives, negatives = int(targets.sum()), int(len(targets) - targets.sum())
    if min(positives, negatives) < MIN_CLASS_COUNT:
        note = f"{positives} positives and {negatives} negatives: too few to fit a calibrator, raw output kept"
        return Selection(Calibrator("identity"), 0, {}, note)
    folds = max(2, min(folds, positives, negatives))
    table: dict[str, dict[str, float | None]] = {}
    for method in CANDIDATES:
        predictions = out_of_fold(method, raw, targets, folds, seed)
        table[method] = {
            "brier": brier_score(targets, predictions),
            "ece": expected_calibration_error(targets, predictions),
        }
    # Rounded so that differences below float noise do not beat a simpler method.
    best = min(CANDIDATES, key=lambda method: (round(table[method]["brier"], 12), CANDIDATES.index(method)))
    return Selection(fit_calibrator(best, raw, targets), folds, table)


def fit_calibration(
    raw: np.ndarray, targets: np.ndarray, labels: list[str], folds: int = 5, seed: int = 0
) -> tuple[Calibration, dict[str, Selection]]:
    """Calibrators for every label (columns of raw and targets in `labels` order) and how each was chosen."""
    raw, targets = np.asarray(raw, dtype=np.float64), np.asarray(targets)
    selections = {label: select_calibrator(raw[:, k], targets[:, k], folds, seed) for k, label in enumerate(labels)}
    return Calibration({label: selection.calibrator for label, selection in selections.items()}), selections


def manifest_section(selections: dict[str, Selection], fitted_on: dict, folds: int) -> dict:
    """The manifest's "calibration": how methods were chosen, on what, every calibrator and its selection table."""
    return {
        "method_selection": SELECTION_RULE.format(folds=folds, minimum=MIN_CLASS_COUNT),
        "fitted_on": fitted_on,
        "calibrators": {label: selection.calibrator.to_manifest() for label, selection in selections.items()},
        "selection": {
            label: {"folds": selection.folds, "out_of_fold": selection.out_of_fold}
            | ({"note": selection.note} if selection.note else {})
            for label, selection in selections.items()
        },
    }


# ---- measuring calibration (reports) -----------------------------------------------------------

CALIBRATION_METRICS = ("ece", "brier")


def bootstrap_calibration(
    targets: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, labels: list[str], counts: np.ndarray
) -> dict[tuple[str, str], np.ndarray]:
    """ECE and Brier before ("<metric>_raw") and after calibration, per label: {(metric, label): (B,) resamples}."""
    samples = {}
    for k, label in enumerate(labels):
        for suffix, probabilities in (("_raw", raw[:, k]), ("", calibrated[:, k])):
            samples[(f"ece{suffix}", label)] = bootstrap_ece(targets[:, k], probabilities, counts)
            samples[(f"brier{suffix}", label)] = bootstrap_brier(targets[:, k], probabilities, counts)
    return samples


def calibration_point_estimates(
    targets: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, labels: list[str]
) -> dict[str, dict]:
    """Per label: ECE and Brier before and after, the reliability bins of both, and the label's positives."""
    per_label = {}
    for k, label in enumerate(labels):
        per_label[label] = {
            "positives": int(np.asarray(targets)[:, k].sum()),
            "ece_raw": expected_calibration_error(targets[:, k], raw[:, k]),
            "ece": expected_calibration_error(targets[:, k], calibrated[:, k]),
            "brier_raw": brier_score(targets[:, k], raw[:, k]),
            "brier": brier_score(targets[:, k], calibrated[:, k]),
            "reliability_raw": reliability_bins(targets[:, k], raw[:, k]),
            "reliability": reliability_bins(targets[:, k], calibrated[:, k]),
        }
    return per_label


def plot_reliability(
    targets: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, labels: list[str], path: Path, title: str
) -> Path:
    """Reliability diagrams, one panel per label: observed frequency against mean probability per bin, before
    (grey) and after (blue) calibration, with the images per bin (after) as bars along the bottom."""
    from matplotlib.figure import Figure

    columns = max(1, min(3, len(labels)))
    rows = max(1, math.ceil(len(labels) / columns))
    figure = Figure(figsize=(3.8 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[len(labels) :]:
        extra.set_axis_off()
    centres = (np.arange(CALIBRATION_BINS) + 0.5) / CALIBRATION_BINS
    for k, (axis, label) in enumerate(zip(axes, labels)):
        axis.set_title("\n".join(textwrap.wrap(label, 32)), fontsize=9)
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed frequency")
        axis.plot([0, 1], [0, 1], linestyle=":", color="0.5", linewidth=1)
        for probabilities, colour, name in ((raw[:, k], "0.6", "raw"), (calibrated[:, k], "tab:blue", "calibrated")):
            bins = reliability_bins(targets[:, k], probabilities)
            filled = [i for i, n in enumerate(bins["images"]) if n]
            ece = expected_calibration_error(targets[:, k], probabilities)
            axis.plot(
                [bins["mean_probability"][i] for i in filled],
                [bins["observed_frequency"][i] for i in filled],
                "o-",
                color=colour,
                markersize=3,
                linewidth=1.2,
                label=f"{name}: ECE {ece:.3f}",
            )
        images = np.asarray(reliability_bins(targets[:, k], calibrated[:, k])["images"], dtype=np.float64)
        axis.bar(
            centres, 0.25 * images / max(images.max(), 1), width=1 / CALIBRATION_BINS, color="tab:blue", alpha=0.15
        )
        axis.legend(loc="upper left", fontsize=7)
    figure.suptitle(title + f" ({CALIBRATION_BINS} equal-width bins; bars: images per bin, calibrated)", fontsize=10)
    return save_png(figure, path)
