"""Evaluate a model pack (ONNX, as served) or a training run (PyTorch) on a dataset split.

    python -m training.evaluate --data data/synthetic --split test --pack models/demo-synthetic
    python -m training.evaluate --data data/synthetic --split test --pack models/demo-synthetic --precision fp16

Every image goes through the service's own pipeline (DICOM bytes -> `service.dicom.pipeline.prepare`
-> model -> `service.inference.postprocess` -> the pack's calibrators), and boxes are scored in the
original image's pixel space against the CSV annotations. The report names each metric exactly:

- detection: "mAP@0.4 (COCO-style matching)" and mAP@0.5, per-class AP (all-point interpolation);
- "VinBigData challenge mAP@0.4 (VOC matching, No finding as 1x1 box)": the challenge's metric
  (training/metrics.py), with "No finding" scored by the classifier's calibrated No-finding probability;
- classification: per-label AUROC, sensitivity / specificity / F1 at the pack's operating points
  (chosen on validation data), macro means;
- calibration: expected calibration error and Brier score of the raw outputs and of the calibrated
  probabilities (as served), with reliability diagrams;
- subgroups: the above by age band, sex, view, manufacturer and modality where the headers say, with
  flags for groups that are too small or possibly worse (training/subgroups.py).

Every metric comes with a percentile bootstrap confidence interval (--bootstrap resamples of the
images, --seed). The split must be independent of what the models and their calibration were fitted
on: image ids shared with the pack's data_splits.json (or the run's splits.json and calibration.json)
are refused, unless --allow-seen-images marks the report as not independent. --precision fp16
evaluates the float16 variant the service runs on a GPU (on CPU it works, slowly). --record writes the
headline metrics of this precision and the test split's identity (dataset seed and difficulty,
image count, hash of the id list) into the pack's manifest; a pack version is accepted on one test
split only, and a split the pack was tuned after is refused.

Writes into --out (default: the pack or run folder): evaluation_<split>.json and .md,
pr_curves_<split>.png (detection precision-recall at IoU 0.4), roc_curves_<split>.png and
reliability_<split>.png; for fp16, the same names with "<split>.fp16".
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.dicom.pipeline import ModelInputs, prepare
from service.dicom.preprocess import Letterbox
from service.inference.calibration import Calibration
from service.inference.heatmaps import HeatmapGrid
from service.inference.modelpack import ModelPack, OnnxModels
from service.inference.postprocess import DetectionParams, Detections, select_detections, to_original_space
from service.settings import Settings
from training import baselines, subgroups
from training.calibration import (
    CALIBRATION_METRICS,
    bootstrap_calibration,
    calibration_point_estimates,
    plot_reliability,
    read_run_calibration,
)
from training.data import Record, add_layout_arguments, fusion_from_args, read_split
from training.figures import save_png
from training.heatmap_eval import markdown_section as heatmaps_markdown
from training.heatmap_eval import peak_in_box
from training.metrics import (
    CALIBRATION_BINS,
    ClassMatches,
    ImageDetections,
    auroc,
    bootstrap_auroc,
    bootstrap_average_precision,
    bootstrap_operating_point,
    class_matches,
    matches_average_precision,
    nan_mean_rows,
    operating_point,
    percentile_interval,
    precision_envelope,
    precision_recall,
    resample_counts,
    roc_curve,
    with_no_finding_class,
)
from training.splits import (
    PACK_SPLITS_FILE,
    RUN_SPLITS_FILE,
    dataset_provenance,
    fitted_ids,
    overlap,
    read_splits,
    split_record,
)
from training.triage import markdown_section as triage_markdown
from training.triage import triage_evaluation

# One stacked (N, 1, S, S) batch per distinct input of the models -> boxes, scores, probabilities.
InferFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]

# Report key suffix -> IoU threshold of the COCO-style mAP (0.4: the challenge's IoU; 0.5: the usual VOC one).
IOU_THRESHOLDS = {"40": 0.4, "50": 0.5}
CHALLENGE_IOU = 0.4
OPERATING_METRICS = ("sensitivity", "specificity", "f1")
# What the report calls each detection metric (README "Evaluation outputs" uses the same names).
MAP_NAMES = {"40": "mAP@0.4 (COCO-style matching)", "50": "mAP@0.5 (COCO-style matching)"}
CHALLENGE_NAME = "VinBigData challenge mAP@0.4 (VOC matching, No finding as 1x1 box)"
NO_FINDING = "No finding"
HEADER_ATTRIBUTES = ("PatientAge", "PatientSex", "ViewPosition", "Manufacturer", "Modality")


@dataclass
class Predictions:
    image_ids: list[str]
    detections: list[Detections]  # original pixel space
    probabilities: np.ndarray  # N x K, the classifier's raw outputs (uncalibrated)
    headers: list[dict[str, str]] = field(default_factory=list)  # HEADER_ATTRIBUTES of each image, as text
    heatmaps: list[np.ndarray] | None = None  # per image (K, h, w), when the model returns them
    geometries: list[Letterbox] | None = None  # per image: where the classifier's input lies on the original


@dataclass(frozen=True)
class EvaluationInputs:
    """What the metrics need, as arrays: per-image detections vs ground truth, per-label probabilities vs targets."""

    images: list[ImageDetections]  # original pixel space
    targets: np.ndarray  # (N, K) 0/1 image labels, columns in global_labels order
    probabilities: np.ndarray  # (N, K) as reported: calibrated when the source has calibrators
    local_labels: list[str]
    global_labels: list[str]
    thresholds: dict[str, float]  # per global label, chosen on validation data
    raw_probabilities: np.ndarray | None = None  # (N, K) the classifier's outputs before calibration (None: same)
    no_finding_truth: np.ndarray | None = None  # (N,) image has no box of any label (None: no ground-truth box here)
    attributes: list[dict] = field(default_factory=list)  # subgroup attributes per image (training/subgroups.py)

    @property
    def raw(self) -> np.ndarray:
        return self.probabilities if self.raw_probabilities is None else self.raw_probabilities

    @property
    def normal(self) -> np.ndarray:
        if self.no_finding_truth is not None:
            return np.asarray(self.no_finding_truth, dtype=bool)
        return np.array([len(image.gt_classes) == 0 for image in self.images], dtype=bool)

    def subset(self, indices: list[int]) -> EvaluationInputs:
        return replace(
            self,
            images=[self.images[i] for i in indices],
            targets=self.targets[indices],
            probabilities=self.probabilities[indices],
            raw_probabilities=None if self.raw_probabilities is None else self.raw_probabilities[indices],
            no_finding_truth=None if self.no_finding_truth is None else np.asarray(self.no_finding_truth)[indices],
            attributes=[self.attributes[i] for i in indices] if self.attributes else [],
        )


@dataclass(frozen=True)
class BootstrapSpec:
    resamples: int = 1000  # 0: no intervals
    seed: int = 0
    confidence: float = 0.95
    # Resamples per vectorised step: memory is about chunk x (predictions of one class) x 8 bytes x a few.
    chunk: int = 50


# IoU key ("40", "50") -> one entry per local label; "challenge" -> one per local label and "No finding" last.
DetectionMatches = dict[str, list[ClassMatches]]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test", help="split folder to evaluate (test, validation, train)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pack", type=Path, help="model pack folder (evaluated with ONNX Runtime, as served)")
    source.add_argument("--run", type=Path, help="training run folder (evaluated with PyTorch)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: the pack or run folder)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="threads decoding DICOMs")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples of the images for the confidence intervals (0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the percentile intervals")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16"),
        default="auto",
        help="pack variant to evaluate (auto: what the service would serve here, fp16 on a GPU; fp16 also runs on "
        "CPU, slowly)",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="write this evaluation (its precision's headline metrics and the test split's identity) into the "
        "pack's manifest: the split becomes the pack version's acceptance test",
    )
    parser.add_argument(
        "--allow-seen-images",
        action="store_true",
        help="evaluate even when the split shares images with what the models or their calibration were fitted on "
        "(the report then says it is not an independent evaluation; never with --record)",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="report a ridge regression on 48x48 thumbnails, fitted on the dataset's train split "
        "(its validation split where it has no training images), beside the classifier (training/baselines.py)",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="preprocessed-input cache for the baseline's thumbnails (reused)"
    )
    add_layout_arguments(parser)
    return parser


def command_line(args: argparse.Namespace) -> str:
    """An equivalent command line for the report (from the parsed options, so it also works when called from code)."""
    parts = ["python", "-m", "training.evaluate"]
    for key, value in vars(args).items():
        if value is None or value is False:
            continue
        parts.append("--" + key.replace("_", "-"))
        if value is not True:
            parts.append(str(value))
    return shlex.join(parts)


def predict_records(
    records: list[Record],
    inputs: ModelInputs,
    infer: InferFn,
    params: DetectionParams,
    batch_size: int = 16,
    threads: int = 2,
) -> Predictions:
    """Run DICOM files through the service pipeline and a model; boxes come back in original pixels."""
    detections: list[Detections] = []
    probabilities: list[np.ndarray] = []
    headers: list[dict[str, str]] = []
    specs, detector_input = inputs.specs, inputs.index("detector")
    classifier_input = inputs.index("classifier")
    heatmaps: list[np.ndarray] = []
    geometries: list[Letterbox] = []
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(records), desc="evaluate") as progress:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prepared = list(pool.map(lambda r: prepare(r.path.read_bytes(), specs), chunk))
            batches = [np.stack([p.inputs[position] for p in prepared]) for position in range(len(specs))]
            # A pack with heatmaps returns them fourth (OnnxModels.run): kept for the heatmap section.
            outputs = infer(*batches)
            boxes, scores, probs = outputs[:3]
            if len(outputs) > 3:
                heatmaps += list(outputs[3])
            geometries += [p.geometries[classifier_input] for p in prepared]
            for i, item in enumerate(prepared):
                geometry = item.geometries[detector_input]
                detections.append(to_original_space(select_detections(boxes[i], scores[i], params), geometry))
                headers.append({key: str(item.header.get(key, "") or "") for key in HEADER_ATTRIBUTES})
            probabilities.append(probs)
            progress.update(len(chunk))
    return Predictions(
        [r.image_id for r in records],
        detections,
        np.concatenate(probabilities) if probabilities else np.zeros((0, 0)),
        headers,
        heatmaps if heatmaps and len(heatmaps) == len(records) else None,
        geometries,
    )


def evaluation_inputs(
    records: list[Record],
    predictions: Predictions,
    local_labels: list[str],
    global_labels: list[str],
    thresholds: dict[str, float],
    calibration: Calibration | None = None,
) -> EvaluationInputs:
    """Pair each record's CSV ground truth with its predictions; boxes of labels the detector lacks are left out.

    With `calibration`, the reported probabilities are the calibrated ones (as the service reports them)
    and the raw outputs are kept beside them.
    """
    local_index = {name: i for i, name in enumerate(local_labels)}
    images = []
    for record, found in zip(records, predictions.detections):
        gt = [box for box in record.boxes if box.label in local_index]
        images.append(
            ImageDetections(
                found.boxes,
                found.scores,
                found.classes,
                np.array([[b.x_min, b.y_min, b.x_max, b.y_max] for b in gt], dtype=np.float32).reshape(-1, 4),
                np.array([local_index[b.label] for b in gt], dtype=np.int64),
            )
        )
    targets = np.array(
        [[record.image_labels.get(label, 0) for label in global_labels] for record in records], dtype=np.int64
    ).reshape(len(records), len(global_labels))
    raw = np.asarray(predictions.probabilities, dtype=np.float64).reshape(len(records), len(global_labels))
    reported = calibration.calibrate_columns(global_labels, raw) if calibration is not None else raw
    return EvaluationInputs(
        images,
        targets,
        reported,
        list(local_labels),
        list(global_labels),
        dict(thresholds),
        raw_probabilities=raw,
        # The challenge's "No finding": no box of any label, trained or not.
        no_finding_truth=np.array([not record.boxes for record in records], dtype=bool),
        attributes=[subgroups.attributes_of(header) for header in predictions.headers],
    )


def no_finding_scores(inputs: EvaluationInputs) -> tuple[np.ndarray, str]:
    """Each image's "No finding" confidence for the challenge metric, and how it was obtained."""
    if NO_FINDING in inputs.global_labels:
        column = inputs.global_labels.index(NO_FINDING)
        return inputs.probabilities[:, column], "the classifier's No finding probability (as reported)"
    best = np.array([float(np.max(image.pred_scores, initial=0.0)) for image in inputs.images])
    return 1.0 - best, "1 - the image's highest finding score (the classifier has no No finding label)"


