"""Export a training run to a model pack the service loads.

    python -m training.export --run runs/demo --out models/demo-synthetic

Writes detector.onnx and classifier.onnx (dynamic batch axis, fixed input size, metadata stamped
into the files), copies the run's plots, and writes manifest.json with the sha256 of every model
file. Nothing is written unless ONNX Runtime reproduces the PyTorch outputs on real images from the
dataset within the tolerances below, at batch sizes 1 and > 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from service.modelpack import CLASSIFIER_OUTPUTS, DETECTOR_OUTPUTS, INPUT_NAME, MANIFEST_FORMAT, ModelPack, sha256_of
from service.pipeline import InputSpec
from service.postprocess import DetectionParams
from service.preprocess import Normalization
from training.data import load_tensors, read_split
from training.engine import predict
from training.models import Classifier, Detector

INTENDED_USE = ("Research use only; not for diagnostic use. Frontal (PA/AP) pediatric chest radiographs "
                "(patients under 10 years), CR/DX modality.")


@dataclass(frozen=True)
class Tolerances:
    """How far ONNX Runtime may drift from PyTorch (float32 kernels differ in summation order)."""

    box_pixels: float = 0.05  # absolute, in model-input pixels
    score: float = 1e-4
    probability: float = 1e-4


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="training run folder (holds checkpoint.pt)")
    parser.add_argument("--out", type=Path, required=True, help="model pack folder to write")
    parser.add_argument("--data", type=Path, default=None, help="dataset for the parity check (default: the run's)")
    parser.add_argument("--name", default=None, help="pack name (default: the folder name)")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--parity-images", type=int, default=8)
    parser.add_argument("--training-data", default=None, help="one line describing the training data, for the manifest")
    return parser


def load_run(run: Path) -> tuple[dict, Detector, Classifier]:
    path = run / "checkpoint.pt"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; train first with python -m training.train --out {run}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    args = checkpoint["args"]
    detector = Detector(len(checkpoint["local_labels"]), args["detector_backbone"], args["fpn_channels"])
    classifier = Classifier(len(checkpoint["global_labels"]), args["classifier_backbone"])
    detector.load_state_dict(checkpoint["detector"])
    classifier.load_state_dict(checkpoint["classifier"])
    return checkpoint, detector.eval(), classifier.eval()


def export_onnx(model: torch.nn.Module, size: int, outputs: tuple[str, ...], path: Path, metadata: dict[str, str]) -> None:
    example = torch.zeros(2, 1, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=list(outputs),
                      dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False, opset_version=18,
                      verbose=False)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    onnx.helper.set_model_props(graph, metadata)
    onnx.save(graph, str(path))


def check_parity(detector: Detector, classifier: Classifier, detector_path: Path, classifier_path: Path,
                 images: np.ndarray, tolerances: Tolerances) -> dict[str, float]:
    """Largest ONNX-vs-PyTorch differences over batches of 1 and of all images; raises if too large."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (detector_path, classifier_path)]
    worst = {"box_pixels": 0.0, "score": 0.0, "probability": 0.0}
    for batch in ([images[:1]] + ([images] if len(images) > 1 else [])):
        boxes, scores, probabilities = predict(detector, classifier, batch, torch.device("cpu"))
        onnx_boxes, onnx_scores = sessions[0].run(list(DETECTOR_OUTPUTS), {INPUT_NAME: batch})
        (onnx_probabilities,) = sessions[1].run(list(CLASSIFIER_OUTPUTS), {INPUT_NAME: batch})
        worst["box_pixels"] = max(worst["box_pixels"], float(np.abs(onnx_boxes - boxes).max()))
        worst["score"] = max(worst["score"], float(np.abs(onnx_scores - scores).max()))
        worst["probability"] = max(worst["probability"], float(np.abs(onnx_probabilities - probabilities).max()))
    failed = {name: value for name, value in worst.items() if value > getattr(tolerances, name)}
    if failed:
        raise SystemExit(f"error: ONNX and PyTorch disagree beyond tolerance {tolerances}: {failed}; no pack written")
    return worst


