"""Independent splits: every phantom is its own case across seed, difficulty and split, and the near-duplicate check
passes a clean dataset and fails one with a planted near-copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import near_duplicates
from training.splits import image_ids_sha256, overlap, refuse_overlap
from training.synthetic import (
    TRANSFER_SYNTAXES,
    dicom_bytes,
    encode_dataset,
    generate_dataset,
    image_id_for,
    resolve_difficulty,
    synthesize_instance,
)
from training.synthetic.dataset import _image_seed

SIZE = (320, 256)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    generate_dataset(root, n_train=12, n_validation=5, n_test=6, seed=21, size=SIZE)
    return root


def _check(report: Path, *args: str | Path) -> tuple[int, dict]:
    """Run the command as the recipe does; (exit status, its JSON report)."""
    parsed = near_duplicates.get_args_parser().parse_args([*map(str, args), "--workers", "1", "--report", str(report)])
    status = near_duplicates.main(parsed)
    return status, json.loads(report.read_text())


def test_image_seeds_are_unique_across_seed_difficulty_split_and_index():
    """No two (seed, difficulty, split, index) share an image seed."""
    seeds = {
        _image_seed(seed, split, index, resolve_difficulty(difficulty))
        for seed in (0, 1)
        for difficulty in ("easy", "default", "hard")
        for split in ("train", "validation", "test")
        for index in range(20)
    }
    assert len(seeds) == 2 * 3 * 3 * 20


def test_easy_and_default_datasets_of_one_seed_hold_different_patients():
    """Same --seed, same index, other difficulty: a different patient (age, sex, findings), not the same case
    re-rendered."""
    patients = {}
    for difficulty in ("easy", "default"):
        preset = resolve_difficulty(difficulty)
        cases = [
            synthesize_instance(_image_seed(0, "train", i, preset), 96, 80, difficulty=preset)[1] for i in range(8)
        ]
        patients[difficulty] = [(case.age_months, case.sex, sorted(f.label for f in case.findings)) for case in cases]
    assert sum(a == b for a, b in zip(patients["easy"], patients["default"])) <= 1


def test_clean_dataset_passes(clean, tmp_path):
    """Independently drawn train, validation and test phantoms: no pair reaches the threshold."""
    status, report = _check(tmp_path / "report.json", clean)
    assert status == 0 and report["pairs"] == []
    assert report["summary"]["images"] == {"train": 12, "validation": 5, "test": 6}
    assert max(report["summary"]["highest_correlation"].values()) < near_duplicates.DEFAULT_THRESHOLD


def _plant_near_copy(destination: Path, seed_index: int) -> str:
    """A training phantom stored again another way (MONOCHROME1 instead of its own interpretation, 12 bits, lossy
    JPEG 2000), at 80% of its size and with a little noise, under a new SOP Instance UID; returns its image id."""
    preset = resolve_difficulty("default")
    ds, _ = synthesize_instance(
        _image_seed(21, "train", seed_index, preset),
        *SIZE,
        difficulty=preset,
        photometric="MONOCHROME1",
        bits_stored=12,
    )
    pixels = ds.pixel_array.astype(np.float64)
    smaller = np.asarray(Image.fromarray(pixels.astype(np.float32)).resize((SIZE[1] * 4 // 5, SIZE[0] * 4 // 5)))
    noisy = smaller + np.random.default_rng(0).normal(0, 10, size=smaller.shape)
    ds.set_pixel_data(np.clip(noisy, 0, 4095).astype(np.uint16), "MONOCHROME1", 12, generate_instance_uid=True)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    encode_dataset(ds, TRANSFER_SYNTAXES["j2k-lossy"])
    image_id = image_id_for(ds.SOPInstanceUID)
    (destination / f"{image_id}.dicom").write_bytes(dicom_bytes(ds))
    return image_id


def test_planted_near_copy_fails_the_check(clean, tmp_path):
    """A training image stored another way, resized and noised, placed in the test split, is found (and only it)."""
    planted = tmp_path / "planted"
    shutil.copytree(clean, planted)
    with (planted / "image_labels_train.csv").open() as handle:
        train_ids = [line.split(",")[0] for line in handle.read().splitlines()[1:]]
    copy_id = _plant_near_copy(planted / "test", seed_index=3)
    status, report = _check(tmp_path / "report.json", planted)
    assert status == 1
    flagged = {(p["first"]["image_id"], p["second"]["image_id"]) for p in report["pairs"]}
    assert flagged == {(train_ids[3], copy_id)}
    assert report["pairs"][0]["similarity"] >= near_duplicates.DEFAULT_THRESHOLD


def test_same_image_in_two_splits_fails_the_check(clean, tmp_path):
    """The very same file in train and validation is found by its image id and its pixels."""
    planted = tmp_path / "planted"
    shutil.copytree(clean, planted)
    first = sorted((planted / "train").glob("*.dicom"))[0]
    shutil.copy(first, planted / "validation" / first.name)
    status, report = _check(tmp_path / "report.json", planted)
    assert status == 1
    assert {p["reason"] for p in report["pairs"]} >= {"same image id", "identical pixels"}


def test_run_splits_divide_a_train_folder(clean, tmp_path):
    """With --run, the run's validation images are their own role, compared against its training images."""
    run = tmp_path / "run"
    run.mkdir()
    ids = sorted(path.stem for path in (clean / "train").glob("*.dicom"))
    (run / "splits.json").write_text(json.dumps({"train": ids[:9], "validation": ids[9:]}))
    status, report = _check(tmp_path / "report.json", clean, "--run", run)
    assert status == 0 and report["summary"]["images"] == {"train": 9, "validation": 8, "test": 6}


def test_overlap_with_fitted_images_is_refused():
    """A split sharing ids with what a pack or run was fitted on is refused, naming the roles and counts."""
    fitted = {"train": ["a", "b"], "validation": ["c"], "calibration": ["d"], "other": ["e"]}
    assert overlap(["a", "c", "e", "x"], fitted) == {"train": 1, "validation": 1}
    with pytest.raises(SystemExit, match="1 of its train images, 1 of its validation images"):
        refuse_overlap(["a", "c"], fitted, "test", "the pack")
    refuse_overlap(["x", "e"], fitted, "test", "the pack")
    assert image_ids_sha256(["b", "a", "a"]) == image_ids_sha256(["a", "b"])