def detection_matches(inputs: EvaluationInputs) -> DetectionMatches:
    """Match every class at every reported IoU once: AP, its bootstrap and the PR curves all read these.

    "challenge" holds the VinBigData challenge's matches: VOC matching, local labels plus "No finding".
    """
    matches = {
        key: [class_matches(inputs.images, k, iou) for k in range(len(inputs.local_labels))]
        for key, iou in IOU_THRESHOLDS.items()
    }
    scored = with_no_finding_class(inputs.images, no_finding_scores(inputs)[0], inputs.normal, len(inputs.local_labels))
    matches["challenge"] = [
        class_matches(scored, k, CHALLENGE_IOU, matching="voc") for k in range(len(inputs.local_labels) + 1)
    ]
    return matches


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else None


def challenge_labels(inputs: EvaluationInputs) -> list[str]:
    return [*inputs.local_labels, NO_FINDING]


def bootstrap_samples(
    inputs: EvaluationInputs, matches: DetectionMatches, spec: BootstrapSpec
) -> dict[tuple[str, str | None], np.ndarray]:
    """Every metric in every resample: {(metric, label or None for a macro mean): (B,) values, NaN where undefined}.

    All metrics share each resample of images, so the macro means' intervals are of one resampled test set.
    """
    rng = np.random.default_rng(spec.seed)
    parts: dict[tuple[str, str | None], list[np.ndarray]] = {}

    def add(key: tuple[str, str | None], values: np.ndarray) -> None:
        parts.setdefault(key, []).append(values)

    with tqdm(total=spec.resamples, desc="bootstrap", unit="resample") as progress:
        for start in range(0, spec.resamples, spec.chunk):
            counts = resample_counts(len(inputs.images), min(spec.chunk, spec.resamples - start), rng)
            for key in IOU_THRESHOLDS:
                for label, class_match in zip(inputs.local_labels, matches[key]):
                    add((f"ap{key}", label), bootstrap_average_precision(class_match, counts))
            for label, class_match in zip(challenge_labels(inputs), matches["challenge"]):
                add(("challenge_ap", label), bootstrap_average_precision(class_match, counts))
            for k, label in enumerate(inputs.global_labels):
                targets, scores = inputs.targets[:, k], inputs.probabilities[:, k]
                add(("auroc", label), bootstrap_auroc(targets, scores, counts))
                for name, values in bootstrap_operating_point(
                    targets, scores, inputs.thresholds[label], counts
                ).items():
                    add((name, label), values)
            calibration = bootstrap_calibration(
                inputs.targets, inputs.raw, inputs.probabilities, inputs.global_labels, counts
            )
            for key, values in calibration.items():
                add(key, values)
            progress.update(len(counts))
    samples = {key: np.concatenate(values) for key, values in parts.items()}
    # Macro means per resample over the labels defined in that resample (as the point estimates are).
    for key in IOU_THRESHOLDS:
        samples[(f"map{key}", None)] = nan_mean_rows(
            np.stack([samples[(f"ap{key}", label)] for label in inputs.local_labels], axis=1)
        )
    samples[("challenge_map", None)] = nan_mean_rows(
        np.stack([samples[("challenge_ap", label)] for label in challenge_labels(inputs)], axis=1)
    )
    for name in ("auroc", *OPERATING_METRICS, *_calibration_keys()):
        samples[(f"mean_{name}", None)] = nan_mean_rows(
            np.stack([samples[(name, label)] for label in inputs.global_labels], axis=1)
        )
    return samples


