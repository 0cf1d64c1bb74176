"""Evaluate a model pack (ONNX, as served) or a training run (PyTorch) on a dataset split.

    python -m training.evaluate --data data/synthetic --split test --pack models/demo-synthetic

Every image goes through the service's own pipeline (DICOM bytes -> `service.pipeline.prepare`
-> model -> `service.postprocess`), and boxes are scored in the original image's pixel space
against the CSV annotations. Reports detection mAP@0.4 (the VinBigData challenge metric), mAP@0.5
and per-class AP, and per-label AUROC with sensitivity / specificity / F1 at the pack's thresholds.
Writes evaluation_<split>.json and .md into --out (default: the pack or run folder).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.modelpack import ModelPack, OnnxModels
from service.pipeline import InputSpec, prepare
from service.postprocess import DetectionParams, Detections, select_detections, to_original_space
from training.data import Record, read_split
from training.metrics import ImageDetections, auroc, mean_average_precision, operating_point

InferFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class Predictions:
    image_ids: list[str]
    detections: list[Detections]  # original pixel space
    probabilities: np.ndarray  # N x K


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=("train", "test"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pack", type=Path, help="model pack folder (evaluated with ONNX Runtime, as served)")
    source.add_argument("--run", type=Path, help="training run folder (evaluated with PyTorch)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: the pack or run folder)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="threads decoding DICOMs")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    return parser


def predict_records(records: list[Record], spec: InputSpec, infer: InferFn, params: DetectionParams,
                    batch_size: int = 16, threads: int = 2) -> Predictions:
    """Run DICOM files through the service pipeline and a model; boxes come back in original pixels."""
    detections: list[Detections] = []
    probabilities: list[np.ndarray] = []
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(records), desc="evaluate") as progress:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            prepared = list(pool.map(lambda r: prepare(r.path.read_bytes(), spec), chunk))
            boxes, scores, probs = infer(np.stack([p.input for p in prepared]))
            for i, item in enumerate(prepared):
                detections.append(to_original_space(select_detections(boxes[i], scores[i], params), item.geometry))
            probabilities.append(probs)
            progress.update(len(chunk))
    return Predictions([r.image_id for r in records], detections, np.concatenate(probabilities) if probabilities else np.zeros((0, 0)))


def score(records: list[Record], predictions: Predictions, local_labels: list[str], global_labels: list[str],
          thresholds: dict[str, float]) -> dict:
    local_index = {name: i for i, name in enumerate(local_labels)}
    images = []
    for record, found in zip(records, predictions.detections):
        gt = [box for box in record.boxes if box.label in local_index]
        images.append(ImageDetections(
            found.boxes, found.scores, found.classes,
            np.array([[b.x_min, b.y_min, b.x_max, b.y_max] for b in gt], dtype=np.float32).reshape(-1, 4),
            np.array([local_index[b.label] for b in gt], dtype=np.int64),
        ))
    at40, at50 = mean_average_precision(images, local_labels, 0.4), mean_average_precision(images, local_labels, 0.5)
    classification = {}
    for k, label in enumerate(global_labels):
        targets = np.array([record.image_labels.get(label, 0) for record in records])
        classification[label] = {"auroc": auroc(targets, predictions.probabilities[:, k]), "positives": int(targets.sum()),
                                 "threshold": thresholds[label]} | operating_point(targets, predictions.probabilities[:, k], thresholds[label])
    aurocs = [entry["auroc"] for entry in classification.values() if entry["auroc"] is not None]
    return {
        "images": len(records),
        "detection": {"map40": at40["map"], "map50": at50["map"],
                      "per_class": {label: {"ap40": at40["per_class"][label], "ap50": at50["per_class"][label],
                                            "boxes": int(sum((img.gt_classes == i).sum() for img in images))}
                                    for i, label in enumerate(local_labels)}},
        "classification": {"mean_auroc": float(np.mean(aurocs)) if aurocs else None, "per_label": classification},
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_report(report: dict, title: str) -> str:
    detection, classification = report["detection"], report["classification"]
    lines = [f"# {title}", "", f"{report['images']} images.", "",
             f"**Detection** mAP@0.4 = {_fmt(detection['map40'])}, mAP@0.5 = {_fmt(detection['map50'])}", "",
             "| local label | boxes | AP@0.4 | AP@0.5 |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {label} | {v['boxes']} | {_fmt(v['ap40'])} | {_fmt(v['ap50'])} |" for label, v in detection["per_class"].items()]
    lines += ["", f"**Classification** mean AUROC = {_fmt(classification['mean_auroc'])}", "",
              "| global label | positives | AUROC | threshold | sensitivity | specificity | F1 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {label} | {v['positives']} | {_fmt(v['auroc'])} | {_fmt(v['threshold'])} | {_fmt(v['sensitivity'])} | "
              f"{_fmt(v['specificity'])} | {_fmt(v['f1'])} |" for label, v in classification["per_label"].items()]
    return "\n".join(lines) + "\n"


def torch_infer_from_run(run: Path) -> tuple[InferFn, InputSpec, list[str], list[str], dict[str, float], DetectionParams]:
    import torch

    from service.preprocess import Normalization
    from training.engine import predict
    from training.export import load_run

    checkpoint, detector, classifier = load_run(run)
    spec = InputSpec(size=int(checkpoint["input_size"]), normalization=Normalization(*checkpoint["normalization"]))
    thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]

    def infer(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return predict(detector, classifier, images, torch.device("cpu"))

    return infer, spec, checkpoint["local_labels"], checkpoint["global_labels"], thresholds, DetectionParams()


def main(args: argparse.Namespace) -> dict:
    if args.pack is not None:
        pack = ModelPack.load(args.pack)
        models = OnnxModels(pack, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        infer, spec, params = models.run, pack.input_spec, pack.detection_params
        local_labels, global_labels, thresholds = pack.local_labels, pack.global_labels, pack.thresholds
        source, out = f"pack {pack.name} {pack.version}", args.out or args.pack
    else:
        infer, spec, local_labels, global_labels, thresholds, params = torch_infer_from_run(args.run)
        source, out = f"run {args.run}", args.out or args.run
    records = read_split(args.data, args.split)[: args.limit]
    predictions = predict_records(records, spec, infer, params, args.batch_size, args.threads)
    report = {"source": source, "data": str(args.data), "split": args.split} | score(records, predictions, local_labels, global_labels, thresholds)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"evaluation_{args.split}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown_report(report, f"Evaluation of {source} on {args.data.name}/{args.split}")
    (out / f"evaluation_{args.split}.md").write_text(text)
    print(text)
    print(f"wrote {out / f'evaluation_{args.split}.json'} and .md")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
