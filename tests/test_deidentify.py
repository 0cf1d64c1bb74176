"""De-identification (the VinDr papers' scheme): only the VinDr-PCXR Table 3 tags (+ what a valid file needs) survive,
files are named by the hashed SOP Instance UID, pixels are untouched, and no PHI reaches the output
or the console."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_description, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.misc import warn_and_log

from service.dicom.pipeline import InputSpec, prepare
from service.dicom.preprocess import Normalization
from training import deidentify as D
from training.synthetic import dicom_bytes, synthesize_instance

SIZE = 64  # rows and columns: tiny phantoms keep the file fast on two cores
SPEC = InputSpec(size=64, normalization=Normalization(mean=0.5, std=0.25))
REPO = Path(__file__).resolve().parent.parent

PATIENT_NAME = "DOE^JANE^MARIE"
PHI_TEXT = {  # keyword -> a value that must not survive (distinctive, so no accidental match in pixels)
    "PatientName": PATIENT_NAME,
    "PatientID": "MRN-83920174",
    "PatientBirthDate": "20190412",
    "InstitutionName": "Saint Example Childrens Hospital",
    "InstitutionAddress": "12 Privet Drive Springfield",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "OperatorsName": "SMITH^ANNA",
    "PerformingPhysicianName": "CUDDY^LISA",
    "AccessionNumber": "ACC99887766",
    "StationName": "XRAYROOM7",
    "StudyDescription": "CHEST PA for Jane Doe",
    "StudyID": "STUDY-31337",
    "DeviceSerialNumber": "SN-XR-000451",
}
NESTED_PHI = ("OTHERMRN-4711", "Example Clinic Registry", "REQ-5550123", "WATSON^JOHN")
PRIVATE_PHI = "private MRN-83920174 DOE^JANE^MARIE"
OVERLAY_PHI = "overlay says DOE JANE"
CURVE_PHI = "curve of JANE DOE"
AE_TITLE = "HOSPITAL_PACS_AE"
PREAMBLE_PHI = b"DOE^JANE^MARIE polyglot preamble"


def phi_instance(seed: int = 1, transfer_syntax: str = "explicit", **kwargs) -> Dataset:
    """A phantom loaded with PHI everywhere a real export puts it: patient/study tags, a nested
    sequence, OtherPatientIDsSequence, a private block, an overlay, a curve, the File Meta and the preamble."""
    ds, _ = synthesize_instance(seed, SIZE, SIZE, transfer_syntax=transfer_syntax, **kwargs)
    for keyword, value in PHI_TEXT.items():
        setattr(ds, keyword, value)
    ds.ImageComments = f"portable film, patient {PATIENT_NAME}"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = NESTED_PHI[0], NESTED_PHI[1]
    ds.OtherPatientIDsSequence = [other]
    referenced = Dataset()  # two levels deep, quoting the original study UID
    referenced.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    request = Dataset()
    request.RequestedProcedureID = NESTED_PHI[2]
    request.ScheduledPerformingPhysicianName = NESTED_PHI[3]
    request.ReferencedStudySequence = [referenced]
    ds.RequestAttributesSequence = [request]
    block = ds.private_block(0x0009, "ACME PHI 1.0", create=True)
    block.add_new(0x01, "LO", PRIVATE_PHI)
    block.add_new(0x02, "UN", PATIENT_NAME.encode())
    ds.add(DataElement(0x60000010, "US", SIZE))  # overlay plane: rows, columns, data, description
    ds.add(DataElement(0x60000011, "US", SIZE))
    ds.add(DataElement(0x60000022, "LO", OVERLAY_PHI))
    ds.add(DataElement(0x60003000, "OW", bytes(SIZE * SIZE // 8)))
    ds.add(DataElement(0x50002500, "LO", CURVE_PHI))  # retired curve module, still in old archives
    ds.file_meta.SourceApplicationEntityTitle = AE_TITLE
    ds.preamble = PREAMBLE_PHI.ljust(128, b"\0")
    return ds


def phi_strings(ds: Dataset) -> list[bytes]:
    """Every identifying string planted by phi_instance, plus the original UIDs and dates."""
    texts = [
        *PHI_TEXT.values(),
        *NESTED_PHI,
        PRIVATE_PHI,
        OVERLAY_PHI,
        CURVE_PHI,
        AE_TITLE,
        PATIENT_NAME,
        "Jane Doe",
        "DOE JANE",
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.StudyDate,
    ]
    return [text.encode() for text in texts] + [PREAMBLE_PHI]


def read_back(ds: Dataset) -> Dataset:
    """`ds` as a file reads: the form deidentify_dataset gets from the command."""
    return pydicom.dcmread(io.BytesIO(dicom_bytes(ds)))


def assert_no_phi(data: bytes, source: Dataset) -> None:
    leaked = [text for text in phi_strings(source) if text in data]
    assert not leaked, f"PHI in the output: {leaked}"


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def test_table_3_is_the_papers_list_with_matching_keywords():
    """TABLE_3 has the paper's 25 tags, each keyword is pydicom's for its tag and each name PS3.6's
    (bar the paper's shorter 'Image Compression Ratio')."""
    assert len(D.TABLE_3) == 25 and len(set(D.TABLE_3_KEYWORDS)) == 25
    for entry in D.TABLE_3:
        assert keyword_for_tag(entry.tag) == entry.keyword
        if entry.keyword != "LossyImageCompressionRatio":
            assert dictionary_description(entry.tag) == entry.name
    assert set(D.REQUIRED_IMAGE_PIXEL) <= set(D.TABLE_3_KEYWORDS)
    assert not set(D.REPLACED_UIDS) & set(D.TABLE_3_KEYWORDS)  # why they are replaced, not kept


# --------------------------------------------------------------------------------------------
# deidentify_dataset
# --------------------------------------------------------------------------------------------


def test_output_keeps_only_table_3_and_the_documented_extras():
    """Top level and File Meta hold only the allowed keywords: no sequence, private, overlay or curve."""
    source = read_back(phi_instance())
    _, out = D.deidentify_dataset(source)
    written = read_back(out)
    assert {element.keyword for element in written} <= D.OUTPUT_KEYWORDS
    assert {element.keyword for element in written.file_meta} <= D.OUTPUT_FILE_META_KEYWORDS
    assert not any(element.VR == "SQ" or element.tag.is_private for element in written)
    assert "BurnedInAnnotation" not in written and "PatientIdentityRemoved" not in written


def test_table_3_values_are_copied_unchanged():
    """Every Table 3 attribute the source has arrives with the same value (pixels byte for byte)."""
    source = read_back(phi_instance())
    _, out = D.deidentify_dataset(source)
    written = read_back(out)
    present = [keyword for keyword in D.TABLE_3_KEYWORDS if keyword in source]
    assert {"PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PixelSpacing", "RescaleSlope"} <= set(present)
    for keyword in present:
        assert written[keyword].value == source[keyword].value, keyword
    assert written.SOPClassUID == source.SOPClassUID
    assert written.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID


def test_no_phi_string_anywhere_in_the_output_bytes():
    """Names, IDs, dates, descriptions, nested, private, overlay, curve, AE title, preamble, original UIDs: gone."""
    source = read_back(phi_instance())
    _, out = D.deidentify_dataset(source)
    data = dicom_bytes(out)
    assert_no_phi(data, source)
    assert data[:128] == bytes(128)  # the source's preamble is not carried over


@pytest.mark.parametrize("hash_name", ["md5", "sha256"])
def test_image_id_is_the_hashlib_digest_of_the_sop_instance_uid(hash_name):
    """image_id = hashlib.<hash>(SOPInstanceUID).hexdigest(), the papers' and the service's scheme."""
    source = read_back(phi_instance())
    image_id, _ = D.deidentify_dataset(source, hash_name)
    assert image_id == hashlib.new(hash_name, source.SOPInstanceUID.encode()).hexdigest()


def test_uids_are_replaced_deterministically_and_the_file_meta_agrees():
    """New SOP/Study/Series UIDs: valid, distinct from the originals, equal on a re-run, different per image."""
    source = read_back(phi_instance())
    _image_id, out = D.deidentify_dataset(source)
    _, again = D.deidentify_dataset(source)
    for keyword in D.REPLACED_UIDS:
        assert out[keyword].value != source[keyword].value
        assert pydicom.uid.UID(out[keyword].value).is_valid
        assert out[keyword].value == again[keyword].value
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert dicom_bytes(out) == dicom_bytes(again)
    _, other = D.deidentify_dataset(read_back(phi_instance(seed=2)))
    assert other.SOPInstanceUID != out.SOPInstanceUID and other.StudyInstanceUID != out.StudyInstanceUID


def test_the_source_dataset_is_not_modified():
    """deidentify_dataset is pure: the input serialises to the same bytes afterwards."""
    source = read_back(phi_instance())
    before = dicom_bytes(source)
    D.deidentify_dataset(source)
    assert dicom_bytes(source) == before


@pytest.mark.parametrize(
    "transfer_syntax,signed",
    [
        ("explicit", False),
        ("implicit", True),
        ("big-endian", True),
        ("deflate", False),
        ("rle", True),
        ("jpeg-ls", False),
        ("j2k", False),
    ],
)
def test_pixels_unchanged_and_the_service_decoder_reads_the_output(transfer_syntax, signed):
    """Same Pixel Data bytes and pixel_array, and service.dicom.pipeline.prepare gives the model the same input."""
    source_ds = phi_instance(transfer_syntax=transfer_syntax, signed=signed, windowed=True)
    source = read_back(source_ds)
    _, out = D.deidentify_dataset(source)
    data = dicom_bytes(out)
    written = pydicom.dcmread(io.BytesIO(data))
    assert written.PixelData == source.PixelData
    np.testing.assert_array_equal(written.pixel_array, source.pixel_array)
    prepared, original = prepare(data, SPEC), prepare(dicom_bytes(source_ds), SPEC)
    np.testing.assert_array_equal(prepared.input, original.input)
    # Documented: the service hashes the *new* SOP Instance UID, so its image_id is not the file name.
    assert prepared.instance["image_id"] == hashlib.md5(out.SOPInstanceUID.encode()).hexdigest()
    assert_no_phi(data, source_ds)


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_kept_tag_with_free_text_is_dropped_not_copied():
    """A name typed into Patient's Weight (explicit VR LO) or Patient's Age is dropped; the rest is kept."""
    ds = phi_instance()
    ds.add(DataElement(0x00101030, "LO", PATIENT_NAME))  # PatientWeight, wrong VR
    ds.add(DataElement(0x00101010, "AS", "JANE"))  # PatientAge, right VR, not an age
    source = read_back(ds)
    _, out = D.deidentify_dataset(source)
    assert "PatientWeight" not in out and "PatientAge" not in out and out.PatientSex == source.PatientSex
    assert D.dropped_for_vr(source, out) == ["PatientAge", "PatientWeight"]
    assert_no_phi(dicom_bytes(out), ds)


def test_missing_sop_instance_uid_or_image_pixel_attribute_is_an_error():
    """Without SOP Instance UID there is no image_id; without Rows no decodable image: both refuse."""
    no_uid = read_back(phi_instance())
    del no_uid.SOPInstanceUID
    with pytest.raises(D.DeidentificationError, match="no SOP Instance UID"):
        D.deidentify_dataset(no_uid)
    no_rows = read_back(phi_instance())
    del no_rows.Rows
    with pytest.raises(D.DeidentificationError, match="Rows missing"):
        D.deidentify_dataset(no_rows)


def test_unknown_hash_is_refused():
    """--hash takes hashlib names with a fixed-length digest only."""
    with pytest.raises(ValueError):
        D.check_hash_name("shake_128")
    with pytest.raises(ValueError):
        D.check_hash_name("nope")
    assert D.check_hash_name("sha256") == "sha256"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _write(path: Path, ds: Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes(ds))
    return path


@pytest.fixture
def phi_tree(tmp_path) -> tuple[Path, list[Dataset]]:
    """A folder as a PACS export looks: nested, mixed names (one is the patient's), a duplicate,
    a text file, a DICOM without pixels. Returns (folder, the three image datasets)."""
    src = tmp_path / "export"
    first = phi_instance(seed=1)
    second = phi_instance(seed=2, transfer_syntax="rle")
    second.BurnedInAnnotation = "YES"
    third = phi_instance(seed=3, transfer_syntax="implicit")
    _write(src / "a.dcm", first)
    _write(src / "nested" / "deeper" / "IMG0002", second)  # no extension
    _write(src / "nested" / f"{PATIENT_NAME.replace('^', '_')}.dicom", third)  # PHI in the file name
    shutil.copy(src / "a.dcm", src / "nested" / "copy_of_a.dcm")
    (src / "nested" / "notes.txt").write_text(f"patient {PATIENT_NAME}, MRN {PHI_TEXT['PatientID']}\n")
    no_pixels = phi_instance(seed=4)
    del no_pixels.PixelData
    _write(src / "report.dcm", no_pixels)
    return src, [first, second, third]


def _console_has_no_phi(text: str, sources: list[Dataset]) -> None:
    for source in sources:
        leaked = [t for t in phi_strings(source) if t.decode(errors="replace") in text]
        assert not leaked, f"PHI on the console: {leaked}"
    assert "DOE_JANE_MARIE" not in text and "IMG0002" not in text and "copy_of_a" not in text


@pytest.mark.parametrize("hash_name", ["md5", "sha256"])
def test_command_writes_hash_named_files_and_skips_the_rest(phi_tree, tmp_path, capsys, hash_name):
    """main([...]) writes <image_id>.dicom for each distinct image, skips text, pixel-less DICOM and the
    duplicate, exits 0, and prints no PHI (not even file names)."""
    src, sources = phi_tree
    out = tmp_path / "deid"
    assert D.main(["--src", str(src), "--out", str(out), "--hash", hash_name]) == 0
    expected = {hashlib.new(hash_name, ds.SOPInstanceUID.encode()).hexdigest() + ".dicom" for ds in sources}
    assert {path.name for path in out.iterdir()} == expected
    for source in sources:
        path = out / (hashlib.new(hash_name, source.SOPInstanceUID.encode()).hexdigest() + ".dicom")
        data = path.read_bytes()
        assert_no_phi(data, source)
        written = pydicom.dcmread(io.BytesIO(data))
        assert {element.keyword for element in written} <= D.OUTPUT_KEYWORDS
        np.testing.assert_array_equal(written.pixel_array, read_back(source).pixel_array)
        prepare(data, SPEC)  # the service decodes it
    captured = capsys.readouterr()
    assert "wrote 3" in captured.out and "skipped 3" in captured.out and "failed 0" in captured.out
    assert "not DICOM: 1" in captured.out and "DICOM without Pixel Data: 1" in captured.out
    assert "duplicate SOP Instance UID: 1" in captured.out
    flagged = hashlib.new(hash_name, sources[1].SOPInstanceUID.encode()).hexdigest()
    assert f"flagged: {flagged}.dicom" in captured.err  # BurnedInAnnotation YES: named by image_id only
    _console_has_no_phi(captured.out + captured.err, sources)


def test_command_fails_with_a_phi_free_reason_and_exit_status_1(tmp_path, capsys, caplog):
    """A file without SOP Instance UID fails as 'file #N', a name in a kept tag is dropped and counted
    by keyword only, the others are written, and the status is 1; nothing identifying is logged either."""
    caplog.set_level(logging.DEBUG)
    src = tmp_path / "export"
    good = phi_instance(seed=5, transfer_syntax="implicit")
    placeholder = "1.234567890123"  # a valid DS as long as the name, swapped for it in the file's bytes
    assert len(placeholder) == len(PATIENT_NAME)
    good.PatientWeight = placeholder
    src.mkdir()
    # Implicit VR: read back as DS; pydicom keeps the invalid text as a str.
    (src / "1.dcm").write_bytes(dicom_bytes(good).replace(placeholder.encode(), PATIENT_NAME.encode()))
    no_uid = phi_instance(seed=6)
    del no_uid.SOPInstanceUID  # the File Meta keeps it (pydicom writes no file without); it is not used
    _write(src / "2.dcm", no_uid)
    out = tmp_path / "deid"
    assert D.main(["--src", str(src), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "file #2: no SOP Instance UID" in captured.err
    assert "wrote 1" in captured.out and "failed 1 (no SOP Instance UID: 1)" in captured.out
    assert "PatientWeight: 1" in captured.out
    _console_has_no_phi(captured.out + captured.err + caplog.text, [good, phi_instance(seed=6)])
    assert [path.name for path in out.iterdir()] == [hashlib.md5(good.SOPInstanceUID.encode()).hexdigest() + ".dicom"]


def test_pydicom_warnings_and_log_records_are_counted_not_shown(capsys, caplog):
    """pydicom quotes invalid values in warnings and on its logger: inside pydicom_muted both are held back."""
    caplog.set_level(logging.DEBUG)
    with D.pydicom_muted() as caught:
        warn_and_log(f"Invalid value for VR DS: '{PATIENT_NAME}'")
    assert len(caught) == 1
    captured = capsys.readouterr()
    assert PATIENT_NAME not in captured.out + captured.err + caplog.text
    assert not logging.getLogger("pydicom").disabled  # restored afterwards


def test_single_file_source_and_out_inside_src(tmp_path, capsys):
    """--src may be one file; an --out folder inside --src is not read back as input on a re-run."""
    src = tmp_path / "export"
    source = phi_instance(seed=7)
    path = _write(src / "only.dcm", source)
    out = src / "deid"
    assert D.main(["--src", str(path), "--out", str(out)]) == 0
    assert D.main(["--src", str(src), "--out", str(out)]) == 0
    assert "wrote 1, skipped 0" in capsys.readouterr().out.splitlines()[-1]
    assert len(list(out.iterdir())) == 1


def test_command_line_process_prints_no_phi(phi_tree, tmp_path):
    """`python -m training.deidentify` with two workers, as a user runs it: same files, clean console."""
    src, sources = phi_tree
    out = tmp_path / "deid"
    result = subprocess.run(
        [sys.executable, "-m", "training.deidentify", "--src", str(src), "--out", str(out), "--workers", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(out.glob("*.dicom"))) == 3 and "wrote 3" in result.stdout
    _console_has_no_phi(result.stdout + result.stderr, sources)