def _calibration_keys() -> tuple[str, ...]:
    """ece_raw, ece, brier_raw, brier: each calibration metric before and after calibration."""
    return tuple(f"{metric}{suffix}" for metric in CALIBRATION_METRICS for suffix in ("_raw", ""))


Interval = Callable[..., dict | None]


def score(inputs: EvaluationInputs, matches: DetectionMatches, spec: BootstrapSpec = BootstrapSpec()) -> dict:
    """The report: point estimates on all images, each with a `<metric>_ci` interval (None without bootstrap)."""
    samples = bootstrap_samples(inputs, matches, spec) if spec.resamples > 0 and inputs.images else {}

    def ci(metric: str, label: str | None = None) -> dict | None:
        return percentile_interval(samples[(metric, label)], spec.confidence) if samples else None

    return {
        "images": len(inputs.images),
        "detection": detection_section(inputs, matches, ci),
        "challenge": challenge_section(inputs, matches, ci),
        "classification": classification_section(inputs, ci),
        "calibration": calibration_section(inputs, ci),
        "bootstrap": {
            "resamples": spec.resamples,
            "seed": spec.seed,
            "confidence": spec.confidence,
            "method": "images resampled with replacement; percentile intervals; a resample where a metric "
            "is undefined (no ground truth of a class, no positive or negative for a label) is "
            "skipped for that metric and valid_resamples counts the others",
        },
    }


