"""Evaluate a model pack (ONNX, as served) or a training run (PyTorch) on a dataset split.

    python -m training.evaluate --data data/synthetic --split test --pack models/demo-synthetic

Every image goes through the service's own pipeline (DICOM bytes -> `service.dicom.pipeline.prepare`
-> model -> `service.inference.postprocess`), and boxes are scored in the original image's pixel space
against the CSV annotations. Reports detection mAP@0.4 (the VinBigData challenge metric), mAP@0.5
and per-class AP, and per-label AUROC with sensitivity / specificity / F1 at the pack's thresholds
(chosen on validation data), plus macro means over the model's labels. Every metric comes with a
percentile bootstrap confidence interval (--bootstrap resamples of the images, --seed).
Writes into --out (default: the pack or run folder): evaluation_<split>.json and .md,
pr_curves_<split>.png (detection precision-recall at IoU 0.4) and roc_curves_<split>.png.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.dicom.pipeline import ModelInputs, prepare
from service.dicom.preprocess import Letterbox
from service.inference.heatmaps import HeatmapGrid
from service.inference.modelpack import ModelPack, OnnxModels
from service.inference.postprocess import DetectionParams, Detections, select_detections, to_original_space
from service.settings import Settings
from training import baselines
from training.data import Record, add_layout_arguments, fusion_from_args, read_split
from training.heatmap_eval import markdown_section as heatmaps_markdown
from training.heatmap_eval import peak_in_box
from training.metrics import (
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
)
from training.triage import markdown_section as triage_markdown
from training.triage import triage_evaluation

# One stacked (N, 1, S, S) batch per distinct input of the models -> boxes, scores, probabilities.
InferFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]

# Report key suffix -> IoU threshold. 0.4 is the VinBigData challenge metric; 0.5 the usual VOC one.
IOU_THRESHOLDS = {"40": 0.4, "50": 0.5}
OPERATING_METRICS = ("sensitivity", "specificity", "f1")


@dataclass
class Predictions:
    image_ids: list[str]
    detections: list[Detections]  # original pixel space
    probabilities: np.ndarray  # N x K
    heatmaps: list[np.ndarray] | None = None  # per image (K, h, w), when the model returns them
    geometries: list[Letterbox] | None = None  # per image: where the classifier's input lies on the original


@dataclass(frozen=True)
class EvaluationInputs:
    """What the metrics need, as arrays: per-image detections vs ground truth, per-label probabilities vs targets."""

    images: list[ImageDetections]  # original pixel space
    targets: np.ndarray  # (N, K) 0/1 image labels, columns in global_labels order
    probabilities: np.ndarray  # (N, K)
    local_labels: list[str]
    global_labels: list[str]
    thresholds: dict[str, float]  # per global label, chosen on validation data


@dataclass(frozen=True)
class BootstrapSpec:
    resamples: int = 1000  # 0: no intervals
    seed: int = 0
    confidence: float = 0.95
    # Resamples per vectorised step: memory is about chunk x (predictions of one class) x 8 bytes x a few.
    chunk: int = 50


DetectionMatches = dict[str, list[ClassMatches]]  # IoU key ("40", "50") -> one entry per local label


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=("train", "test"))
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
        help="pack variant to evaluate (auto: what the service would serve here, fp16 on a GPU)",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="report a ridge regression on 48x48 thumbnails, fitted on the dataset's train split, beside the "
        "classifier (training/baselines.py)",
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
            probabilities.append(probs)
            progress.update(len(chunk))
    return Predictions(
        [r.image_id for r in records],
        detections,
        np.concatenate(probabilities) if probabilities else np.zeros((0, 0)),
        heatmaps if heatmaps and len(heatmaps) == len(records) else None,
        geometries,
    )


def evaluation_inputs(
    records: list[Record],
    predictions: Predictions,
    local_labels: list[str],
    global_labels: list[str],
    thresholds: dict[str, float],
) -> EvaluationInputs:
    """Pair each record's CSV ground truth with its predictions; boxes of labels the detector lacks are left out."""
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
    probabilities = np.asarray(predictions.probabilities, dtype=np.float64).reshape(len(records), len(global_labels))
    return EvaluationInputs(images, targets, probabilities, list(local_labels), list(global_labels), dict(thresholds))


