"""Readers for the VinDr dataset layouts (README "Dataset layouts"): records of paths, boxes and labels.

The pixels are read later, one image at a time, by the streaming dataset (training/dataset.py).

Two folder layouts, told apart by the files present (`detect_layout`):

- "vindr", the PhysioNet releases of VinDr-PCXR and VinDr-CXR: `train/` and `test/` folders of
  `<image_id>.dicom` (or `.dcm`), and per split `annotations_<split>.csv` (one row per box:
  image_id, rad_id, class_name, x_min, y_min, x_max, y_max[, class_id]; rows without a box carry empty
  coordinates) and `image_labels_<split>.csv` (image_id, rad_ID, one 0/1 column per label), at the
  top of the folder (VinDr-PCXR) or in `annotations/` (VinDr-CXR). VinDr-PCXR has one reading per
  image; VinDr-CXR's training CSVs have one per radiologist (three per image) and its test CSVs the
  five-reader consensus without a rater column. An image read by several raters gets fused targets
  (training/fusion.py); an image read once keeps its rows as they are.
- "kaggle", the VinBigData challenge release of VinDr-CXR: one `train.csv` (image_id, class_name,
  class_id, rad_id, x_min, y_min, x_max, y_max; "No finding" rows with empty coordinates) and `train/`.
  It has no image-label columns, so image labels are the rater vote on which classes each rater
  marked: the 14 local findings and "No finding", no disease (global) labels. Its test images came
  without labels, so it has no test split.

Columns are read by header name, never by position (and `rad_id` in any letter case), so the real
CSVs and the synthetic ones load the same way. The few VinDr-CXR spellings that differ from the
paper's label names (training/labels.py) are mapped onto them (`CLASS_NAME_ALIASES`).
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from training.fusion import FusionConfig, fuse_rater_boxes, vote_labels

Layout = Literal["vindr", "kaggle"]
LAYOUTS: tuple[Layout, ...] = ("vindr", "kaggle")
DICOM_SUFFIXES = (".dicom", ".dcm")  # the papers' name first: it wins when both exist
COORDINATE_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
ANNOTATIONS_FOLDER = "annotations"  # where the PhysioNet VinDr-CXR release keeps its CSVs
# VinDr-CXR CSV spellings (PhysioNet and Kaggle) -> the paper's label names; the PhysioNet test CSV
# spells "Other diseases" without the s. None of these spellings occurs in VinDr-PCXR.
CLASS_NAME_ALIASES = {
    "ILD": "Interstitial lung disease (ILD)",
    "Lung Opacity": "Lung opacity",
    "Other disease": "Other diseases",
}


@dataclass(frozen=True)
class Box:
    label: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    support: int = 1  # raters whose boxes were fused into this one (1 for single-reader images)


@dataclass(frozen=True)
class Record:
    image_id: str
    path: Path
    boxes: tuple[Box, ...]
    image_labels: dict[str, int]
    raters: tuple[str, ...] = ()  # rater ids that read the image, first seen first; () when the CSVs name none


@dataclass(frozen=True)
class _Mark:
    """One annotation row: a box, or a class marked without one ("No finding", empty coordinates)."""

    rater: str  # "" when the CSV has no rater column (consensus rows)
    class_name: str
    box: Box | None


def _float_or_none(text: str | None) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


def canonical_label(name: str) -> str:
    """A CSV's class or column name as training/labels.py spells it."""
    name = name.strip()
    return CLASS_NAME_ALIASES.get(name, name)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header (names stripped) and rows keyed by it, short rows padded with "" as csv.DictReader would.

    utf-8-sig, so that a BOM left by a spreadsheet does not become part of the first column's name.
    """
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        return header, [
            {name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header)} for row in reader if row
        ]


def _require_columns(path: Path, header: list[str], columns: tuple[str, ...]) -> None:
    missing = [name for name in columns if name not in header]
    if missing:
        raise ValueError(f"{path} has no {', '.join(map(repr, missing))} column; its columns are {header}")


def _rater_column(header: list[str]) -> str | None:
    """The rater column, spelled rad_id (annotations) or rad_ID (image labels) by the papers."""
    return next((name for name in header if name.lower() == "rad_id"), None)


def _rater(row: dict[str, str], rater_column: str | None) -> str:
    return row.get(rater_column, "") if rater_column else ""


def _find_csv(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / ANNOTATIONS_FOLDER / name):
        if candidate.is_file():
            return candidate
    return None


def _image_files(folder: Path) -> dict[str, Path]:
    """image_id -> DICOM file in a split folder, listed once instead of probing each suffix per image."""
    found: dict[str, Path] = {}
    for path in folder.iterdir():
        suffix = path.suffix.lower()
        if suffix in DICOM_SUFFIXES and (path.stem not in found or suffix == DICOM_SUFFIXES[0]):
            found[path.stem] = path
    return found


def _image_path(files: dict[str, Path], folder: Path, image_id: str) -> Path:
    # An image missing from the folder keeps the papers' name, so the later read error names that file.
    return files.get(image_id, folder / f"{image_id}{DICOM_SUFFIXES[0]}")


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _read_marks(path: Path, require_rater: bool) -> dict[str, list[_Mark]]:
    """Annotation rows grouped by image_id, in file order."""
    header, rows = _read_csv(path)
    rater_column = _rater_column(header)
    _require_columns(path, header, ("image_id", "class_name", *COORDINATE_COLUMNS))
    if require_rater and rater_column is None:
        raise ValueError(f"{path} has no 'rad_id' column; its columns are {header}")
    marks: dict[str, list[_Mark]] = {}
    for row in rows:
        label = canonical_label(row["class_name"])
        coordinates = [_float_or_none(row.get(key)) for key in COORDINATE_COLUMNS]
        box = Box(label, *coordinates) if None not in coordinates else None  # type: ignore[arg-type]
        marks.setdefault(row["image_id"], []).append(_Mark(_rater(row, rater_column), label, box))
    return marks


def _fused_boxes(marks: list[_Mark], num_raters: int, fusion: FusionConfig) -> tuple[Box, ...]:
    boxed = [mark for mark in marks if mark.box is not None]
    coordinates = np.array(
        [[m.box.x_min, m.box.y_min, m.box.x_max, m.box.y_max] for m in boxed],  # type: ignore[union-attr]
        dtype=np.float64,
    ).reshape(-1, 4)
    fused = fuse_rater_boxes(coordinates, [m.class_name for m in boxed], [m.rater for m in boxed], num_raters, fusion)
    return tuple(
        Box(label, *(float(v) for v in xyxy), support=int(support))
        for label, xyxy, support in zip(fused.labels, fused.boxes, fused.support)
    )


def detect_layout(root: Path, split: str) -> Layout:
    """The layout of a dataset folder: the PhysioNet CSVs of the split win over Kaggle's train.csv.

    Both can sit in one folder; the PhysioNet files are preferred because they carry disease labels.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if _find_csv(root, f"image_labels_{split}.csv") or _find_csv(root, f"annotations_{split}.csv"):
        return "vindr"
    if (root / "train.csv").is_file():
        return "kaggle"
    raise FileNotFoundError(
        f"{root} matches no dataset layout: expected image_labels_{split}.csv and annotations_{split}.csv "
        f"(VinDr-PCXR / VinDr-CXR PhysioNet layout, in the folder or in {ANNOTATIONS_FOLDER}/) or train.csv "
        "(VinBigData Kaggle layout)"
    )