def detection_section(inputs: EvaluationInputs, matches: DetectionMatches, ci: Interval) -> dict:
    per_class = {}
    for k, label in enumerate(inputs.local_labels):
        entry: dict = {"boxes": int(sum(int((image.gt_classes == k).sum()) for image in inputs.images))}
        for key in IOU_THRESHOLDS:
            entry[f"ap{key}"] = matches_average_precision(matches[key][k])
            entry[f"ap{key}_ci"] = ci(f"ap{key}", label)
        per_class[label] = entry
    detection: dict = {
        "matching": "COCO-style: each prediction, best score first, takes the best-overlapping unmatched "
        "ground-truth box of its class at IoU >= the threshold (pycocotools' rule); all-point interpolated AP",
        "names": {f"map{key}": name for key, name in MAP_NAMES.items()},
    }
    for key in IOU_THRESHOLDS:
        detection[f"map{key}"] = _mean_defined([entry[f"ap{key}"] for entry in per_class.values()])
        detection[f"map{key}_ci"] = ci(f"map{key}")
    detection["per_class"] = per_class
    return detection


def challenge_section(inputs: EvaluationInputs, matches: DetectionMatches, ci: Interval) -> dict:
    """The VinBigData challenge metric: VOC-devkit matching at IoU > 0.4 over the local labels and "No finding"."""
    per_class = {}
    normal = inputs.normal
    for k, label in enumerate(challenge_labels(inputs)):
        boxes = (
            int(normal.sum())
            if label == NO_FINDING
            else int(sum(int((i.gt_classes == k).sum()) for i in inputs.images))
        )
        per_class[label] = {"boxes": boxes, "ap": matches_average_precision(matches["challenge"][k])}
        per_class[label]["ap_ci"] = ci("challenge_ap", label)
    return {
        "name": CHALLENGE_NAME,
        "matching": "VOC devkit (voc_eval): each prediction, best score first, takes the ground-truth box of its "
        "class it overlaps most among all boxes; a hit when IoU > 0.4 and the box is free, otherwise a false "
        "positive; IoU with the devkit's +1 pixel convention; all-point interpolated AP",
        "no_finding": "one [0, 0, 1, 1] box per image scored by " + no_finding_scores(inputs)[1] + "; ground truth "
        "[0, 0, 1, 1] on every image without any box",
        "map40": _mean_defined([entry["ap"] for entry in per_class.values()]),
        "map40_ci": ci("challenge_map"),
        "per_class": per_class,
    }


def classification_section(inputs: EvaluationInputs, ci: Interval) -> dict:
    per_label = {}
    for k, label in enumerate(inputs.global_labels):
        targets, scores, threshold = inputs.targets[:, k], inputs.probabilities[:, k], inputs.thresholds[label]
        entry = {
            "auroc": auroc(targets, scores),
            "auroc_ci": ci("auroc", label),
            "positives": int(targets.sum()),
            "threshold": threshold,
        }
        for name, value in operating_point(targets, scores, threshold).items():
            entry[name], entry[f"{name}_ci"] = value, ci(name, label)
        per_label[label] = entry
    classification: dict = {}
    for name in ("auroc", *OPERATING_METRICS):
        classification[f"mean_{name}"] = _mean_defined([entry[name] for entry in per_label.values()])
        classification[f"mean_{name}_ci"] = ci(f"mean_{name}")
    classification["per_label"] = per_label
    return classification


def calibration_section(inputs: EvaluationInputs, ci: Interval) -> dict:
    """ECE and Brier of the raw outputs and of the reported (calibrated) probabilities, per label and macro."""
    per_label = calibration_point_estimates(inputs.targets, inputs.raw, inputs.probabilities, inputs.global_labels)
    for label, entry in per_label.items():
        for key in _calibration_keys():
            entry[f"{key}_ci"] = ci(key, label)
    section: dict = {
        "calibrated": inputs.raw_probabilities is not None
        and not np.array_equal(inputs.raw_probabilities, inputs.probabilities),
        "bins": CALIBRATION_BINS,
        "ece": f"expected calibration error over {CALIBRATION_BINS} equal-width probability bins",
    }
    for key in _calibration_keys():
        section[f"mean_{key}"] = _mean_defined([entry[key] for entry in per_label.values()])
        section[f"mean_{key}_ci"] = ci(f"mean_{key}")
    section["per_label"] = per_label
    return section


# Each subgroup metric's name -> where score() puts it (its interval is the same key + "_ci").
SUBGROUP_METRICS = {
    "mean_auroc": ("classification", "mean_auroc"),
    "map40": ("detection", "map40"),
    "challenge_map40": ("challenge", "map40"),
    "mean_ece": ("calibration", "mean_ece"),
    "mean_brier": ("calibration", "mean_brier"),
}