def detection_matches(inputs: EvaluationInputs) -> DetectionMatches:
    """Match every class at every reported IoU once: AP, its bootstrap and the PR curves all read these."""
    return {
        key: [class_matches(inputs.images, k, iou) for k in range(len(inputs.local_labels))]
        for key, iou in IOU_THRESHOLDS.items()
    }


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else None


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
            for key, per_class in matches.items():
                for label, class_match in zip(inputs.local_labels, per_class):
                    add((f"ap{key}", label), bootstrap_average_precision(class_match, counts))
            for k, label in enumerate(inputs.global_labels):
                targets, scores = inputs.targets[:, k], inputs.probabilities[:, k]
                add(("auroc", label), bootstrap_auroc(targets, scores, counts))
                for name, values in bootstrap_operating_point(
                    targets, scores, inputs.thresholds[label], counts
                ).items():
                    add((name, label), values)
            progress.update(len(counts))
    samples = {key: np.concatenate(values) for key, values in parts.items()}
    # Macro means per resample over the labels defined in that resample (as the point estimates are).
    for key in IOU_THRESHOLDS:
        samples[(f"map{key}", None)] = nan_mean_rows(
            np.stack([samples[(f"ap{key}", label)] for label in inputs.local_labels], axis=1)
        )
    for name in ("auroc", *OPERATING_METRICS):
        samples[(f"mean_{name}", None)] = nan_mean_rows(
            np.stack([samples[(name, label)] for label in inputs.global_labels], axis=1)
        )
    return samples


