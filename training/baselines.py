"""A simple baseline beside the classifier in every evaluation report, so a classifier that fails to beat it shows.

    python -m training.evaluate --data DIR --split test --pack PACK            (the baseline is on by default)

The baseline is ridge regression on 48 x 48 thumbnails: every image goes through the service's own
preprocessing (`service.dicom.pipeline.prepare`, letterboxed to 48², normalised), its 2,304 pixels are
standardised with the training split's mean and spread, and one ridge regression per disease label is fitted on
the dataset's training split (all of it: the classifier's validation part included, which the classifier saw
as well; a dataset made for evaluation only, without training images, lends its validation split instead). The
ridge penalty of each label is chosen by exact leave-one-out error on the images it is fitted on (closed form
from one SVD), so there is nothing to tune. Its scores are ranked on the evaluated split like the
classifier's probabilities: per-label AUROC, and the classifier-minus-baseline difference, each with a paired
percentile bootstrap interval over the same resampled images.

Where anatomy varies little between patients (one hospital's population; the uniform-anatomy phantoms), such a
model reads a finding's extra density straight off the pixels, and a classifier that does not beat it has not
learned what the images plainly show.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.dicom.pipeline import InputSpec, prepare
from service.dicom.preprocess import Normalization
from training.cache import PreprocessedCache
from training.data import Record
from training.metrics import auroc, bootstrap_auroc, percentile_interval, resample_counts

THUMBNAIL_SIZE = 48
THUMBNAIL_SPEC = InputSpec(THUMBNAIL_SIZE, Normalization(mean=0.5, std=0.25))
RIDGE_PENALTIES = tuple(float(v) for v in np.logspace(-1, 5, 13))  # relative to the number of features
DESCRIPTION = (
    f"ridge regression on {THUMBNAIL_SIZE}x{THUMBNAIL_SIZE} thumbnails (the service's preprocessing, pixels "
    "standardised), one per label, penalty chosen by leave-one-out error on the images it is fitted on"
)


def thumbnails(
    records: list[Record], cache: PreprocessedCache | None = None, threads: int = 2, description: str = "thumbnails"
) -> np.ndarray:
    """(N, 48 * 48) float32: each image through the service's pipeline at 48², read from the cache when given."""

    def one(record: Record) -> np.ndarray:
        if cache is not None:
            entry = cache.load(THUMBNAIL_SPEC, record.image_id, record.path)
            if entry is not None:
                return entry.input.reshape(-1)
        prepared = prepare(record.path.read_bytes(), THUMBNAIL_SPEC)
        if cache is not None:
            stored = cache.store(THUMBNAIL_SPEC, record.image_id, record.path, prepared.input, prepared.geometry)
            return stored.input.reshape(-1)
        return prepared.input.reshape(-1)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        rows = list(tqdm(pool.map(one, records), total=len(records), desc=description))
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, THUMBNAIL_SIZE**2), np.float32)