def subgroup_section(inputs: EvaluationInputs, spec: BootstrapSpec, overall: dict) -> dict:
    """The headline metrics per subgroup with intervals and flags (training/subgroups.py)."""
    reference = {"mean_auroc": overall["classification"]["mean_auroc"], "map40": overall["detection"]["map40"]}
    entries = []
    for (attribute, value), indices in subgroups.groups(inputs.attributes).items():
        part = inputs.subset(indices)
        scores = score(part, detection_matches(part), spec)
        metrics = {name: scores[section][key] for name, (section, key) in SUBGROUP_METRICS.items()}
        intervals = {name: scores[section][f"{key}_ci"] for name, (section, key) in SUBGROUP_METRICS.items()}
        entries.append(
            {"attribute": attribute, "value": value, "images": len(indices)}
            | {name: metrics[name] for name in metrics}
            | {f"{name}_ci": intervals[name] for name in intervals}
            | {
                "positives": {label: int(part.targets[:, k].sum()) for k, label in enumerate(part.global_labels)},
                "boxes": int(sum(len(image.gt_classes) for image in part.images)),
                "flags": subgroups.flags(len(indices), metrics, intervals, reference),
            }
        )
    return {
        "attributes": list(subgroups.ATTRIBUTES),
        "age_bands": [name for name, _, _ in subgroups.AGE_BANDS],
        "rule": f"flags: 'insufficient data' below {subgroups.MIN_IMAGES} images or where a metric is undefined; "
        f"'possibly worse' when the CI's lower bound is more than {subgroups.MARGIN} below the overall value; "
        "'worse' when the CI's upper bound is below it (macro AUROC and mAP@0.4, COCO-style)",
        "overall": reference,
        "groups": entries,
    }


# ---- report writers ---------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _with_ci(value: float | None, interval: dict | None) -> str:
    if value is None or interval is None or interval["low"] is None:
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(interval['low'])}, {_fmt(interval['high'])}]"


def _short_of_resamples(report: dict) -> list[str]:
    """'metric of label: n of B' for every interval built from fewer than all resamples."""
    resamples = report["bootstrap"]["resamples"]
    notes = []
    sections = [("", report["detection"]), ("", report["classification"])]
    sections += [(f" of {label}", entry) for label, entry in report["detection"]["per_class"].items()]
    sections += [(f" of {label}", entry) for label, entry in report["classification"]["per_label"].items()]
    if "challenge" in report:
        sections += [(" (challenge)", report["challenge"])]
        sections += [(f" of {label} (challenge)", entry) for label, entry in report["challenge"]["per_class"].items()]
    for suffix, entry in sections:
        for key, interval in entry.items():
            if key.endswith("_ci") and interval is not None and interval["valid_resamples"] < resamples:
                notes.append(f"{key[:-3]}{suffix}: {interval['valid_resamples']} of {resamples}")
    return notes


def markdown_report(report: dict, title: str) -> str:
    """Tables of every metric as `value [low, high]`, with how they were produced."""
    bootstrap = report["bootstrap"]
    stem = report_stem(report.get("split", "test"), (report.get("runtime") or {}).get("precision", "fp32"))
    lines = [f"# {title}", "", f"{report['images']} images."]
    if "command" in report:
        lines += ["", f"Command: `{report['command']}`"]
    if "runtime" in report:
        lines += ["", f"Ran on: {report['runtime']['provider']}, {report['runtime']['precision']} weights."]
    if report.get("independence"):
        lines += ["", report["independence"]["statement"]]
    if bootstrap["resamples"]:
        lines += [
            "",
            f"Intervals: {100 * bootstrap['confidence']:g}% percentile bootstrap, {bootstrap['resamples']} resamples "
            f"of the images with replacement (seed {bootstrap['seed']}), shown as `value [low, high]`.",
        ]
    lines += _detection_section(report["detection"], stem)
    if "challenge" in report:
        lines += _challenge_section(report["challenge"])
    lines += _classification_section(report["classification"], stem, report.get("thresholds_method"))
    lines += baselines.markdown_section(report.get("baseline"))
    lines += triage_markdown(report.get("triage"))
    lines += heatmaps_markdown(report.get("heatmaps"))
    if "calibration" in report:
        lines += _calibration_section(report["calibration"], stem)
    if report.get("subgroups"):
        lines += _subgroup_section(report["subgroups"])
    short = _short_of_resamples(report) if bootstrap["resamples"] else []
    if short:
        lines += [
            "",
            "Resamples where a metric was undefined were skipped for it; valid resamples: " + "; ".join(short) + ".",
        ]
    return "\n".join(lines) + "\n"


def _detection_section(detection: dict, stem: str) -> list[str]:
    lines = [
        "",
        "## Detection",
        "",
        "Average precision per class with all-point (PASCAL VOC 2010+) interpolation, every box the detector "
        "keeps, in original pixels, matched COCO-style (each prediction takes the best-overlapping *unmatched* box "
        "of its class, as pycocotools does). Means over classes with ground truth. The VinBigData challenge's own "
        "metric differs (next section).",
        "",
        "| metric | value |",
        "| --- | ---: |",
        f"| {MAP_NAMES['40']} | {_with_ci(detection['map40'], detection.get('map40_ci'))} |",
        f"| {MAP_NAMES['50']} | {_with_ci(detection['map50'], detection.get('map50_ci'))} |",
        "",
        "| local label | boxes | AP@0.4 | AP@0.5 |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {label} | {v['boxes']} | {_with_ci(v['ap40'], v.get('ap40_ci'))} | "
        f"{_with_ci(v['ap50'], v.get('ap50_ci'))} |"
        for label, v in detection["per_class"].items()
    ]
    return [*lines, "", f"![Precision-recall curves at IoU 0.4](pr_curves_{stem}.png)"]


def _challenge_section(challenge: dict) -> list[str]:
    lines = [
        "",
        f"## {challenge['name']}",
        "",
        f"Matching: {challenge['matching']}. No finding: {challenge['no_finding']}.",
        "",
        "| metric | value |",
        "| --- | ---: |",
        f"| {challenge['name']} | {_with_ci(challenge['map40'], challenge.get('map40_ci'))} |",
        "",
        "| class | boxes | AP |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| {label} | {v['boxes']} | {_with_ci(v['ap'], v.get('ap_ci'))} |"
        for label, v in challenge["per_class"].items()
    ]
    return lines


