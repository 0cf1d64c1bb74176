"""Readers for the VinDr-PCXR dataset layout (DESIGN §2) and the cached training tensors.

Columns are read by header name, never by position, so the real CSVs and the synthetic ones load
the same way.
"""

from __future__ import annotations

import csv
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.pipeline import InputSpec, prepare


@dataclass(frozen=True)
class Box:
    label: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class Record:
    image_id: str
    path: Path
    boxes: tuple[Box, ...]
    image_labels: dict[str, int]


def _float_or_none(text: str | None) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


def read_split(root: Path, split: str) -> list[Record]:
    """Records of one split ("train" or "test"), sorted by image id."""
    root = Path(root)
    labels_csv = root / f"image_labels_{split}.csv"
    boxes_csv = root / f"annotations_{split}.csv"
    for required in (labels_csv, boxes_csv, root / split):
        if not required.exists():
            raise FileNotFoundError(f"{required} is missing: is {root} a VinDr-PCXR-style dataset folder?")
    boxes: dict[str, list[Box]] = {}
    with boxes_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            coordinates = [_float_or_none(row.get(key)) for key in ("x_min", "y_min", "x_max", "y_max")]
            entries = boxes.setdefault(row["image_id"], [])
            if None not in coordinates:  # "No finding" rows carry empty coordinates
                entries.append(Box(row["class_name"].strip(), *coordinates))  # type: ignore[arg-type]
    records = []
    with labels_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        label_columns = [name for name in reader.fieldnames or [] if name not in ("image_id", "rad_ID", "rad_id")]
        for row in reader:
            image = row["image_id"]
            records.append(Record(
                image_id=image,
                path=root / split / f"{image}.dicom",
                boxes=tuple(boxes.get(image, ())),
                image_labels={name.strip(): int(float(row[name] or 0)) for name in label_columns},
            ))
    return sorted(records, key=lambda record: record.image_id)


@dataclass
class TensorSet:
    """Preprocessed inputs and targets of a split, in model-input space."""

    images: np.ndarray  # N x 1 x S x S float32
    boxes: list[np.ndarray]  # per image (K, 4) float32, model-input pixels
    box_labels: list[np.ndarray]  # per image (K,) int64 indices into local_labels
    image_labels: np.ndarray  # N x G float32, columns follow global_labels
    image_ids: list[str]


def _prepare_file(args: tuple[Path, InputSpec]) -> tuple[np.ndarray, object]:
    path, spec = args
    prepared = prepare(path.read_bytes(), spec)
    return prepared.input, prepared.geometry


def load_tensors(records: list[Record], spec: InputSpec, local_labels: list[str], global_labels: list[str],
                 workers: int = 1, description: str = "preprocess") -> TensorSet:
    """Decode and preprocess every image once through the service's pipeline (no train/serve skew)."""
    jobs = [(record.path, spec) for record in records]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(_prepare_file, jobs, chunksize=8), total=len(jobs), desc=description))
    else:
        results = [_prepare_file(job) for job in tqdm(jobs, desc=description)]
    local_index = {name: i for i, name in enumerate(local_labels)}
    boxes, box_labels = [], []
    for record, (_, geometry) in zip(records, results):
        kept = [box for box in record.boxes if box.label in local_index]
        xyxy = np.array([[b.x_min, b.y_min, b.x_max, b.y_max] for b in kept], dtype=np.float32).reshape(-1, 4)
        boxes.append(geometry.to_model(xyxy))
        box_labels.append(np.array([local_index[b.label] for b in kept], dtype=np.int64))
    return TensorSet(
        images=np.stack([tensor for tensor, _ in results]) if results else np.zeros((0, 1, spec.size, spec.size), np.float32),
        boxes=boxes,
        box_labels=box_labels,
        image_labels=np.array([[record.image_labels.get(name, 0) for name in global_labels] for record in records],
                              dtype=np.float32).reshape(len(records), len(global_labels)),
        image_ids=[record.image_id for record in records],
    )