@dataclass(frozen=True)
class RidgeBaseline:
    mean: np.ndarray  # (F,) training-split feature means
    scale: np.ndarray  # (F,) training-split feature spreads (1 where constant)
    weights: np.ndarray  # (F, K)
    bias: np.ndarray  # (K,)
    penalties: np.ndarray  # (K,) the ridge penalty chosen for each label

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, K) ranking scores (not probabilities: only their order is used)."""
        return ((features - self.mean) / self.scale) @ self.weights + self.bias


def fit_ridge(
    features: np.ndarray, targets: np.ndarray, penalties: tuple[float, ...] = RIDGE_PENALTIES
) -> RidgeBaseline:
    """One ridge regression per target column, each with the penalty of least leave-one-out squared error.

    With X = U S V' (centred, standardised features), the fit for penalty a is V diag(s / (s² + a)) U' y and the
    leave-one-out residual of image i is r_i / (1 - h_ii), h_ii = sum_j U_ij² s_j² / (s_j² + a): one SVD serves
    every penalty and label.
    """
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(features), -1)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-8] = 1.0
    x = (features - mean) / scale
    target_mean = targets.mean(axis=0)
    y = targets - target_mean
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y  # (r, K)
    best_error = np.full(targets.shape[1], np.inf)
    weights = np.zeros((x.shape[1], targets.shape[1]))
    chosen = np.zeros(targets.shape[1])
    for relative in penalties:
        penalty = relative * x.shape[1]
        shrink = s**2 / (s**2 + penalty)
        fitted = u @ (shrink[:, None] * uty)
        leverage = (u**2) @ shrink + 1.0 / len(x)  # + the intercept's leverage
        loo_error = (((y - fitted) / (1.0 - leverage)[:, None]) ** 2).mean(axis=0)
        better = loo_error < best_error
        if better.any():
            solution = vt.T @ ((s / (s**2 + penalty))[:, None] * uty)
            weights[:, better] = solution[:, better]
            chosen[better] = relative
            best_error[better] = loo_error[better]
    return RidgeBaseline(mean, scale, weights, target_mean, chosen)


def label_matrix(records: list[Record], labels: list[str]) -> np.ndarray:
    return np.array([[record.image_labels.get(label, 0) for label in labels] for record in records], dtype=np.float64)


def compare(
    targets: np.ndarray,
    classifier: np.ndarray,
    baseline: np.ndarray,
    labels: list[str],
    resamples: int,
    seed: int,
    confidence: float,
) -> dict:
    """Per-label and macro AUROC of classifier and baseline, and their difference, with paired bootstrap intervals."""
    rng = np.random.default_rng(seed)
    counts = resample_counts(len(targets), resamples, rng) if resamples > 0 and len(targets) else None
    per_label, draws = {}, {"classifier": [], "baseline": []}
    for k, label in enumerate(labels):
        entry: dict = {
            "positives": int(targets[:, k].sum()),
            "classifier_auroc": auroc(targets[:, k], classifier[:, k]),
            "baseline_auroc": auroc(targets[:, k], baseline[:, k]),
        }
        both_defined = entry["classifier_auroc"] is not None and entry["baseline_auroc"] is not None
        entry["difference"] = entry["classifier_auroc"] - entry["baseline_auroc"] if both_defined else None
        if counts is not None:
            sampled = {
                name: bootstrap_auroc(targets[:, k], scores[:, k], counts)
                for name, scores in (("classifier", classifier), ("baseline", baseline))
            }
            for name, values in sampled.items():
                draws[name].append(values)
                entry[f"{name}_auroc_ci"] = percentile_interval(values, confidence)
            entry["difference_ci"] = percentile_interval(sampled["classifier"] - sampled["baseline"], confidence)
        per_label[label] = entry
    summary: dict = {}
    for name in ("classifier", "baseline"):
        defined = [e[f"{name}_auroc"] for e in per_label.values() if e[f"{name}_auroc"] is not None]
        summary[f"{name}_mean_auroc"] = float(np.mean(defined)) if defined else None
    both = summary["classifier_mean_auroc"] is not None and summary["baseline_mean_auroc"] is not None
    summary["mean_difference"] = summary["classifier_mean_auroc"] - summary["baseline_mean_auroc"] if both else None
    if counts is not None and labels:
        means = {name: np.nanmean(np.stack(values, axis=1), axis=1) for name, values in draws.items()}
        summary["classifier_mean_auroc_ci"] = percentile_interval(means["classifier"], confidence)
        summary["baseline_mean_auroc_ci"] = percentile_interval(means["baseline"], confidence)
        summary["mean_difference_ci"] = percentile_interval(means["classifier"] - means["baseline"], confidence)
    return summary | {"per_label": per_label, "verdict": verdict(summary, per_label)}


def verdict(summary: dict, per_label: dict) -> str:
    """One sentence: does the classifier beat the baseline (difference interval above 0), per label and overall."""
    interval = summary.get("mean_difference_ci")
    if summary.get("mean_difference") is None:
        return "undefined (a label without positives or negatives)"
    beaten = [
        label
        for label, e in per_label.items()
        if (e.get("difference_ci") or {}).get("low") is not None and e["difference_ci"]["low"] > 0
    ]
    losing = [
        label
        for label, e in per_label.items()
        if (e.get("difference_ci") or {}).get("high") is not None and e["difference_ci"]["high"] < 0
    ]
    if interval is None or interval.get("low") is None:
        overall = f"macro AUROC difference {summary['mean_difference']:+.3f} (no interval)"
    elif interval["low"] > 0:
        overall = "the classifier beats the baseline (macro AUROC difference interval above 0)"
    elif interval["high"] < 0:
        overall = "THE CLASSIFIER LOSES TO THE BASELINE (macro AUROC difference interval below 0)"
    else:
        overall = "the classifier does not clearly beat the baseline (the macro difference interval includes 0)"
    return f"{overall}; better on {len(beaten)} of {len(per_label)} labels" + (
        f", worse on {', '.join(losing)}" if losing else ""
    )


def baseline_report(
    train_records: list[Record],
    test_records: list[Record],
    labels: list[str],
    classifier_probabilities: np.ndarray,
    resamples: int,
    seed: int,
    confidence: float,
    cache: PreprocessedCache | None = None,
    threads: int = 2,
    fitted_split: str = "train",
) -> dict:
    """The report's "baseline" section: fit on `train_records` (the `fitted_split` split), compare on the evaluated
    images."""
    train_features = thumbnails(train_records, cache, threads, "baseline: training thumbnails")
    model = fit_ridge(train_features, label_matrix(train_records, labels))
    test_scores = model.scores(thumbnails(test_records, cache, threads, "baseline: evaluated thumbnails"))
    targets = label_matrix(test_records, labels)
    return {
        "model": DESCRIPTION,
        "fitted_on": {"split": fitted_split, "images": len(train_records)},
        "ridge_penalty_per_feature": dict(zip(labels, (float(p) for p in model.penalties))),
    } | compare(
        targets,
        np.asarray(classifier_probabilities, dtype=np.float64),
        test_scores,
        labels,
        resamples,
        seed,
        confidence,
    )


def markdown_section(section: dict | None) -> list[str]:
    """The report's "Baseline" section as markdown lines (nothing when the report has none)."""
    if not section:
        return []
    if "skipped" in section:
        return ["", "## Baseline", "", f"Not computed: {section['skipped']}."]

    def cell(value: float | None, interval: dict | None, signed: bool = False) -> str:
        if value is None:
            return "n/a"
        text = f"{value:+.3f}" if signed else f"{value:.3f}"
        if interval and interval.get("low") is not None:
            low, high = interval["low"], interval["high"]
            text += f" [{low:+.3f}, {high:+.3f}]" if signed else f" [{low:.3f}, {high:.3f}]"
        return text

    lines = [
        "",
        "## Baseline",
        "",
        f"Beside the classifier: {section['model']} (fitted on the {section['fitted_on']['split']} split, "
        f"{section['fitted_on']['images']} images). AUROC with paired bootstrap intervals over the same resampled "
        f"images; difference = classifier minus baseline. **Verdict: {section['verdict']}.**",
        "",
        "| global label | positives | classifier AUROC | baseline AUROC | difference |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| macro mean | | "
        + " | ".join(
            (
                cell(section["classifier_mean_auroc"], section.get("classifier_mean_auroc_ci")),
                cell(section["baseline_mean_auroc"], section.get("baseline_mean_auroc_ci")),
                cell(section["mean_difference"], section.get("mean_difference_ci"), signed=True),
            )
        )
        + " |",
    ]
    for label, entry in section["per_label"].items():
        lines.append(
            f"| {label} | {entry['positives']} | "
            + " | ".join(
                (
                    cell(entry["classifier_auroc"], entry.get("classifier_auroc_ci")),
                    cell(entry["baseline_auroc"], entry.get("baseline_auroc_ci")),
                    cell(entry["difference"], entry.get("difference_ci"), signed=True),
                )
            )
            + " |"
        )
    return lines