def main(args: argparse.Namespace) -> Path:
    checkpoint, detector, classifier = load_run(args.run)
    run_args = checkpoint["args"]
    size = int(checkpoint["input_size"])
    normalization = Normalization(*checkpoint["normalization"])
    local_labels, global_labels = checkpoint["local_labels"], checkpoint["global_labels"]
    thresholds_path = args.run / "thresholds.json"
    if not thresholds_path.is_file():
        raise SystemExit(f"error: {thresholds_path} is missing; the run did not finish")
    thresholds = json.loads(thresholds_path.read_text())

    data_root = args.data or Path(run_args["data"])
    records = read_split(data_root, "train")[: args.parity_images]
    spec = InputSpec(size=size, normalization=normalization)
    images = load_tensors(records, spec, local_labels, global_labels, description="parity images").images

    name = args.name or args.out.name
    metadata = {
        "pack": name, "version": args.version, "input_size": str(size),
        "normalization": json.dumps({"mean": normalization.mean, "std": normalization.std}),
        "intended_use": INTENDED_USE,
    }
    with tempfile.TemporaryDirectory() as scratch:
        staging = Path(scratch)
        detector_path, classifier_path = staging / "detector.onnx", staging / "classifier.onnx"
        export_onnx(detector, size, DETECTOR_OUTPUTS, detector_path, metadata | {"model": "detector", "labels": json.dumps(local_labels)})
        export_onnx(classifier, size, CLASSIFIER_OUTPUTS, classifier_path, metadata | {"model": "classifier", "labels": json.dumps(global_labels)})
        parity = check_parity(detector, classifier, detector_path, classifier_path, images, Tolerances())
        args.out.mkdir(parents=True, exist_ok=True)
        for file in (detector_path, classifier_path):
            shutil.move(str(file), args.out / file.name)
    for extra in ("loss_curves.png", "thresholds.json", "run.json"):
        if (args.run / extra).exists():
            shutil.copy(args.run / extra, args.out / extra)

    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": args.version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "intended_use": INTENDED_USE,
        "intended_population": {"modalities": ["CR", "DX"], "body_part": "CHEST", "views": ["PA", "AP"], "max_age_years": 10},
        "training_data": args.training_data or f"{run_args['dataset']} layout at {data_root.name}",
        "label_set": run_args["dataset"],
        "input": {"name": INPUT_NAME, "layout": "NCHW", "channels": 1, "size": size,
                  "normalization": {"mean": normalization.mean, "std": normalization.std},
                  "preprocessing": "modality LUT -> window (or min-max) -> MONOCHROME1 inverted -> top-left letterbox (PIL bilinear) -> (x - mean) / std"},
        "detector": {"file": "detector.onnx", "sha256": sha256_of(args.out / "detector.onnx"),
                     "backbone": run_args["detector_backbone"], "outputs": list(DETECTOR_OUTPUTS), "labels": local_labels,
                     "postprocess": DetectionParams().__dict__,
                     # Findings are reported at these per-label operating points; evaluation uses all boxes.
                     "thresholds": thresholds["finding_thresholds"]},
        "classifier": {"file": "classifier.onnx", "sha256": sha256_of(args.out / "classifier.onnx"),
                       "backbone": run_args["classifier_backbone"], "outputs": list(CLASSIFIER_OUTPUTS), "labels": global_labels,
                       "thresholds": thresholds["thresholds"], "threshold_method": thresholds["method"]},
        "training": {"epochs": checkpoint["epoch"] + 1, "seed": run_args["seed"], "final_validation": checkpoint["log"][-1]["val"] if checkpoint["log"] else None},
        "export_parity": {"max_abs_difference": parity, "tolerances": Tolerances().__dict__, "images": len(images)},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    ModelPack.load(args.out)  # the pack we wrote must verify like the service will verify it
    print(f"wrote {args.out}: parity max |diff| {parity}")
    return args.out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