def read_vindr_split(root: Path, split: str, fusion: FusionConfig = FusionConfig()) -> list[Record]:
    """Records of one split of the PhysioNet layout (VinDr-PCXR or VinDr-CXR), sorted by image id.

    Every image_labels row is a reading; an image with one reading keeps its boxes and labels as
    written, an image with several gets WBF-fused boxes and voted labels (training/fusion.py).
    Boxes of images absent from image_labels are ignored.
    """
    root = Path(root)
    labels_csv = _find_csv(root, f"image_labels_{split}.csv") or root / f"image_labels_{split}.csv"
    boxes_csv = _find_csv(root, f"annotations_{split}.csv") or root / f"annotations_{split}.csv"
    for required in (labels_csv, boxes_csv, root / split):
        if not required.exists():
            raise FileNotFoundError(f"{required} is missing: is {root} a VinDr-PCXR or VinDr-CXR dataset folder?")
    marks = _read_marks(boxes_csv, require_rater=False)
    header, rows = _read_csv(labels_csv)
    _require_columns(labels_csv, header, ("image_id",))
    rater_column = _rater_column(header)
    label_columns = [name for name in header if name not in ("image_id", rater_column)]
    readings: dict[str, list[tuple[str, dict[str, int]]]] = {}
    for row in rows:
        labels = {canonical_label(name): int(float(row.get(name) or 0)) for name in label_columns}
        readings.setdefault(row["image_id"], []).append((_rater(row, rater_column), labels))
    files, folder = _image_files(root / split), root / split
    records = []
    for image_id, image_readings in readings.items():
        image_marks = marks.get(image_id, [])
        raters = [rater for rater in _unique([r for r, _ in image_readings] + [m.rater for m in image_marks]) if rater]
        # Rows without a rater id (the consensus test CSVs) still count as one reading each.
        num_raters = max(len(image_readings), len(raters), 1)
        if num_raters == 1:  # VinDr-PCXR and consensus rows: nothing to fuse, keep the rows as written
            boxes = tuple(mark.box for mark in image_marks if mark.box is not None)
            image_labels = image_readings[0][1]
        else:
            boxes = _fused_boxes(image_marks, num_raters, fusion)
            image_labels = vote_labels([labels for _, labels in image_readings], fusion.vote_threshold)
        records.append(Record(image_id, _image_path(files, folder, image_id), boxes, image_labels, tuple(raters)))
    return sorted(records, key=lambda record: record.image_id)


