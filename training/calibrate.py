"""Fit the calibrators and operating points of a pack or a training run on a validation split.

    python -m training.calibrate --pack models/demo-synthetic --data DIR --split validation --version 0.3.0
    python -m training.calibrate --run runs/demo          # the run's own validation split (its splits.json)

Every image goes through the service's path (DICOM bytes -> `service.dicom.pipeline.prepare` -> the
models -> `select_detections` -> `to_original_space`, boxes clipped to the image), with ONNX Runtime
(float32, CPU) for a pack or PyTorch for a run. Then, on that split:

1. one calibrator per classifier label, chosen by cross-validated Brier score (training/calibration.py);
2. each label's operating point on the *calibrated* probability: Youden's J;
3. each finding's reporting threshold: the best F1 of its boxes at IoU 0.4 in original pixels; when no
   threshold gives F1 > 0, `DEFAULT_FINDING_THRESHOLD` (documented, never the top score of misses).

A pack's manifest gets the calibration, the thresholds and the ids of the calibration images
(data_splits.json); a run gets calibration.json, which `training.export` copies into the pack. The
split must not share images with what the models were trained on, nor with a pack's acceptance test.
Calibrating a pack again is tuning: its recorded acceptance test is retired (a test split accepts a
pack version once). Writes calibration_<split>.json/.md and reliability_<split>.png beside the pack
or run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.inference.modelpack import ModelPack
from training.calibration import (
    CANDIDATES,
    RUN_CALIBRATION_FILE,
    Selection,
    calibration_point_estimates,
    fit_calibration,
    manifest_section,
    plot_reliability,
)
from training.data import Record, add_layout_arguments, fusion_from_args, read_split
from training.evaluate import Source, evaluation_inputs, open_pack, open_run, predict_records
from training.metrics import finding_threshold, youden_threshold
from training.splits import (
    PACK_SPLITS_FILE,
    RUN_SPLITS_FILE,
    dataset_provenance,
    read_splits,
    refuse_overlap,
    split_record,
    write_pack_splits,
)
from training.triage import triage_entry

# A finding whose validation boxes never hit (no threshold gives F1 > 0) is reported only above this:
# half the detector's score range, well above its 0.05 candidate floor, so an unproven label reports
# only its most confident boxes instead of whatever the best-scoring miss happened to score.
DEFAULT_FINDING_THRESHOLD = 0.5
FINDING_IOU = 0.4  # a reported box counts as a hit at the challenge metric's IoU
PACK_PRECISION = "fp32"  # calibrated on the float32 variant; fp16's drift is measured by the evaluation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pack", type=Path, help="model pack folder (ONNX Runtime, float32; its manifest is updated)")
    source.add_argument("--run", type=Path, help="training run folder (PyTorch; writes RUN/calibration.json)")
    parser.add_argument(
        "--data", type=Path, default=None, help="dataset folder (required with --pack; default for --run: the run's)"
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split to fit on (default: 'validation' with --pack; with --run and no --data, the run's own "
        "validation images)",
    )
    parser.add_argument("--version", default=None, help="new pack version to write (calibrating changes the outputs)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds that choose each calibrator")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="threads decoding DICOMs")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    add_layout_arguments(parser)
    return parser


def open_source(args: argparse.Namespace) -> Source:
    """The pack (float32 on the CPU, calibrated or not yet) or the run to calibrate."""
    if args.pack is not None:
        return open_pack(args.pack, PACK_PRECISION, providers=["CPUExecutionProvider"], require_calibration=False)
    return open_run(args.run)


def described(source: Source) -> str:
    """The source and how it ran, e.g. "pack demo-synthetic 0.2.0 (fp32, CPUExecutionProvider)"."""
    return f"{source.description} ({source.runtime['precision']}, {source.runtime['provider']})"


def calibration_records(args: argparse.Namespace, source: Source) -> tuple[list[Record], dict]:
    """The records to fit on and how the report names them."""
    if args.run is not None and args.data is None:
        checkpoint_args = _run_arguments(args.run)
        data, split = Path(checkpoint_args["data"]), args.split or "train"
        records = read_split(data, split, checkpoint_args.get("layout", "auto"), fusion_from_args(checkpoint_args))
        if args.split is None:  # the run's held-out validation images, as it recorded them
            wanted = set(source.fitted.get("validation") or [])
            if not wanted:
                raise SystemExit(
                    f"error: {args.run / RUN_SPLITS_FILE} lists no validation images; pass --data and --split"
                )
            records = [record for record in records if record.image_id in wanted]
            split = "run-validation"  # the run's held-out images, as its splits.json lists them
    else:
        if args.data is None:
            raise SystemExit("error: --data is required with --pack")
        data, split = args.data, args.split or "validation"
        records = read_split(data, split, args.layout, fusion_from_args(args))
    records = records[: args.limit]
    if not records:
        raise SystemExit(f"error: no images in {data} {split}")
    return records, dataset_provenance(data, split)


def _run_arguments(run: Path) -> dict:
    import torch

    return torch.load(Path(run) / "checkpoint.pt", map_location="cpu", weights_only=False)["args"]


@dataclass
class CalibrationResult:
    section: dict  # the manifest's "calibration"
    operating_points: dict
    selections: dict[str, Selection]
    targets: np.ndarray
    raw: np.ndarray
    calibrated: np.ndarray
    image_ids: list[str]


def operating_points(images, targets: np.ndarray, calibrated: np.ndarray, local_labels, global_labels) -> dict:
    """Disease thresholds (Youden's J on calibrated probabilities), finding thresholds (best F1 in original
    pixels, DEFAULT_FINDING_THRESHOLD where no threshold gives F1 > 0) and the triage operating point (on the
    calibrated No finding probability, training/triage.py), with how each was chosen."""
    thresholds = {label: youden_threshold(targets[:, k], calibrated[:, k]) for k, label in enumerate(global_labels)}
    finding_thresholds, defaulted = {}, []
    for k, label in enumerate(local_labels):
        chosen = finding_threshold(images, k, FINDING_IOU)
        if chosen is None:
            defaulted.append(label)
            chosen = DEFAULT_FINDING_THRESHOLD
        finding_thresholds[label] = float(chosen)
    return {
        "thresholds": thresholds,
        "threshold_method": "Youden's J on the calibrated probabilities of the calibration split "
        f"({len(targets)} images; 0.5 where a label has no positive or no negative)",
        "finding_thresholds": finding_thresholds,
        "finding_threshold_method": f"best F1 of the boxes at IoU {FINDING_IOU} in original pixels (after NMS and "
        f"clipping, as served) on the calibration split; {DEFAULT_FINDING_THRESHOLD} where no threshold gives F1 > 0",
        "finding_thresholds_defaulted": defaulted,
        # The service derives the abnormality from the calibrated No finding probability: chosen on that scale.
        "triage": triage_entry(
            targets,
            calibrated,
            global_labels,
            f"the calibrated probabilities of the calibration split ({len(targets)} images)",
        ),
    }


def calibrate(
    records: list[Record], source: Source, folds: int, seed: int, fitted_on: dict, batch_size: int, threads: int
) -> CalibrationResult:
    """Run the split through the service's path, then fit calibrators and choose every operating point."""
    predictions = predict_records(records, source.inputs, source.infer, source.params, batch_size, threads)
    inputs = evaluation_inputs(records, predictions, source.local_labels, source.global_labels, thresholds={})
    calibration, selections = fit_calibration(inputs.probabilities, inputs.targets, source.global_labels, folds, seed)
    calibrated = calibration.calibrate_columns(source.global_labels, inputs.probabilities)
    points = operating_points(inputs.images, inputs.targets, calibrated, source.local_labels, source.global_labels)
    return CalibrationResult(
        manifest_section(selections, fitted_on, folds),
        points,
        selections,
        inputs.targets,
        inputs.probabilities,
        calibrated,
        list(predictions.image_ids),
    )