def _calibration_section(calibration: dict, stem: str) -> list[str]:
    state = (
        "The reported probabilities are the calibrated ones (the pack's calibrators, fitted on a validation split); "
        "'raw' is the classifier's output before calibration."
        if calibration["calibrated"]
        else "These probabilities are NOT calibrated (the source has no calibrators): raw and reported are the same."
    )
    lines = [
        "",
        "## Calibration",
        "",
        f"{state} ECE: {calibration['ece']}; Brier: mean squared error of the probability. Lower is better for both. "
        "ECE is biased upwards on finite samples, and more so in bootstrap resamples (which repeat images), so its "
        "interval can lie above the point estimate; compare raw and calibrated ECE with each other, and read the "
        "Brier interval (an unbiased mean) for uncertainty.",
        "",
        "| | ECE | Brier |",
        "| --- | ---: | ---: |",
        f"| macro mean, raw | {_with_ci(calibration['mean_ece_raw'], calibration.get('mean_ece_raw_ci'))} | "
        f"{_with_ci(calibration['mean_brier_raw'], calibration.get('mean_brier_raw_ci'))} |",
        f"| macro mean, as reported | {_with_ci(calibration['mean_ece'], calibration.get('mean_ece_ci'))} | "
        f"{_with_ci(calibration['mean_brier'], calibration.get('mean_brier_ci'))} |",
        "",
        "| global label | positives | ECE raw | ECE reported | Brier raw | Brier reported |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {label} | {v['positives']} | "
        + " | ".join(_with_ci(v[key], v.get(f"{key}_ci")) for key in ("ece_raw", "ece", "brier_raw", "brier"))
        + " |"
        for label, v in calibration["per_label"].items()
    ]
    return [*lines, "", f"![Reliability diagrams before and after calibration](reliability_{stem}.png)"]


def _subgroup_section(section: dict) -> list[str]:
    lines = [
        "",
        "## Subgroups",
        "",
        "From the DICOM headers (age band, sex, view, manufacturer, modality); each group's intervals resample its "
        f"own images. Flags — {section['rule']}.",
        "",
        "| attribute | group | images | macro AUROC | mAP@0.4 (COCO-style) | challenge mAP@0.4 | mean ECE | flags |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [
        f"| {g['attribute']} | {g['value']} | {g['images']} | {_with_ci(g['mean_auroc'], g.get('mean_auroc_ci'))} | "
        f"{_with_ci(g['map40'], g.get('map40_ci'))} | {_with_ci(g['challenge_map40'], g.get('challenge_map40_ci'))} | "
        f"{_with_ci(g['mean_ece'], g.get('mean_ece_ci'))} | {'; '.join(g['flags']) or '—'} |"
        for g in section["groups"]
    ]
    return lines


def _classification_section(classification: dict, stem: str, thresholds_method: str | None) -> list[str]:
    method = f" (thresholds.json: {thresholds_method})" if thresholds_method else ""
    lines = [
        "",
        "## Classification",
        "",
        "Sensitivity, specificity and F1 at each label's threshold: the pack's or run's operating point, chosen on "
        f"validation data{method}. "
        f"Macro means over the model's {len(classification['per_label'])} trained labels, each over the labels where "
        "the metric is defined.",
        "",
        "| macro mean | AUROC | sensitivity | specificity | F1 |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| trained labels | "
        + " | ".join(
            _with_ci(classification[f"mean_{name}"], classification.get(f"mean_{name}_ci"))
            for name in ("auroc", *OPERATING_METRICS)
        )
        + " |",
        "",
        "| global label | positives | threshold | AUROC | sensitivity | specificity | F1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {label} | {v['positives']} | {_fmt(v['threshold'])} | "
        + " | ".join(_with_ci(v[name], v.get(f"{name}_ci")) for name in ("auroc", *OPERATING_METRICS))
        + " |"
        for label, v in classification["per_label"].items()
    ]
    return [*lines, "", f"![ROC curves with the operating points](roc_curves_{stem}.png)"]


def _grid(count: int, columns: int = 4):  # -> (Figure, list[Axes])
    from matplotlib.figure import Figure  # Figure + Agg canvas: no pyplot global state, safe off the main thread

    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(3.4 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[count:]:
        extra.set_axis_off()
    return figure, axes[:count]


def _save(figure, path: Path) -> Path:
    return save_png(figure, path)


def plot_pr_curves(matches: list[ClassMatches], labels: list[str], path: Path, iou_threshold: float = 0.4) -> Path:
    """Per-class detection precision-recall curves (raw and interpolated) with their AP."""
    figure, axes = _grid(len(labels))
    for axis, label, class_match in zip(axes, labels, matches):
        axis.set_title("\n".join(textwrap.wrap(label, 30)), fontsize=9)
        axis.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ap = matches_average_precision(class_match)
        if ap is None:
            axis.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=axis.transAxes)
            continue
        recall, precision = precision_recall(class_match.hits, class_match.num_gt)
        recall, precision = (
            np.concatenate([[0.0], recall]),
            np.concatenate([[precision[0] if len(precision) else 0.0], precision]),
        )
        axis.plot(recall, precision, color="0.7", linewidth=1, label="raw")
        # The envelope ends at the last hit: misses after it add no recall and no area.
        end = int(np.argmax(recall)) + 1
        axis.step(
            recall[:end],
            precision_envelope(precision)[:end],
            where="pre",
            linewidth=1.5,
            label=f"AP@{iou_threshold:g} = {ap:.3f}",
        )
        axis.legend(loc="lower left", fontsize=8)
    figure.suptitle(f"Detection precision-recall at IoU {iou_threshold:g} (grey: raw, blue: interpolated)")
    return _save(figure, path)


