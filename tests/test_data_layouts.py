"""Dataset readers: VinDr-PCXR, VinDr-CXR (PhysioNet) and VinBigData Kaggle layouts from tiny hand-written CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from training.data import Box, Record, detect_layout, read_split
from training.fusion import FusionConfig


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


@pytest.fixture
def pcxr(tmp_path) -> Path:
    """VinDr-PCXR: one reader per image, CSVs at the top, columns shuffled, one .dcm file and one image missing."""
    _touch(tmp_path / "train", "img_a.dicom", "img_b.dcm")
    _write_csv(
        tmp_path / "image_labels_train.csv",
        ["Pneumonia", "image_id", "No finding", "rad_ID", "Consolidation"],
        [
            ["1", "img_b", "0", "R2", "1"],
            ["0", "img_a", "1", "R1", "0"],
            ["0", "img_c", "", "R3", "0"],
        ],
    )
    _write_csv(
        tmp_path / "annotations_train.csv",
        ["class_id", "x_max", "image_id", "class_name", "y_min", "rad_id", "x_min", "y_max"],
        [
            ["11", "110", "img_b", "Consolidation", "20", "R2", "10", "220"],
            ["11", "115", "img_b", "Consolidation", "20", "R2", "15", "220"],  # same reader, overlapping: two findings
            ["37", "", "img_a", "No finding", "", "R1", "", ""],
        ],
    )
    return tmp_path


def test_pcxr_layout_reads_rows_as_written(pcxr):
    """Single-reader images keep every box and label as written; .dcm files are found; records sorted by id."""
    assert detect_layout(pcxr, "train") == "vindr"
    assert read_split(pcxr, "train") == [
        Record(
            "img_a", pcxr / "train" / "img_a.dicom", (), {"Pneumonia": 0, "No finding": 1, "Consolidation": 0}, ("R1",)
        ),
        Record(
            "img_b",
            pcxr / "train" / "img_b.dcm",
            (Box("Consolidation", 10.0, 20.0, 110.0, 220.0), Box("Consolidation", 15.0, 20.0, 115.0, 220.0)),
            {"Pneumonia": 1, "No finding": 0, "Consolidation": 1},
            ("R2",),
        ),
        Record(
            "img_c", pcxr / "train" / "img_c.dicom", (), {"Pneumonia": 0, "No finding": 0, "Consolidation": 0}, ("R3",)
        ),
    ]


def test_fusion_settings_do_not_touch_single_reader_images(pcxr):
    """min_raters and the vote threshold are capped at one reader, so a PCXR image reads the same under any setting."""
    assert read_split(pcxr, "train", fusion=FusionConfig(min_raters=3, vote_threshold=0.9)) == read_split(pcxr, "train")


@pytest.fixture
def vindr_cxr(tmp_path) -> Path:
    """VinDr-CXR (PhysioNet): CSVs in annotations/, three readers per training image, consensus test without rad_id."""
    _touch(tmp_path / "train", "x1.dicom", "x2.dicom")
    _touch(tmp_path / "test", "t1.dcm")
    labels = ["image_id", "rad_ID", "Aortic enlargement", "ILD", "Nodule/Mass", "No finding", "Other diseases"]
    _write_csv(
        tmp_path / "annotations" / "image_labels_train.csv",
        labels,
        [
            ["x1", "R1", "1", "0", "1", "0", "1"],
            ["x1", "R2", "1", "0", "0", "0", "0"],
            ["x1", "R3", "0", "0", "0", "1", "0"],
            ["x2", "R1", "0", "0", "0", "1", "0"],
            ["x2", "R4", "0", "0", "0", "1", "0"],
            ["x2", "R5", "0", "0", "0", "1", "0"],
        ],
    )
    _write_csv(
        tmp_path / "annotations" / "annotations_train.csv",
        ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
        [
            ["x1", "R1", "Aortic enlargement", "100", "100", "200", "200"],
            ["x1", "R1", "Nodule/Mass", "300", "300", "340", "340"],
            ["x1", "R2", "Aortic enlargement", "110", "100", "210", "200"],  # IoU 0.82 with R1's: fused
            ["x1", "R2", "ILD", "10", "10", "50", "50"],
            ["x1", "R3", "No finding", "", "", "", ""],
            ["x2", "R1", "No finding", "", "", "", ""],
            ["x2", "R4", "No finding", "", "", "", ""],
            ["x2", "R5", "No finding", "", "", "", ""],
        ],
    )
    _write_csv(
        tmp_path / "annotations" / "image_labels_test.csv",
        ["image_id", "Aortic enlargement", "Other disease", "No finding"],
        [["t1", "1", "1", "0"]],
    )
    _write_csv(
        tmp_path / "annotations" / "annotations_test.csv",
        ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
        [
            ["t1", "Aortic enlargement", "100", "100", "200", "200"],
            ["t1", "Aortic enlargement", "110", "100", "210", "200"],
        ],
    )
    return tmp_path


def test_vindr_cxr_training_readers_are_fused(vindr_cxr):
    """Three readers: overlapping boxes fuse to their mean (support 2), single marks stay (1), labels by 2-of-3 vote."""
    records = read_split(vindr_cxr, "train")
    assert [record.image_id for record in records] == ["x1", "x2"]
    x1, x2 = records
    assert x1.path == vindr_cxr / "train" / "x1.dicom" and x1.raters == ("R1", "R2", "R3")
    assert x1.boxes == (
        Box("Aortic enlargement", 105.0, 100.0, 205.0, 200.0, support=2),
        Box("Nodule/Mass", 300.0, 300.0, 340.0, 340.0, support=1),
        Box("Interstitial lung disease (ILD)", 10.0, 10.0, 50.0, 50.0, support=1),
    )
    assert x1.image_labels == {
        "Aortic enlargement": 1,
        "Interstitial lung disease (ILD)": 0,
        "Nodule/Mass": 0,
        "No finding": 0,
        "Other diseases": 0,
    }
    assert x2.boxes == () and x2.raters == ("R1", "R4", "R5")
    assert x2.image_labels == {
        "Aortic enlargement": 0,
        "Interstitial lung disease (ILD)": 0,
        "Nodule/Mass": 0,
        "No finding": 1,
        "Other diseases": 0,
    }


def test_vindr_cxr_fusion_settings(vindr_cxr):
    """min_raters=2 drops single marks; vote threshold 0 makes any reader's label positive."""
    x1 = read_split(vindr_cxr, "train", fusion=FusionConfig(min_raters=2, vote_threshold=0.0))[0]
    assert x1.boxes == (Box("Aortic enlargement", 105.0, 100.0, 205.0, 200.0, support=2),)
    assert x1.image_labels == {
        "Aortic enlargement": 1,
        "Interstitial lung disease (ILD)": 0,
        "Nodule/Mass": 1,
        "No finding": 1,
        "Other diseases": 1,
    }


