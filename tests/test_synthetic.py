"""Tests for the synthetic VinDr-PCXR phantom generator (training/synthetic/)."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import shlex
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from training import synthetic as S
from training.labels import SYNTHETIC_GLOBAL, SYNTHETIC_LOCAL, VINDR_PCXR
from training.synthetic import findings, instance

SIZE = (256, 224)
LABEL_IDS = {label.name: label.id for label in VINDR_PCXR.labels}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _displayed(ds: pydicom.Dataset) -> np.ndarray:
    """Our own display pipeline: modality LUT -> linear VOI window (PS3.3 C.11.2.1.2.1) or
    min-max when no window -> invert MONOCHROME1. Returns floats in [0, 1]."""
    values = ds.pixel_array.astype(np.float64)
    values = values * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))
    if "WindowCenter" in ds:
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        shown = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    else:
        shown = (values - values.min()) / (values.max() - values.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        shown = 1.0 - shown
    return shown


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    S.generate_dataset(out, n_train=8, n_test=3, seed=3, size=SIZE)
    return out


def test_layout_and_exact_csv_headers(dataset: Path):
    """The output has the VinDr-PCXR folders, CSV names and exact headers, one DICOM per image."""
    for split, n in (("train", 8), ("test", 3)):
        header, rows = _read_csv(dataset / f"annotations_{split}.csv")
        assert header == ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max", "class_id"]
        header, labels = _read_csv(dataset / f"image_labels_{split}.csv")
        assert header == ["image_id", "rad_ID"] + [label.name for label in VINDR_PCXR.labels]
        assert len(labels) == n
        files = sorted(p.name for p in (dataset / split).iterdir())
        assert files == sorted(f"{row['image_id']}.dicom" for row in labels)
        assert {row["image_id"] for row in rows} == {row["image_id"] for row in labels}
        rad = {row["image_id"]: row["rad_ID"] for row in labels}
        for row in rows:
            assert row["rad_id"] == rad[row["image_id"]] and row["rad_id"] in ("R1", "R2", "R3")
            assert int(row["class_id"]) == LABEL_IDS[row["class_name"]]
            if row["class_name"] == "No finding":
                assert row["class_id"] == "37" and row["x_min"] == row["y_max"] == ""
            else:
                assert row["class_name"] in SYNTHETIC_LOCAL


def test_image_id_is_md5_of_sop_instance_uid(dataset: Path):
    """Every file is named by md5(SOPInstanceUID) and carries the phantom disclaimer and tags."""
    for path in sorted(dataset.glob("*/*.dicom")):
        ds = pydicom.dcmread(path)
        assert path.stem == hashlib.md5(ds.SOPInstanceUID.encode()).hexdigest()
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Rows, ds.Columns) == SIZE
        assert S.DISCLAIMER in ds.ImageComments and S.DISCLAIMER in ds.SeriesDescription
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert (ds.SOPClassUID, ds.Modality) in ((instance.DX_SOP_CLASS, "DX"), (instance.CR_SOP_CLASS, "CR"))
        age = ds.PatientAge
        assert len(age) == 4 and age[3] in "MY"
        assert int(age[:3]) < (10 if age[3] == "Y" else 120)
        assert all(0.1 <= float(v) <= 0.2 for v in ds.PixelSpacing)
        assert ds.PatientName.family_name == "PHANTOM"


def test_boxes_inside_image_and_consistent_with_image_labels(dataset: Path):
    """Boxes lie inside the image with 2-decimal coordinates; local label columns match boxes."""
    rows_px, cols_px = SIZE
    for split in ("train", "test"):
        _, boxes = _read_csv(dataset / f"annotations_{split}.csv")
        _, labels = _read_csv(dataset / f"image_labels_{split}.csv")
        per_image: dict[str, set[str]] = {}
        for box in boxes:
            per_image.setdefault(box["image_id"], set())
            if box["class_name"] == "No finding":
                continue
            x0, y0, x1, y1 = (float(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
            assert 0.0 <= x0 < x1 <= cols_px and 0.0 <= y0 < y1 <= rows_px
            for k in ("x_min", "y_min", "x_max", "y_max"):
                assert box[k] == f"{float(box[k]):.2f}"
            per_image[box["image_id"]].add(box["class_name"])
        for row in labels:
            found = per_image[row["image_id"]]
            for label in VINDR_PCXR.local:
                assert row[label.name] == ("1" if label.name in found else "0")
            for label in VINDR_PCXR.global_:
                if label.name not in SYNTHETIC_GLOBAL:
                    assert row[label.name] == "0"
            diseases = any(row[name] == "1" for name in SYNTHETIC_GLOBAL if name != "No finding")
            assert row["No finding"] == ("1" if not found and not diseases else "0")


def test_generation_is_deterministic_and_independent_of_workers(dataset: Path, tmp_path: Path):
    """The same seed gives byte-identical DICOMs and CSVs, with one worker or a process pool."""
    S.generate_dataset(tmp_path / "pool", n_train=8, n_test=3, seed=3, size=SIZE, workers=2)
    pool = tmp_path / "pool"

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(dataset) == files(pool)
    for name in files(dataset):
        assert (dataset / name).read_bytes() == (pool / name).read_bytes(), name
    ds_a, case_a = S.synthesize_instance(11, *SIZE)
    ds_b, case_b = S.synthesize_instance(11, *SIZE)
    assert S.dicom_bytes(ds_a) == S.dicom_bytes(ds_b)
    assert np.array_equal(case_a.density, case_b.density) and case_a.findings == case_b.findings
    assert S.synthesize_instance(12, *SIZE)[0].SOPInstanceUID != ds_a.SOPInstanceUID


@pytest.mark.parametrize("label", SYNTHETIC_LOCAL)
def test_forced_finding_is_planted(label: str):
    """Forcing one finding plants exactly that finding, with a box and its label column set."""
    for seed in (1, 2):
        _, case = S.synthesize_instance(seed, *SIZE, findings=[label])
        assert case.findings and {f.label for f in case.findings} == {label}
        assert case.image_labels[label] == 1 and case.image_labels["No finding"] == 0
        assert sum(case.image_labels[name] for name in SYNTHETIC_LOCAL) == 1
        assert case.density.dtype == np.float32 and case.density.shape == SIZE
        assert case.density.min() >= 0.0 and case.density.max() <= 1.0


def test_forcing_no_findings_gives_a_normal_image():
    """findings=[] gives no boxes and no local labels; unknown finding names are rejected."""
    _, case = S.synthesize_instance(5, *SIZE, findings=[])
    assert case.findings == [] and not any(case.image_labels[n] for n in SYNTHETIC_LOCAL)
    with pytest.raises(ValueError):
        S.synthesize_instance(5, *SIZE, findings=["Pneumothorax"])


ENCODINGS = list(
    itertools.product(("explicit", "implicit", "rle"), ("MONOCHROME1", "MONOCHROME2"), (8, 12, 16), (False, True))
)


@pytest.mark.parametrize("transfer_syntax,photometric,bits,signed", ENCODINGS)
def test_dicom_decodes_and_display_matches_density(transfer_syntax, photometric, bits, signed):
    """Every syntax/photometric/bit depth/sign decodes and displays as the rendered density."""
    for windowed in (True, False):
        ds, case = S.synthesize_instance(
            21,
            *SIZE,
            transfer_syntax=transfer_syntax,
            photometric=photometric,
            bits_stored=bits,
            signed=signed,
            windowed=windowed,
        )
        read = pydicom.dcmread(io.BytesIO(S.dicom_bytes(ds)))
        assert read.preamble == b"\x00" * 128
        assert read.file_meta.TransferSyntaxUID == S.TRANSFER_SYNTAXES[transfer_syntax]
        assert read.PhotometricInterpretation == photometric
        assert read.BitsStored == bits and read.BitsAllocated == (8 if bits == 8 else 16)
        assert read.PixelRepresentation == int(signed)
        assert read.pixel_array.shape == SIZE
        shown = _displayed(read)
        assert _pearson(shown, case.density) > 0.99
        if windowed:  # the window maps the stored range exactly: only quantisation error remains
            assert np.abs(shown - case.density).max() < 0.01
        else:
            assert "WindowCenter" not in read


def test_own_window_helper_agrees_with_pydicom():
    """Our display helper agrees with pydicom's modality LUT + VOI window up to a linear map."""
    ds, _ = S.synthesize_instance(4, *SIZE, bits_stored=12, photometric="MONOCHROME2", windowed=True)
    read = pydicom.dcmread(io.BytesIO(S.dicom_bytes(ds)))
    theirs = apply_voi_lut(apply_modality_lut(read.pixel_array, read), read)
    assert _pearson(theirs, _displayed(read)) > 0.999