def read_kaggle_split(root: Path, split: str, fusion: FusionConfig = FusionConfig()) -> list[Record]:
    """Records of the VinBigData Kaggle layout (`<split>.csv`, only train.csv exists), sorted by image id.

    Image labels are voted from the classes each rater marked, boxes or "No finding" rows alike;
    every class named anywhere in the file is a key of every record's image_labels.
    """
    root = Path(root)
    boxes_csv = root / f"{split}.csv"
    for required in (boxes_csv, root / split):
        if not required.exists():
            hint = " (the Kaggle release has labels for train only)" if split != "train" else ""
            raise FileNotFoundError(f"{required} is missing: is {root} a VinBigData Kaggle dataset folder?{hint}")
    marks = _read_marks(boxes_csv, require_rater=True)
    names = _unique([mark.class_name for image_marks in marks.values() for mark in image_marks])
    files, folder = _image_files(root / split), root / split
    records = []
    for image_id, image_marks in marks.items():
        raters = _unique([mark.rater for mark in image_marks])
        readings = [
            dict.fromkeys(names, 0) | {m.class_name: 1 for m in image_marks if m.rater == rater} for rater in raters
        ]
        records.append(
            Record(
                image_id,
                _image_path(files, folder, image_id),
                _fused_boxes(image_marks, len(raters), fusion),
                vote_labels(readings, fusion.vote_threshold),
                tuple(r for r in raters if r),
            )
        )
    return sorted(records, key=lambda record: record.image_id)


def read_split(
    root: Path, split: str, layout: Layout | Literal["auto"] = "auto", fusion: FusionConfig = FusionConfig()
) -> list[Record]:
    """Records of one split ("train" or "test"), sorted by image id, from any supported layout."""
    if layout == "auto":
        layout = detect_layout(root, split)
    if layout == "vindr":
        return read_vindr_split(root, split, fusion)
    if layout == "kaggle":
        return read_kaggle_split(root, split, fusion)
    raise ValueError(f"unknown dataset layout {layout!r}; expected 'auto' or one of {LAYOUTS}")


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset-layout and rater-fusion flags shared by train, evaluate and export."""
    parser.add_argument(
        "--layout",
        choices=("auto", *LAYOUTS),
        default="auto",
        help="dataset folder layout; auto detects it from the files present",
    )
    parser.add_argument(
        "--fusion-iou",
        type=float,
        default=FusionConfig.iou_threshold,
        help="IoU at or above which boxes of one class from different raters are fused (weighted box fusion)",
    )
    parser.add_argument(
        "--min-raters",
        type=int,
        default=FusionConfig.min_raters,
        help="drop fused boxes marked by fewer raters; capped at the raters who read the image",
    )
    parser.add_argument(
        "--vote-threshold",
        type=float,
        default=FusionConfig.vote_threshold,
        help="an image label is positive when strictly more than this fraction of its raters "
        "marked it (0.5: strict majority, a tie is negative)",
    )


def fusion_from_args(args: argparse.Namespace | dict) -> FusionConfig:
    """FusionConfig from parsed flags, or from a run's saved args (checkpoint.pt keeps them)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    try:
        return FusionConfig(values["fusion_iou"], values["min_raters"], values["vote_threshold"])
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