def test_vindr_cxr_consensus_test_split_is_not_fused(vindr_cxr):
    """The test CSVs (consensus, no rad_id) keep both overlapping boxes; 'Other disease' reads as 'Other diseases'."""
    assert read_split(vindr_cxr, "test") == [
        Record(
            "t1",
            vindr_cxr / "test" / "t1.dcm",
            (
                Box("Aortic enlargement", 100.0, 100.0, 200.0, 200.0),
                Box("Aortic enlargement", 110.0, 100.0, 210.0, 200.0),
            ),
            {"Aortic enlargement": 1, "Other diseases": 1, "No finding": 0},
            (),
        )
    ]


@pytest.fixture
def kaggle(tmp_path) -> Path:
    """VinBigData Kaggle: one train.csv, columns shuffled, rad_ID spelling, "No finding" rows without coordinates."""
    _touch(tmp_path / "train", "k1.dicom", "k2.dicom")
    _touch(tmp_path / "test", "k9.dicom")
    _write_csv(
        tmp_path / "train.csv",
        ["rad_ID", "x_min", "image_id", "y_max", "class_name", "x_max", "class_id", "y_min"],
        [
            ["R8", "600", "k1", "1300", "Cardiomegaly", "1400", "3", "1000"],
            ["R9", "620", "k1", "1300", "Cardiomegaly", "1420", "3", "1000"],
            ["R10", "", "k1", "", "No finding", "", "14", ""],
            ["R9", "100", "k1", "400", "ILD", "300", "5", "100"],
            ["R8", "", "k2", "", "No finding", "", "14", ""],
            ["R9", "", "k2", "", "No finding", "", "14", ""],
            ["R10", "", "k2", "", "No finding", "", "14", ""],
        ],
    )
    return tmp_path


