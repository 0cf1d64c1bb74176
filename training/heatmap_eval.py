"""Do the heatmaps point at the findings? The evaluation report's `heatmaps` section.

For every test image positive for a disease that has a box of one of its findings, the disease's heatmap is
taken exactly as a client gets it (service/inference/heatmaps.py: the 8-bit PNG and its original-pixel
rectangle) and its peak (viewer_outputs/heatmaps.peak: the centre of the brightest cell) is looked for inside
those boxes. Which findings belong to a disease: on phantoms, the ones the generator derives it from
(training.synthetic.findings.DISEASE_FINDINGS); for a disease not in that table (real data), any finding box of
the image. The fraction of such images whose peak is inside is the number reported, per disease and overall.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.dicom.preprocess import Letterbox
from service.inference.heatmaps import HeatmapGrid, heatmaps_json
from service.viewer_outputs.heatmaps import peak
from training.data import Record
from training.synthetic.findings import DISEASE_FINDINGS

NO_FINDING = "No finding"


def corresponding_boxes(record: Record, disease: str) -> list:
    """The ground-truth boxes of the findings a disease's heatmap should point at (module docstring)."""
    findings = DISEASE_FINDINGS.get(disease)
    return [box for box in record.boxes if findings is None or box.label in findings]


def peak_in_box(
    records: Sequence[Record],
    maps: Sequence[np.ndarray],
    geometries: Sequence[Letterbox],
    global_labels: Sequence[str],
    grid: HeatmapGrid,
) -> dict:
    """Per disease and overall: positive images with a corresponding box, how many have the heatmap's peak inside
    one, and the fraction. `maps` are each image's (K, h, w) heatmaps output."""
    per_label = {label: {"images": 0, "peak_in_box": 0} for label in global_labels if label != NO_FINDING}
    for record, image_maps, geometry in zip(records, maps, geometries):
        heatmaps = heatmaps_json(np.asarray(image_maps), geometry, grid)
        for label, heatmap in zip(global_labels, heatmaps):
            boxes = corresponding_boxes(record, label) if label in per_label and record.image_labels.get(label) else []
            if not boxes:
                continue
            x, y = peak(heatmap)
            per_label[label]["images"] += 1
            per_label[label]["peak_in_box"] += any(b.x_min <= x <= b.x_max and b.y_min <= y <= b.y_max for b in boxes)
    for entry in per_label.values():
        entry["fraction"] = entry["peak_in_box"] / entry["images"] if entry["images"] else None
    images = sum(entry["images"] for entry in per_label.values())
    hits = sum(entry["peak_in_box"] for entry in per_label.values())
    return {
        "rule": "the peak of the disease's heatmap (as the API returns it) inside a box of one of its findings, over "
        "positive images with such a box; findings per disease: the phantom generator's rules "
        "(training.synthetic.findings.DISEASE_FINDINGS), any finding box for other diseases",
        "images": images,
        "peak_in_box": hits,
        "fraction": hits / images if images else None,
        "per_label": per_label,
    }


def markdown_section(section: dict | None) -> list[str]:
    if not section:
        return []
    fraction = "n/a" if section["fraction"] is None else f"{section['fraction']:.3f}"
    lines = [
        "",
        "## Heatmaps",
        "",
        f"Peak of the heatmap inside a box of the disease's findings: **{section['peak_in_box']} of "
        f"{section['images']} ({fraction})**. Rule: {section['rule']}.",
        "",
        "| disease | positive images with a box | peak in box | fraction |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, entry in section["per_label"].items():
        value = "n/a" if entry["fraction"] is None else f"{entry['fraction']:.3f}"
        lines.append(f"| {label} | {entry['images']} | {entry['peak_in_box']} | {value} |")
    return lines
