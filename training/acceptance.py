"""A pack's acceptance test in its manifest: which split accepted it, and what it measured there per precision.

`python -m training.evaluate --pack PACK --split test --record` (once per precision, e.g. fp32 then fp16)
writes into the manifest:

- `acceptance_test`: the test split's identity (data folder, split, the generator's seed and difficulty
  for phantoms, image count, sha256 of the image-id list) and the precisions evaluated on it;
- `evaluation_by_precision`: {precision: headline metrics with intervals}; `evaluation` is the fp32 one;
- `precision_difference`: fp16 minus fp32 for each headline metric, when both were recorded.

A pack version is accepted on one test split: recording a different split for the same version is
refused, and so is any split the pack was re-tuned after (training.calibrate retires the acceptance
test into `retired_test_splits`).
"""

from __future__ import annotations

import json
from pathlib import Path

from training.splits import image_ids_sha256

ACCEPTANCE_KEYS = ("data", "split", "generator", "seed", "difficulty", "images", "image_ids_sha256")


def _headline(section: dict) -> dict:
    """A report section's own numbers and intervals, without its per-label tables."""
    return {key: value for key, value in section.items() if not isinstance(value, dict) or key.endswith("_ci")}


def evaluation_summary(report: dict, file_name: str) -> dict:
    """The manifest's summary of an evaluation report: headline metrics with intervals, per-label AP / AUROC / ECE."""
    detection, classification = report.get("detection") or {}, report.get("classification") or {}
    calibration, challenge = report.get("calibration") or {}, report.get("challenge") or {}
    summary = {
        "report": file_name,
        "source": report.get("source"),
        "data": report.get("data"),
        "split": report.get("split"),
        "images": report.get("images"),
        "runtime": report.get("runtime"),
        "detection": _headline(detection)
        | {
            "per_class": {
                label: {key: value for key, value in entry.items() if key.startswith("ap40")}
                for label, entry in (detection.get("per_class") or {}).items()
            }
        },
        "classification": _headline(classification)
        | {
            "per_label": {
                label: {key: value for key, value in entry.items() if key.startswith("auroc")}
                for label, entry in (classification.get("per_label") or {}).items()
            }
        },
    }
    if challenge:
        summary["challenge"] = {key: challenge.get(key) for key in ("name", "map40", "map40_ci")}
    if calibration:
        summary["calibration"] = {
            key: value for key, value in _headline(calibration).items() if key.startswith(("mean_", "calibrated"))
        }
    if report.get("subgroups"):
        summary["flagged_subgroups"] = {
            f"{group['attribute']}={group['value']}": group["flags"]
            for group in report["subgroups"]["groups"]
            if group["flags"]
        }
    return summary


def check_acceptance_split(manifest: dict, image_ids: list[str]) -> None:
    """SystemExit when this split may not (or may no longer) accept the pack version (module docstring)."""
    digest = image_ids_sha256(image_ids)
    retired = [entry for entry in manifest.get("retired_test_splits") or [] if entry.get("image_ids_sha256") == digest]
    if retired:
        raise SystemExit(
            "error: the pack was re-tuned after this test split accepted it (manifest retired_test_splits); accept "
            "the new version on a fresh test split"
        )
    accepted = manifest.get("acceptance_test")
    if accepted and accepted.get("image_ids_sha256") != digest:
        raise SystemExit(
            f"error: version {manifest.get('version')} was accepted on another test split ({accepted.get('data')} "
            f"{accepted.get('split')}, {accepted.get('images')} images); a version is accepted on one split. "
            "Evaluate without --record, or calibrate/export a new version"
        )


def headline_numbers(summary: dict) -> dict[str, float | None]:
    """The metrics compared across precisions."""
    return {
        "map40": summary["detection"].get("map40"),
        "map50": summary["detection"].get("map50"),
        "challenge_map40": (summary.get("challenge") or {}).get("map40"),
        "mean_auroc": summary["classification"].get("mean_auroc"),
        "mean_f1": summary["classification"].get("mean_f1"),
        "mean_ece": (summary.get("calibration") or {}).get("mean_ece"),
        "mean_brier": (summary.get("calibration") or {}).get("mean_brier"),
    }


def record_evaluation(pack: Path, report: dict, report_file: str) -> Path:
    """Write the report's summary and the test split's identity into the pack's manifest; returns the manifest path."""
    path = Path(pack) / "manifest.json"
    manifest = json.loads(path.read_text())
    digest = report["dataset"]["image_ids_sha256"]
    precision = report["runtime"]["precision"]
    summary = evaluation_summary(report, report_file)
    by_precision = manifest.setdefault("evaluation_by_precision", {})
    by_precision[precision] = summary
    if precision == "fp32":
        manifest["evaluation"] = summary
    accepted = manifest.get("acceptance_test") or {}
    same_split = accepted.get("image_ids_sha256") == digest
    precisions = set(accepted.get("precisions") or []) if same_split else set()
    manifest["acceptance_test"] = {key: report["dataset"].get(key) for key in ACCEPTANCE_KEYS} | {
        "precisions": sorted(precisions | {precision})
    }
    if {"fp32", "fp16"} <= set(by_precision):
        fp32, fp16 = headline_numbers(by_precision["fp32"]), headline_numbers(by_precision["fp16"])
        manifest["precision_difference"] = {
            "fp16_minus_fp32": {
                name: (fp16[name] - fp32[name]) if fp16[name] is not None and fp32[name] is not None else None
                for name in fp32
            }
        }
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