# ---- report ---------------------------------------------------------------------------------------


def report(result: CalibrationResult, source: Source, labels: list[str]) -> dict:
    in_sample = calibration_point_estimates(result.targets, result.raw, result.calibrated, labels)
    return {
        "source": described(source),
        "fitted_on": result.section["fitted_on"],
        "method_selection": result.section["method_selection"],
        "calibrators": result.section["calibrators"],
        "selection": result.section["selection"],
        "in_sample": {
            "note": "measured on the images the calibrators were fitted on (optimistic); the held-out numbers are "
            "in the evaluation report of the test split",
            "per_label": in_sample,
        },
        "operating_points": result.operating_points,
    }


def markdown(report_data: dict, title: str, split: str) -> str:
    fitted = report_data["fitted_on"]
    lines = [
        f"# {title}",
        "",
        f"Source: {report_data['source']}. Fitted on {fitted['images']} images of {fitted['data']} "
        f"({fitted['split']}).",
        "",
        f"Method selection: {report_data['method_selection']}.",
        "",
        "| label | positives | chosen | " + " | ".join(f"CV Brier {m}" for m in CANDIDATES) + " | CV ECE (chosen) |",
        "| --- | ---: | --- | " + " | ".join("---:" for _ in CANDIDATES) + " | ---: |",
    ]
    for label, selection in report_data["selection"].items():
        chosen = report_data["calibrators"][label]["method"]
        table = selection["out_of_fold"]
        cells = [_fmt((table.get(m) or {}).get("brier")) for m in CANDIDATES]
        lines.append(
            f"| {label} | {report_data['in_sample']['per_label'][label]['positives']} | {chosen} | "
            + " | ".join(cells)
            + f" | {_fmt((table.get(chosen) or {}).get('ece'))} |"
        )
    lines += [
        "",
        "In-sample (the fitting images themselves, optimistic): ECE and Brier before → after.",
        "",
        "| label | ECE raw | ECE calibrated | Brier raw | Brier calibrated | threshold (calibrated) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    points = report_data["operating_points"]
    for label, entry in report_data["in_sample"]["per_label"].items():
        lines.append(
            f"| {label} | {_fmt(entry['ece_raw'])} | {_fmt(entry['ece'])} | {_fmt(entry['brier_raw'])} | "
            f"{_fmt(entry['brier'])} | {_fmt(points['thresholds'][label])} |"
        )
    lines += ["", "| finding | reporting threshold |", "| --- | ---: |"]
    defaulted = set(points["finding_thresholds_defaulted"])
    for label, value in points["finding_thresholds"].items():
        note = " (default: no threshold gave F1 > 0)" if label in defaulted else ""
        lines.append(f"| {label} | {_fmt(value)}{note} |")
    lines += [
        "",
        f"Disease thresholds: {points['threshold_method']}.",
        f"Finding thresholds: {points['finding_threshold_method']}.",
    ]
    triage = points.get("triage")
    if triage:
        measured = triage["validation"]
        lines.append(
            f"Triage: expedite at abnormality >= {_fmt(triage['threshold'])} ({triage['rule']}; sensitivity "
            f"{_fmt(measured['sensitivity'])}, specificity {_fmt(measured['specificity'])} there)."
        )
    lines += ["", f"![Reliability before and after calibration](reliability_{split}.png)"]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_report(folder: Path, split: str, result: CalibrationResult, source: Source) -> list[Path]:
    slug = split.replace(" ", "-")
    data = report(result, source, source.global_labels)
    title = f"Calibration of {described(source)}"
    json_path, markdown_path = folder / f"calibration_{slug}.json", folder / f"calibration_{slug}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    markdown_path.write_text(markdown(data, title, slug))
    figure = plot_reliability(
        result.targets,
        result.raw,
        result.calibrated,
        source.global_labels,
        folder / f"reliability_{slug}.png",
        f"Calibration split ({len(result.targets)} images, in-sample)",
    )
    return [json_path, markdown_path, figure]


# ---- writing the results ---------------------------------------------------------------------------


def update_pack(pack_dir: Path, result: CalibrationResult, version: str | None) -> dict:
    """Write the calibration, the operating points and the calibration ids into the pack; returns the manifest."""
    manifest_path = pack_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    points = result.operating_points
    manifest["calibration"] = result.section
    manifest["classifier"]["thresholds"] = points["thresholds"]
    manifest["classifier"]["threshold_method"] = points["threshold_method"]
    manifest["detector"]["thresholds"] = points["finding_thresholds"]
    manifest["detector"]["threshold_method"] = points["finding_threshold_method"]
    manifest["triage"] = points["triage"]
    splits = read_splits(pack_dir / PACK_SPLITS_FILE)
    splits["calibration"] = sorted(result.image_ids)
    write_pack_splits(pack_dir, manifest, splits)
    retire_acceptance_test(manifest)
    if version is not None:
        manifest["version"] = version
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    ModelPack.load(pack_dir)  # verifies like the service will
    return manifest


def retire_acceptance_test(manifest: dict) -> None:
    """Tuning a pack ends its acceptance: the test split that accepted it may not accept it again."""
    acceptance = manifest.pop("acceptance_test", None)
    if acceptance:
        retired = manifest.setdefault("retired_test_splits", [])
        retired.append({key: acceptance.get(key) for key in ("data", "split", "images", "image_ids_sha256")})
        print(
            f"the acceptance test ({acceptance.get('data')} {acceptance.get('split')}) is retired: evaluate this "
            "pack on a fresh test split"
        )


def write_run_calibration(run: Path, result: CalibrationResult) -> Path:
    path = run / RUN_CALIBRATION_FILE
    path.write_text(
        json.dumps(
            {
                "calibration": result.section,
                **result.operating_points,
                "calibration_image_ids": sorted(result.image_ids),
            },
            indent=1,
        )
        + "\n"
    )
    return path


def main(args: argparse.Namespace) -> CalibrationResult:
    source = open_source(args)
    records, provenance = calibration_records(args, source)
    image_ids = [record.image_id for record in records]
    what = "the pack" if args.pack is not None else "the run"
    refuse_overlap(image_ids, {"train": source.fitted.get("train", [])}, "calibration", what)
    accepted = ((source.pack.manifest if source.pack else {}).get("acceptance_test") or {}).get("image_ids_sha256")
    if accepted and split_record(image_ids)["image_ids_sha256"] == accepted:
        raise SystemExit("error: this is the pack's acceptance test split; calibrate on a validation split instead")
    fitted_on = provenance | split_record(image_ids) | {"source": described(source)}
    result = calibrate(records, source, args.folds, args.seed, fitted_on, args.batch_size, args.threads)
    written = write_report(source.folder, provenance["split"], result, source)
    if args.pack is not None:
        update_pack(source.folder, result, args.version)
        written.append(source.folder / "manifest.json")
    else:
        written.append(write_run_calibration(source.folder, result))
    chosen = ", ".join(f"{label}: {s.calibrator.method}" for label, s in result.selections.items())
    print(f"calibrators: {chosen}")
    print("wrote " + ", ".join(str(path) for path in written))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
