"""The dataset writer: phantoms in the exact VinDr-PCXR layout (README.md, "Layout"), in parallel, identical bytes."""

from __future__ import annotations

import csv
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.labels import SYNTHETIC_LOCAL, VINDR_PCXR
from training.synthetic.difficulty import resolve_difficulty
from training.synthetic.encoding import dicom_bytes, resolve_transfer_syntax
from training.synthetic.findings import NO_FINDING
from training.synthetic.instance import image_id_for, synthesize_instance

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


def _image_seed(seed: int, split: str, index: int) -> int:
    ss = np.random.SeedSequence([seed, 0 if split == "train" else 1, index])
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
    difficulty: str = "default",
    size: tuple[int, int] | None = None,
    transfer_syntax: str | None = None,
    workers: int = 1,
) -> None:
    """Write a VinDr-PCXR-layout phantom dataset under `out` (see README.md, "Layout")."""
    out = Path(out)
    resolve_difficulty(difficulty)
    if transfer_syntax is not None:
        resolve_transfer_syntax(transfer_syntax)
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(out), split, i, _image_seed(seed, split, i), difficulty, size, transfer_syntax)
        for split, n in (("train", n_train), ("test", n_test))
        for i in range(n)
    ]
    start = time.perf_counter()
    results = _make_images(jobs, workers)
    per_label: Counter[str] = Counter()
    for split in ("train", "test"):
        per_label += _write_csvs(out, split, [result for result in results if result[0] == split])
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{name}={per_label[name]}" for name in SYNTHETIC_LOCAL)
    rate = len(results) / max(elapsed, 1e-9)
    print(
        f"synthetic: wrote {len(results)} images (train {n_train}, test {n_test}) to {out} in "
        f"{elapsed:.1f} s ({rate:.1f} img/s); images per finding: {counts}"
    )


def _make_images(jobs: list[tuple], workers: int) -> list[tuple]:
    """Every image's (split, image_id, rad_id, findings, labels), in job order, with a progress bar."""
    results: list[tuple] = []
    with tqdm(total=len(jobs), desc="phantoms", unit="img", disable=None) as bar:
        if workers > 1:
            with multiprocessing.Pool(workers) as pool:
                for res in pool.imap(_make_image, jobs, chunksize=2):
                    results.append(res)
                    bar.update()
        else:
            for job in jobs:
                results.append(_make_image(job))
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