def plot_roc_curves(inputs: EvaluationInputs, path: Path) -> Path:
    """Per-label ROC curves with the operating point at the label's threshold."""
    figure, axes = _grid(len(inputs.global_labels))
    for k, (axis, label) in enumerate(zip(axes, inputs.global_labels)):
        axis.set_title("\n".join(textwrap.wrap(label, 30)), fontsize=9)
        axis.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="1 - specificity", ylabel="sensitivity")
        axis.plot([0, 1], [0, 1], linestyle=":", color="0.6", linewidth=1)
        targets, scores = inputs.targets[:, k], inputs.probabilities[:, k]
        curve = roc_curve(targets, scores)
        if curve is None:
            axis.text(0.5, 0.5, "positives or negatives missing", ha="center", va="center", transform=axis.transAxes)
            continue
        false_positive_rate, true_positive_rate, _ = curve
        axis.plot(false_positive_rate, true_positive_rate, linewidth=1.5, label=f"AUROC = {auroc(targets, scores):.3f}")
        point = operating_point(targets, scores, inputs.thresholds[label])
        axis.plot(
            1 - point["specificity"],
            point["sensitivity"],
            "o",
            color="tab:red",
            label=f"threshold {inputs.thresholds[label]:.3f}",
        )
        axis.legend(loc="lower right", fontsize=8)
    figure.suptitle("Classification ROC curves (dot: operating point)")
    return _save(figure, path)


def report_stem(split: str, precision: str = "fp32") -> str:
    """The name every file of one report shares: the split, plus the precision when it is not float32."""
    return split if precision == "fp32" else f"{split}.{precision}"