def test_easy_findings_have_more_contrast_than_default():
    """The same planted nodule changes the image more under 'easy' than under 'default'."""

    def lift(difficulty: str, seed: int) -> float:
        preset = S.resolve_difficulty(difficulty)
        base = S.render_case(np.random.default_rng(seed), *SIZE, preset, [])
        case = S.render_case(np.random.default_rng(seed), *SIZE, preset, ["Other opacity"])
        (box,) = case.findings
        sl = (slice(int(box.y_min), int(np.ceil(box.y_max))), slice(int(box.x_min), int(np.ceil(box.x_max))))
        return float((case.density[sl] - base.density[sl]).mean())

    for seed in (0, 1, 2):
        assert lift("easy", seed) > lift("default", seed) > 0.0


def test_finding_mix_and_disease_rules():
    """~45% of draws are normal, every finding is common enough, and diseases follow findings."""
    rng = np.random.default_rng(0)
    difficulty = S.resolve_difficulty("default")
    draws = [findings.draw_findings(rng) for _ in range(4000)]
    assert 0.40 < np.mean([not d for d in draws]) < 0.50
    rates = {name: np.mean([name in d for d in draws]) for name in SYNTHETIC_LOCAL}
    assert min(rates.values()) > 0.05 and max(rates, key=rates.get) == findings.PIO
    labels = [findings.disease_labels(rng, set(d), difficulty) for d in draws]
    with_cons = [lab["Pneumonia"] for d, lab in zip(draws, labels) if findings.CONSOLIDATION in d]
    without = [lab["Pneumonia"] for d, lab in zip(draws, labels) if findings.CONSOLIDATION not in d]
    assert np.mean(with_cons) > 0.8 and np.mean(without) < 0.05
    for d, lab in zip(draws, labels):
        disease = any(lab[n] for n in SYNTHETIC_GLOBAL if n != "No finding")
        assert lab["No finding"] == int(not d and not disease)


def test_cli_writes_dataset_and_summary(tmp_path: Path, capsys):
    """`python -m training.synthetic` options produce the dataset and a one-line summary."""
    options = shlex.split("--n-train 2 --n-test 1 --seed 9 --difficulty easy --size 128x112 --transfer-syntax rle")
    S.main(["--out", str(tmp_path), *options])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("synthetic: wrote 3 images")
    files = sorted(tmp_path.glob("*/*.dicom"))
    assert len(files) == 3
    for path in files:
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