def test_kaggle_layout_labels_come_from_the_marked_classes(kaggle):
    """Kaggle train.csv: boxes fused across raters; image labels are the 2-of-3 vote on the classes raters marked."""
    assert detect_layout(kaggle, "train") == "kaggle"
    assert read_split(kaggle, "train") == [
        Record(
            "k1",
            kaggle / "train" / "k1.dicom",
            (
                Box("Cardiomegaly", 610.0, 1000.0, 1410.0, 1300.0, support=2),
                Box("Interstitial lung disease (ILD)", 100.0, 100.0, 300.0, 400.0, support=1),
            ),
            {"Cardiomegaly": 1, "No finding": 0, "Interstitial lung disease (ILD)": 0},
            ("R8", "R9", "R10"),
        ),
        Record(
            "k2",
            kaggle / "train" / "k2.dicom",
            (),
            {"Cardiomegaly": 0, "No finding": 1, "Interstitial lung disease (ILD)": 0},
            ("R8", "R9", "R10"),
        ),
    ]


def test_kaggle_layout_has_no_test_labels(kaggle):
    """The Kaggle release has no test labels: reading its test split names the missing test.csv."""
    with pytest.raises(FileNotFoundError, match=r"test\.csv is missing.*labels for train only"):
        read_split(kaggle, "test")


def test_physionet_csvs_win_over_kaggle_and_layout_can_be_forced(pcxr):
    """A folder with both layouts is read as PhysioNet unless layout='kaggle' is asked for."""
    _write_csv(
        pcxr / "train.csv",
        ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"],
        [["img_a", "No finding", "14", "R1", "", "", "", ""]],
    )
    assert detect_layout(pcxr, "train") == "vindr"
    assert [r.image_labels for r in read_split(pcxr, "train", layout="kaggle")] == [{"No finding": 1}]


def test_folder_without_a_layout_names_what_was_expected(tmp_path):
    """An empty folder fails with FileNotFoundError listing both layouts' files; a missing folder says so."""
    with pytest.raises(FileNotFoundError, match=r"matches no dataset layout.*image_labels_train\.csv.*train\.csv"):
        read_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_split(tmp_path / "absent", "train")


def test_half_a_layout_names_the_missing_file(tmp_path):
    """Annotations without image labels, or CSVs without the image folder, name the missing path."""
    _write_csv(tmp_path / "annotations_train.csv", ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"], [])
    with pytest.raises(FileNotFoundError, match=r"image_labels_train\.csv is missing"):
        read_split(tmp_path, "train")
    _write_csv(tmp_path / "image_labels_train.csv", ["image_id", "No finding"], [])
    with pytest.raises(FileNotFoundError, match=r"train is missing"):
        read_split(tmp_path, "train")


def test_missing_annotation_column_is_named(pcxr):
    """Annotations without a coordinate column fail with ValueError naming the file and the column."""
    _write_csv(pcxr / "annotations_train.csv", ["image_id", "rad_id", "class_name", "x_min", "y_min", "y_max"], [])
    with pytest.raises(ValueError, match=r"annotations_train\.csv has no 'x_max' column"):
        read_split(pcxr, "train")


def test_kaggle_csv_without_rater_column_is_rejected(kaggle):
    """Kaggle's train.csv must say which rater drew each row: without rad_id fusion is impossible, so it fails."""
    _write_csv(kaggle / "train.csv", ["image_id", "class_name", "class_id", "x_min", "y_min", "x_max", "y_max"], [])
    with pytest.raises(ValueError, match=r"train\.csv has no 'rad_id' column"):
        read_split(kaggle, "train")


def test_image_labels_without_image_id_column(pcxr):
    """image_labels without image_id fails with ValueError naming the column."""
    _write_csv(pcxr / "image_labels_train.csv", ["id", "rad_ID", "No finding"], [["img_a", "R1", "1"]])
    with pytest.raises(ValueError, match=r"image_labels_train\.csv has no 'image_id' column"):
        read_split(pcxr, "train")


def test_unknown_layout_name_is_rejected(pcxr):
    """Only 'auto', 'vindr' and 'kaggle' are layouts."""
    with pytest.raises(ValueError, match="unknown dataset layout 'physionet'"):
        read_split(pcxr, "train", layout="physionet")  # type: ignore[arg-type]
