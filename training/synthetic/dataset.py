"""The dataset writer: phantoms in the exact VinDr-PCXR layout (README.md, "Layout"), in parallel, identical bytes."""

from __future__ import annotations

import csv
import json
import time
import zlib
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.labels import SYNTHETIC_LOCAL, VINDR_PCXR
from training.parallel import ordered_map
from training.splits import image_ids_sha256
from training.synthetic.difficulty import Difficulty, resolve_difficulty
from training.synthetic.encoding import dicom_bytes, resolve_transfer_syntax
from training.synthetic.findings import NO_FINDING
from training.synthetic.instance import DISCLAIMER, image_id_for, synthesize_instance

ANNOTATION_HEADER = (
    "image_id",
    "rad_id",
    "class_name",
    "x_min",
    "y_min",
    "x_max",
    "y_max",
    "class_id",
)
IMAGE_LABEL_HEADER = ("image_id", "rad_ID", *tuple(label.name for label in VINDR_PCXR.labels))
# The splits a dataset can have, in the order they are written. "validation" is an addition to the
# papers' train/test layout (same folder and CSV naming), so calibration and operating points can be
# fitted on phantoms drawn independently of the training ones.
SPLITS = ("train", "validation", "test")
_SPLIT_CODES = {"train": 0, "test": 1, "validation": 2}
PROVENANCE_FILE = "dataset.json"


def _difficulty_code(difficulty: Difficulty) -> int:
    """A stable number for a difficulty preset and all its parameters (a custom preset gets its own)."""
    return zlib.crc32(repr(difficulty).encode())


def _image_seed(seed: int, split: str, index: int, difficulty: Difficulty) -> int:
    """The seed of one image: every (seed, difficulty, split, index) draws its own phantom.

    The difficulty is part of it so that an easy and a default dataset of one --seed hold different
    patients (before, their images were the same cases re-rendered, and a curriculum's validation
    split was made of near-copies of images trained on).
    """
    ss = np.random.SeedSequence([seed, _SPLIT_CODES[split], index, _difficulty_code(difficulty)])
    return int(ss.generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def _random_size(image_seed: int) -> tuple[int, int]:
    rng = np.random.default_rng([image_seed, 7])
    rows = int(np.clip(round(rng.normal(1643, 110)), 1400, 1900))
    cols = int(np.clip(round(rows * rng.uniform(0.76, 0.88)), 1150, 1600))
    return rows, cols


def _make_image(job: tuple) -> tuple:
    out, split, _index, image_seed, difficulty, size, transfer_syntax = job
    rows, cols = size if size is not None else _random_size(image_seed)
    ds, case = synthesize_instance(image_seed, rows, cols, difficulty=difficulty, transfer_syntax=transfer_syntax)
    image_id = image_id_for(ds.SOPInstanceUID)
    (Path(out) / split / f"{image_id}.dicom").write_bytes(dicom_bytes(ds))
    rad_id = f"R{int(np.random.default_rng([image_seed, 11]).integers(1, 4))}"
    return split, image_id, rad_id, case.findings, case.image_labels


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def generate_dataset(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    n_validation: int = 0,
    difficulty: str = "default",
    size: tuple[int, int] | None = None,
    transfer_syntax: str | None = None,
    workers: int = 1,
) -> None:
    """Write a VinDr-PCXR-layout phantom dataset under `out` (see README.md, "Layout").

    train/ and test/ are always written (empty when their count is 0), validation/ only when
    `n_validation` > 0; dataset.json records how the dataset was made.
    """
    out = Path(out)
    preset = resolve_difficulty(difficulty)
    if transfer_syntax is not None:
        resolve_transfer_syntax(transfer_syntax)
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    splits = [split for split in SPLITS if counts[split] > 0 or split != "validation"]
    for split in splits:
        (out / split).mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(out), split, i, _image_seed(seed, split, i, preset), difficulty, size, transfer_syntax)
        for split in splits
        for i in range(counts[split])
    ]
    start = time.perf_counter()
    results = _make_images(jobs, workers)
    per_label: Counter[str] = Counter()
    for split in splits:
        per_label += _write_csvs(out, split, [result for result in results if result[0] == split])
    _write_provenance(
        out, seed, preset, size, transfer_syntax, {split: [r[1] for r in results if r[0] == split] for split in splits}
    )
    elapsed = time.perf_counter() - start
    finding_counts = ", ".join(f"{name}={per_label[name]}" for name in SYNTHETIC_LOCAL)
    rate = len(results) / max(elapsed, 1e-9)
    split_counts = ", ".join(f"{split} {counts[split]}" for split in splits)
    print(
        f"synthetic: wrote {len(results)} images ({split_counts}) to {out} in "
        f"{elapsed:.1f} s ({rate:.1f} img/s); images per finding: {finding_counts}"
    )


def _write_provenance(
    out: Path,
    seed: int,
    difficulty: Difficulty,
    size: tuple[int, int] | None,
    transfer_syntax: str | None,
    image_ids: dict[str, list[str]],
) -> None:
    """dataset.json: the generator's settings and, per split, the image count and the hash of its id list.

    Evaluation copies this into its report, so a pack's manifest says exactly which phantoms accepted it.
    """
    provenance = {
        "generator": "training.synthetic",
        "disclaimer": DISCLAIMER,
        "seed": seed,
        "difficulty": difficulty.name,
        "difficulty_parameters": asdict(difficulty),
        "size": list(size) if size is not None else None,
        "transfer_syntax": transfer_syntax,
        "splits": {
            split: {"images": len(ids), "image_ids_sha256": image_ids_sha256(ids)} for split, ids in image_ids.items()
        },
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def _make_images(jobs: list[tuple], workers: int) -> list[tuple]:
    """Every image's (split, image_id, rad_id, findings, labels), in job order, with a progress bar."""
    results: list[tuple] = []
    with tqdm(total=len(jobs), desc="phantoms", unit="img", disable=None) as bar:
        for result in ordered_map(_make_image, jobs, workers, chunksize=2):
            results.append(result)
            bar.update()
    return results


def _write_csvs(out: Path, split: str, results: list[tuple]) -> Counter[str]:
    """annotations_<split>.csv and image_labels_<split>.csv; returns how many images have each local label."""
    per_label: Counter[str] = Counter()
    with (
        (out / f"annotations_{split}.csv").open("w", newline="") as fa,
        (out / f"image_labels_{split}.csv").open("w", newline="") as fl,
    ):
        ann, lab = csv.writer(fa), csv.writer(fl)
        ann.writerow(ANNOTATION_HEADER)
        lab.writerow(IMAGE_LABEL_HEADER)
        for _, image_id, rad_id, findings, labels in results:
            for f in findings:
                ann.writerow(
                    [
                        image_id,
                        rad_id,
                        f.label,
                        _fmt(f.x_min),
                        _fmt(f.y_min),
                        _fmt(f.x_max),
                        _fmt(f.y_max),
                        VINDR_PCXR.by_name(f.label).id,
                    ]
                )
            if not findings:
                ann.writerow([image_id, rad_id, NO_FINDING, "", "", "", "", VINDR_PCXR.by_name(NO_FINDING).id])
            lab.writerow([image_id, rad_id, *(labels[name] for name in IMAGE_LABEL_HEADER[2:])])
            per_label.update({f.label for f in findings})
    return per_label