def evaluation_section(
    data: Path,
    split: str,
    layout: str,
    fusion: object,
    evaluated: list[Record],
    labels: list[str],
    classifier_probabilities: np.ndarray,
    bootstrap: tuple[int, int, float],
    cache: Path | None,
    threads: int,
) -> dict:
    """training.evaluate's hook: the baseline fitted on `data`'s training split and compared on the evaluated split."""
    from training.data import read_split  # the readers; here to keep this module's imports to the metrics

    if split == "train":
        return {"skipped": "the evaluated split is the training split the baseline would be fitted on"}
    fitted_split = "train"
    train_records = read_split(data, fitted_split, layout, fusion)  # type: ignore[arg-type]
    if not train_records and split != "validation":
        # An evaluation-only dataset (training.synthetic --n-train 0, as the demo pack's is): its validation split
        # is as independent of the evaluated test split as a training split would be, only smaller.
        fitted_split = "validation"
        train_records = read_split(data, fitted_split, layout, fusion)  # type: ignore[arg-type]
    if not train_records:
        fallback = "its validation split is the one evaluated" if split == "validation" else "no validation images"
        return {"skipped": f"{Path(data).name} has no training images to fit the baseline on, and {fallback}"}
    resamples, seed, confidence = bootstrap
    return baseline_report(
        train_records,
        evaluated,
        labels,
        classifier_probabilities,
        resamples,
        seed,
        confidence,
        PreprocessedCache(cache) if cache else None,
        threads,
        fitted_split,
    )