def score(inputs: EvaluationInputs, matches: DetectionMatches, spec: BootstrapSpec = BootstrapSpec()) -> dict:
    """The report: point estimates on all images, each with a `<metric>_ci` interval (None without bootstrap)."""
    samples = bootstrap_samples(inputs, matches, spec) if spec.resamples > 0 and inputs.images else {}

    def ci(metric: str, label: str | None = None) -> dict | None:
        return percentile_interval(samples[(metric, label)], spec.confidence) if samples else None

    per_class = {}
    for k, label in enumerate(inputs.local_labels):
        entry: dict = {"boxes": int(sum(int((image.gt_classes == k).sum()) for image in inputs.images))}
        for key in IOU_THRESHOLDS:
            entry[f"ap{key}"] = matches_average_precision(matches[key][k])
            entry[f"ap{key}_ci"] = ci(f"ap{key}", label)
        per_class[label] = entry
    detection: dict = {}
    for key in IOU_THRESHOLDS:
        detection[f"map{key}"] = _mean_defined([entry[f"ap{key}"] for entry in per_class.values()])
        detection[f"map{key}_ci"] = ci(f"map{key}")
    detection["per_class"] = per_class

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

    return {
        "images": len(inputs.images),
        "detection": detection,
        "classification": classification,
        "bootstrap": {
            "resamples": spec.resamples,
            "seed": spec.seed,
            "confidence": spec.confidence,
            "method": "images resampled with replacement; percentile intervals; a resample where a metric "
            "is undefined (no ground truth of a class, no positive or negative for a label) is "
            "skipped for that metric and valid_resamples counts the others",
        },
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
    for suffix, entry in sections:
        for key, interval in entry.items():
            if key.endswith("_ci") and interval is not None and interval["valid_resamples"] < resamples:
                notes.append(f"{key[:-3]}{suffix}: {interval['valid_resamples']} of {resamples}")
    return notes


def markdown_report(report: dict, title: str) -> str:
    """Tables of every metric as `value [low, high]`, with how they were produced."""
    bootstrap = report["bootstrap"]
    split = report.get("split", "test")
    lines = [f"# {title}", "", f"{report['images']} images."]
    if "command" in report:
        lines += ["", f"Command: `{report['command']}`"]
    if "runtime" in report:
        lines += ["", f"Ran on: {report['runtime']['provider']}, {report['runtime']['precision']} weights."]
    if bootstrap["resamples"]:
        lines += [
            "",
            f"Intervals: {100 * bootstrap['confidence']:g}% percentile bootstrap, {bootstrap['resamples']} resamples "
            f"of the images with replacement (seed {bootstrap['seed']}), shown as `value [low, high]`.",
        ]
    lines += _detection_section(report["detection"], split)
    lines += _classification_section(report["classification"], split, report.get("thresholds_method"))
    lines += baselines.markdown_section(report.get("baseline"))
    lines += triage_markdown(report.get("triage"))
    lines += heatmaps_markdown(report.get("heatmaps"))
    short = _short_of_resamples(report) if bootstrap["resamples"] else []
    if short:
        lines += [
            "",
            "Resamples where a metric was undefined were skipped for it; valid resamples: " + "; ".join(short) + ".",
        ]
    return "\n".join(lines) + "\n"


def _detection_section(detection: dict, split: str) -> list[str]:
    lines = [
        "",
        "## Detection",
        "",
        "Average precision per class with all-point (PASCAL VOC 2010+) interpolation, every box the detector "
        "keeps, in original pixels; mAP@0.4 is the VinBigData challenge metric. Means over classes with ground truth.",
        "",
        "| metric | value |",
        "| --- | ---: |",
        f"| mAP@0.4 | {_with_ci(detection['map40'], detection.get('map40_ci'))} |",
        f"| mAP@0.5 | {_with_ci(detection['map50'], detection.get('map50_ci'))} |",
        "",
        "| local label | boxes | AP@0.4 | AP@0.5 |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {label} | {v['boxes']} | {_with_ci(v['ap40'], v.get('ap40_ci'))} | "
        f"{_with_ci(v['ap50'], v.get('ap50_ci'))} |"
        for label, v in detection["per_class"].items()
    ]
    return [*lines, "", f"![Precision-recall curves at IoU 0.4](pr_curves_{split}.png)"]


def _classification_section(classification: dict, split: str, thresholds_method: str | None) -> list[str]:
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
    return [*lines, "", f"![ROC curves with the operating points](roc_curves_{split}.png)"]


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
    return path


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


def write_outputs(
    out: Path, split: str, report: dict, inputs: EvaluationInputs, matches: DetectionMatches, title: str
) -> list[Path]:
    """evaluation_<split>.json and .md, pr_curves_<split>.png and roc_curves_<split>.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / f"evaluation_{split}.json", out / f"evaluation_{split}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    markdown_path.write_text(markdown_report(report, title))
    return [
        json_path,
        markdown_path,
        plot_pr_curves(matches["40"], inputs.local_labels, out / f"pr_curves_{split}.png", IOU_THRESHOLDS["40"]),
        plot_roc_curves(inputs, out / f"roc_curves_{split}.png"),
    ]


def thresholds_method(folder: Path) -> str | None:
    """How the shipped thresholds were chosen, from the folder's thresholds.json (None when absent)."""
    path = folder / "thresholds.json"
    return json.loads(path.read_text()).get("method") if path.exists() else None


def torch_infer_from_run(
    run: Path,
) -> tuple[InferFn, ModelInputs, list[str], list[str], dict[str, float], DetectionParams]:
    import torch

    from training.engine import predict
    from training.export import checkpoint_inputs, load_run, model_images

    checkpoint, detector, classifier = load_run(run)
    inputs = checkpoint_inputs(checkpoint)
    thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]

    def infer(*batches: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return predict(detector, classifier, *model_images(inputs, batches), torch.device("cpu"))

    return infer, inputs, checkpoint["local_labels"], checkpoint["global_labels"], thresholds, DetectionParams()


def main(args: argparse.Namespace) -> dict:
    if args.pack is not None:
        pack = ModelPack.load(args.pack)
        settings = Settings(
            models=args.pack, precision=args.precision, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        models = OnnxModels(pack, settings=settings)
        runtime = {"provider": models.runtime.provider, "precision": models.runtime.precision}
        infer, model_inputs, params = models.run, pack.model_inputs, pack.detection_params
        local_labels, global_labels, thresholds = pack.local_labels, pack.global_labels, pack.thresholds
        triage_threshold = pack.triage.threshold if pack.triage is not None else None
        maps = pack.heatmaps
        grid = HeatmapGrid.from_manifest(maps, model_inputs.classifier.size, maps["shape"][-1]) if maps else None
        source, folder = f"pack {pack.name} {pack.version}", args.pack
    else:
        infer, model_inputs, local_labels, global_labels, thresholds, params = torch_infer_from_run(args.run)
        triage_threshold = (json.loads((args.run / "thresholds.json").read_text()).get("triage") or {}).get("threshold")
        grid = None  # a run's PyTorch outputs have no heatmaps; its exported pack does
        source, folder = f"run {args.run}", args.run
        runtime = {"provider": "PyTorch", "precision": "fp32"}
    out = args.out or folder
    records = read_split(args.data, args.split, args.layout, fusion_from_args(args))[: args.limit]
    started = time.perf_counter()
    predictions = predict_records(records, model_inputs, infer, params, args.batch_size, args.threads)
    inference_seconds = time.perf_counter() - started
    inputs = evaluation_inputs(records, predictions, local_labels, global_labels, thresholds)
    started = time.perf_counter()
    matches = detection_matches(inputs)
    scores = score(inputs, matches, BootstrapSpec(args.bootstrap, args.seed, args.confidence))
    report = {
        "source": source,
        "data": str(args.data),
        "split": args.split,
        "command": command_line(args),
        "thresholds_method": thresholds_method(folder),
        "runtime": runtime,
    } | scores
    bootstrap = (args.bootstrap, args.seed, args.confidence)
    if args.baseline:
        report["baseline"] = baselines.evaluation_section(
            args.data,
            args.split,
            args.layout,
            fusion_from_args(args),
            records,
            global_labels,
            inputs.probabilities,
            bootstrap,
            args.cache,
            args.threads,
        )
    triage = (inputs.targets, inputs.probabilities, global_labels, triage_threshold)
    report["triage"] = triage_evaluation(*triage, *bootstrap)
    if predictions.heatmaps is not None and grid is not None:
        report["heatmaps"] = peak_in_box(records, predictions.heatmaps, predictions.geometries, global_labels, grid)
    report["seconds"] = {"inference": round(inference_seconds, 1), "metrics": round(time.perf_counter() - started, 1)}
    title = f"Evaluation of {source} on {args.data.name}/{args.split}"
    written = write_outputs(out, args.split, report, inputs, matches, title)
    print(markdown_report(report, title))
    print("wrote " + ", ".join(str(path) for path in written))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