def write_outputs(
    out: Path, split: str, report: dict, inputs: EvaluationInputs, matches: DetectionMatches, title: str
) -> list[Path]:
    """evaluation_<stem>.json and .md, pr_curves_<stem>.png, roc_curves_<stem>.png and reliability_<stem>.png in `out`
    (stem: the split, with ".fp16" for a float16 evaluation)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(split, (report.get("runtime") or {}).get("precision", "fp32"))
    json_path, markdown_path = out / f"evaluation_{stem}.json", out / f"evaluation_{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    markdown_path.write_text(markdown_report(report, title))
    return [
        json_path,
        markdown_path,
        plot_pr_curves(matches["40"], inputs.local_labels, out / f"pr_curves_{stem}.png", IOU_THRESHOLDS["40"]),
        plot_roc_curves(inputs, out / f"roc_curves_{stem}.png"),
        plot_reliability(
            inputs.targets,
            inputs.raw,
            inputs.probabilities,
            inputs.global_labels,
            out / f"reliability_{stem}.png",
            f"{split} split, {len(inputs.images)} images: raw (grey) and as reported (blue)",
        ),
    ]


def thresholds_method(folder: Path, manifest: dict | None = None) -> str | None:
    """How the disease thresholds were chosen: the pack manifest's, a run's calibration.json, or its thresholds.json."""
    if manifest is not None:
        return manifest["classifier"].get("threshold_method")
    calibration = read_run_calibration(folder)
    if calibration is not None:
        return calibration.get("threshold_method")
    path = folder / "thresholds.json"
    return json.loads(path.read_text()).get("method") if path.exists() else None


@dataclass
class Source:
    """What is evaluated: how to run it, its labels, operating points and calibrators, and what it was fitted on."""

    infer: InferFn
    inputs: ModelInputs
    params: DetectionParams
    local_labels: list[str]
    global_labels: list[str]
    thresholds: dict[str, float]
    calibration: Calibration | None
    runtime: dict
    description: str
    folder: Path
    fitted: dict[str, list[str]]  # role -> image ids the models or their calibration were fitted on
    pack: ModelPack | None = None
    triage_threshold: float | None = None  # the triage operating point (training/triage.py), if any
    grid: HeatmapGrid | None = None  # where the classifier's heatmap cells lie, for a pack that has them


def torch_infer_from_run(
    run: Path,
) -> tuple[InferFn, ModelInputs, list[str], list[str], dict[str, float], DetectionParams]:
    """PyTorch inference from a run's checkpoint, and its labels and disease thresholds (calibration.json's when
    the run was calibrated, else the training's thresholds.json)."""
    import torch

    from training.engine import predict
    from training.export import checkpoint_inputs, load_run, model_images

    checkpoint, detector, classifier = load_run(run)
    inputs = checkpoint_inputs(checkpoint)
    calibrated = read_run_calibration(run)
    thresholds = (calibrated or json.loads((run / "thresholds.json").read_text()))["thresholds"]

    def infer(*batches: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return predict(detector, classifier, *model_images(inputs, batches), torch.device("cpu"))

    return infer, inputs, checkpoint["local_labels"], checkpoint["global_labels"], thresholds, DetectionParams()


def run_calibration(run: Path, global_labels: list[str]) -> Calibration | None:
    """A run's calibrators (training.calibrate --run), or None when it has not been calibrated."""
    calibrated = read_run_calibration(run)
    return Calibration.from_manifest(calibrated, required=global_labels) if calibrated else None


def open_pack(
    path: Path,
    precision: str,
    providers: tuple[str, ...] | list[str] = ("CUDAExecutionProvider", "CPUExecutionProvider"),
    require_calibration: bool = True,
) -> Source:
    """A pack run with ONNX Runtime as served; `require_calibration=False` opens one not calibrated yet
    (training.calibrate), whose `calibration` is then None."""
    pack = ModelPack.load(path, require_calibration=require_calibration)
    settings = Settings(models=path, precision=precision, providers=list(providers))
    models = OnnxModels(pack, settings=settings)
    maps = pack.heatmaps
    return Source(
        models.run,
        pack.model_inputs,
        pack.detection_params,
        pack.local_labels,
        pack.global_labels,
        pack.thresholds,
        pack.calibration if require_calibration or "calibration" in pack.manifest else None,
        {"provider": models.runtime.provider, "precision": models.runtime.precision},
        f"pack {pack.name} {pack.version}",
        Path(path),
        read_splits(Path(path) / PACK_SPLITS_FILE),
        pack,
        pack.triage.threshold if pack.triage is not None else None,
        HeatmapGrid.from_manifest(maps, pack.model_inputs.classifier.size, maps["shape"][-1]) if maps else None,
    )


def open_run(path: Path) -> Source:
    infer, inputs, local_labels, global_labels, thresholds, params = torch_infer_from_run(path)
    fitted = read_splits(Path(path) / RUN_SPLITS_FILE)
    calibrated = read_run_calibration(path)
    if calibrated:
        fitted["calibration"] = list(calibrated.get("calibration_image_ids") or [])
    # The run's triage point: chosen with its calibration when it has one, else on its raw validation outputs.
    chosen = calibrated or json.loads((Path(path) / "thresholds.json").read_text())
    return Source(
        infer,
        inputs,
        params,
        local_labels,
        global_labels,
        thresholds,
        run_calibration(path, global_labels),
        {"provider": "PyTorch", "precision": "fp32"},
        f"run {path}",
        Path(path),
        fitted,
        triage_threshold=(chosen.get("triage") or {}).get("threshold"),
        grid=None,  # a run's PyTorch outputs have no heatmaps; its exported pack does
    )


def independence(image_ids: list[str], source: Source, allow_seen: bool) -> dict:
    """Whether the split is independent of what the source was fitted on; refuses (SystemExit) unless allowed."""
    shared = overlap(image_ids, source.fitted)
    checked = sorted(fitted_ids(source.fitted))
    if not shared:
        statement = (
            f"Independent: none of these images is among the {', '.join(checked)} images the models and their "
            "calibration were fitted on."
            if checked
            else "Independence could not be checked: the source records no training, validation or calibration ids."
        )
        return {"independent": bool(checked), "checked_roles": checked, "statement": statement}
    roles = ", ".join(f"{count} {role}" for role, count in shared.items())
    if not allow_seen:
        raise SystemExit(
            f"error: the split shares images with what {source.description} was fitted on ({roles}); evaluate on a "
            "split it has never seen (a fresh --seed for phantoms), or pass --allow-seen-images for a report marked "
            "as not independent"
        )
    return {
        "independent": False,
        "checked_roles": checked,
        "shared": shared,
        "statement": f"NOT AN INDEPENDENT EVALUATION: the split shares images with what the source was fitted on "
        f"({roles}).",
    }


def main(args: argparse.Namespace) -> dict:
    if args.record and args.pack is None:
        raise SystemExit("error: --record writes into a pack's manifest; evaluate a --pack")
    if args.record and args.allow_seen_images:
        raise SystemExit("error: --record needs an independent test split; drop --allow-seen-images")
    source = open_pack(args.pack, args.precision) if args.pack is not None else open_run(args.run)
    out = args.out or source.folder
    records = read_split(args.data, args.split, args.layout, fusion_from_args(args))[: args.limit]
    image_ids = [record.image_id for record in records]
    independent = independence(image_ids, source, args.allow_seen_images)
    if args.record:
        from training.acceptance import check_acceptance_split

        check_acceptance_split(source.pack.manifest, image_ids)
    started = time.perf_counter()
    predictions = predict_records(records, source.inputs, source.infer, source.params, args.batch_size, args.threads)
    inference_seconds = time.perf_counter() - started
    inputs = evaluation_inputs(
        records, predictions, source.local_labels, source.global_labels, source.thresholds, source.calibration
    )
    started = time.perf_counter()
    matches = detection_matches(inputs)
    spec = BootstrapSpec(args.bootstrap, args.seed, args.confidence)
    scores = score(inputs, matches, spec)
    report = {
        "source": source.description,
        "data": str(args.data),
        "split": args.split,
        "dataset": dataset_provenance(args.data, args.split) | split_record(image_ids),
        "independence": independent,
        "command": command_line(args),
        "thresholds_method": thresholds_method(source.folder, source.pack.manifest if source.pack else None),
        "runtime": source.runtime,
    } | scores
    report["subgroups"] = subgroup_section(inputs, spec, scores)
    if args.baseline:
        report["baseline"] = baselines.evaluation_section(
            args.data,
            args.split,
            args.layout,
            fusion_from_args(args),
            records,
            source.global_labels,
            inputs.probabilities,
            (args.bootstrap, args.seed, args.confidence),
            args.cache,
            args.threads,
        )
    bootstrap = (args.bootstrap, args.seed, args.confidence)
    report["triage"] = triage_evaluation(
        inputs.targets, inputs.probabilities, source.global_labels, source.triage_threshold, *bootstrap
    )
    if predictions.heatmaps is not None and source.grid is not None:
        report["heatmaps"] = peak_in_box(
            records, predictions.heatmaps, predictions.geometries, source.global_labels, source.grid
        )
    report["seconds"] = {"inference": round(inference_seconds, 1), "metrics": round(time.perf_counter() - started, 1)}
    title = f"Evaluation of {source.description} on {args.data.name}/{args.split}"
    written = write_outputs(out, args.split, report, inputs, matches, title)
    if args.record:
        from training.acceptance import record_evaluation

        written.append(record_evaluation(args.pack, report, written[0].name))
    print(markdown_report(report, title))
    print("wrote " + ", ".join(str(path) for path in written))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
