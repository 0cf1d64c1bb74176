"""Accepting a pack version: fp32 and fp16 evaluations recorded in the manifest with the test split's identity; test
splits that overlap what the pack was fitted on, a second test split, and splits used before re-tuning are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training import calibrate, evaluate
from training.splits import image_ids_sha256


@pytest.fixture
def pack(tiny_pack, tmp_path) -> Path:
    copy = tmp_path / "pack"
    shutil.copytree(tiny_pack, copy)
    return copy


def _evaluate(pack: Path, data: Path, *extra: str) -> dict:
    args = ["--pack", str(pack), "--data", str(data), "--bootstrap", "20", "--threads", "1", *extra]
    return evaluate.main(evaluate.get_args_parser().parse_args(args))


def _manifest(pack: Path) -> dict:
    return json.loads((pack / "manifest.json").read_text())


def test_fp16_and_fp32_evaluations_are_recorded_with_the_test_split(pack, tiny_dataset):
    """--precision fp16 runs on CPU and writes *.fp16 reports; --record puts both precisions' headline metrics, their
    difference and the split's seed, difficulty, count and id hash into the manifest."""
    fp16 = _evaluate(pack, tiny_dataset, "--split", "test", "--precision", "fp16", "--record")
    assert fp16["runtime"] == {"provider": "CPUExecutionProvider", "precision": "fp16"}
    for name in ("evaluation_test.fp16.json", "evaluation_test.fp16.md", "reliability_test.fp16.png"):
        assert (pack / name).is_file(), name
    fp32 = _evaluate(pack, tiny_dataset, "--split", "test", "--precision", "fp32", "--record")
    manifest = _manifest(pack)
    test_ids = sorted(path.stem for path in (tiny_dataset / "test").glob("*.dicom"))
    assert manifest["acceptance_test"] | {"data": None} == {
        "data": None,
        "split": "test",
        "generator": "training.synthetic",
        "seed": 7,
        "difficulty": "easy",
        "images": len(test_ids),
        "image_ids_sha256": image_ids_sha256(test_ids),
        "precisions": ["fp16", "fp32"],
    }
    recorded = manifest["evaluation_by_precision"]
    assert recorded["fp32"]["detection"]["map40"] == fp32["detection"]["map40"]
    assert recorded["fp16"]["classification"]["mean_auroc"] == fp16["classification"]["mean_auroc"]
    assert manifest["evaluation"] == recorded["fp32"]
    difference = manifest["precision_difference"]["fp16_minus_fp32"]
    assert difference["mean_auroc"] == pytest.approx(
        fp16["classification"]["mean_auroc"] - fp32["classification"]["mean_auroc"]
    )


def test_a_split_overlapping_the_training_images_is_refused(pack, tiny_dataset):
    """The pack's own training split is no test: refused, or reported as not independent with --allow-seen-images."""
    with pytest.raises(SystemExit, match="shares images with what pack"):
        _evaluate(pack, tiny_dataset, "--split", "train")
    report = _evaluate(pack, tiny_dataset, "--split", "train", "--allow-seen-images", "--out", str(pack / "seen"))
    assert report["independence"]["independent"] is False and report["independence"]["shared"]["train"] > 0
    assert "NOT AN INDEPENDENT EVALUATION" in (pack / "seen" / "evaluation_train.md").read_text()
    with pytest.raises(SystemExit, match="--record needs an independent test split"):
        _evaluate(pack, tiny_dataset, "--split", "train", "--allow-seen-images", "--record")


def test_a_version_is_accepted_on_one_test_split_and_retuning_retires_it(pack, tiny_dataset, tmp_path):
    """Recording a second test split is refused; re-calibrating retires the accepted split, which may then not accept
    the re-tuned pack."""
    from training.synthetic import generate_dataset

    _evaluate(pack, tiny_dataset, "--split", "test", "--precision", "fp32", "--record")
    with pytest.raises(SystemExit, match="accepted on another test split"):
        _evaluate(pack, tiny_dataset, "--split", "test", "--precision", "fp32", "--record", "--limit", "4")
    with pytest.raises(SystemExit, match="acceptance test split"):
        calibrate.main(
            calibrate.get_args_parser().parse_args(
                ["--pack", str(pack), "--data", str(tiny_dataset), "--split", "test"]
            )
        )
    validation = tmp_path / "validation-set"
    generate_dataset(validation, n_train=0, n_validation=6, n_test=0, seed=8, difficulty="easy", size=(400, 336))
    calibrate.main(
        calibrate.get_args_parser().parse_args(
            ["--pack", str(pack), "--data", str(validation), "--split", "validation", "--version", "9.9.9"]
        )
    )
    manifest = _manifest(pack)
    assert "acceptance_test" not in manifest and manifest["version"] == "9.9.9"
    assert manifest["retired_test_splits"][0]["split"] == "test"
    assert manifest["data_splits"]["calibration"]["images"] == 6
    with pytest.raises(SystemExit, match="re-tuned after this test split"):
        _evaluate(pack, tiny_dataset, "--split", "test", "--precision", "fp32", "--record")
