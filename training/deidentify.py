"""De-identify DICOMs the way the VinDr papers did: keep only Table 3's tags, name files by hash.

    python -m training.deidentify --src DIR_OR_FILE --out DIR [--hash md5] [--workers N]

Every DICOM under ``--src`` (searched recursively; any file name, with or without a .dcm/.dicom
extension) is written to ``<out>/<image_id>.dicom``, where ``image_id`` is the ``hashlib`` hex
digest of its SOP Instance UID (0008,0018) -- the scheme of both papers ("Data Records") and of the
service (``service.dicom.pipeline.image_id``; ``--hash`` must match the service's ``CXR_IMAGE_ID_HASH``,
md5 by default). Files that are not DICOM, or DICOM without Pixel Data (DICOMDIR, SR, ...), are
skipped and counted; files that cannot be de-identified are counted as failed, and then the exit
status is 1.

What the output keeps (see :func:`deidentify_dataset`):

- the VinDr-PCXR paper's Table 3 (:data:`TABLE_3`), each value only if it is valid for its VR
  (PS3.5 6.2), so free text cannot ride along in a kept tag (a name typed into Patient's Age);
- beyond Table 3, only what a valid Part 10 file needs: SOP Class UID (copied: it names the IOD,
  not the patient), new SOP Instance, Study and Series Instance UIDs (Table 3 drops the
  originals; the new ones are generated from ``image_id``, so a re-run gives identical files and
  they add no linkage beyond the file name), Planar Configuration when present (Image Pixel
  module, needed to decode native colour pixels), and a freshly written File Meta Information
  (transfer syntax kept; the source's application entity titles, implementation UIDs and private
  information are not copied). The 128-byte preamble is zeroed.
- Everything else goes: dates, names, IDs, descriptions, private tags, sequences, curves,
  overlays, the Burned In Annotation flag. Each image becomes its own study and series: the
  original study/series grouping (same patient, same visit) is linkage information Table 3 drops.

Consequences a user should know:

- The output is a valid, decodable Part 10 file but not a complete CR/DX IOD (Modality, the Type 2
  patient/study attributes and the like are gone, as Table 3 implies); dciodvfy reports them as
  missing.
- The file name is the dataset key. The SOP Instance UID inside is the new one, so
  ``image_id(file's SOP Instance UID)`` -- what the service reports for an upload -- is *not* the
  file name. Keep track of images by file name.
- No mapping file (original UID -> image_id) is written: with it, anyone holding the output could
  look up the original study in the PACS, i.e. it is a re-identification key. A site that needs to
  go back computes ``hashlib.<hash>(SOPInstanceUID)`` over its own PACS, which only the site can.
- Pixels are copied byte for byte. Text burned into the pixels (names, dates on the image) cannot
  be detected here: the papers' second stage was a manual review of every image, and that review
  is still needed. Sources that declare BurnedInAnnotation YES are written, named on stderr by
  image_id ("flagged: <image_id>.dicom") and counted in the summary: review those first.
  Compressed codestreams (JPEG, JPEG 2000) are copied as they are, including any comment segment
  an encoder put in them.
- Patient Identity Removed (0012,0062) is not set: it asserts that the Pixel Data is clean as
  well, which only the manual review can establish.

Nothing printed carries PHI: files are named by their position (``file #N`` is the N-th file,
counting from 1, in ``sorted()`` path order under ``--src``; paths can contain names) or by
``image_id``; failure reasons are fixed texts or exception type names, never a value (pydicom's
own messages and warnings quote values, so they are counted, not shown).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    RE_VALID_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from tqdm import tqdm

from service.dicom.pipeline import image_id as hashed_image_id
from training.synthetic import dicom_bytes


class TableEntry(NamedTuple):
    tag: int
    name: str  # as the paper writes it
    keyword: str  # pydicom's keyword for the tag


# VinDr-PCXR paper, Supplementary materials, Table 3: "The list of DICOM tags that were retained for
# loading and processing raw images. All other tags were removed for protecting patient privacy."
# Verbatim, in the paper's order. The paper's "Image Compression Ratio" is PS3.6's Lossy Image
# Compression Ratio (0028,2112).
TABLE_3: tuple[TableEntry, ...] = (
    TableEntry(0x00100040, "Patient's Sex", "PatientSex"),
    TableEntry(0x00101010, "Patient's Age", "PatientAge"),
    TableEntry(0x00101020, "Patient's Size", "PatientSize"),
    TableEntry(0x00101030, "Patient's Weight", "PatientWeight"),
    TableEntry(0x00280010, "Rows", "Rows"),
    TableEntry(0x00280011, "Columns", "Columns"),
    TableEntry(0x00280030, "Pixel Spacing", "PixelSpacing"),
    TableEntry(0x00280034, "Pixel Aspect Ratio", "PixelAspectRatio"),
    TableEntry(0x00280100, "Bits Allocated", "BitsAllocated"),
    TableEntry(0x00280101, "Bits Stored", "BitsStored"),
    TableEntry(0x00280102, "High Bit", "HighBit"),
    TableEntry(0x00280103, "Pixel Representation", "PixelRepresentation"),
    TableEntry(0x00280106, "Smallest Image Pixel Value", "SmallestImagePixelValue"),
    TableEntry(0x00280107, "Largest Image Pixel Value", "LargestImagePixelValue"),
    TableEntry(0x00281050, "Window Center", "WindowCenter"),
    TableEntry(0x00281051, "Window Width", "WindowWidth"),
    TableEntry(0x00281052, "Rescale Intercept", "RescaleIntercept"),
    TableEntry(0x00281053, "Rescale Slope", "RescaleSlope"),
    TableEntry(0x7FE00010, "Pixel Data", "PixelData"),
    TableEntry(0x00280004, "Photometric Interpretation", "PhotometricInterpretation"),
    TableEntry(0x00282110, "Lossy Image Compression", "LossyImageCompression"),
    TableEntry(0x00282114, "Lossy Image Compression Method", "LossyImageCompressionMethod"),
    TableEntry(0x00282112, "Image Compression Ratio", "LossyImageCompressionRatio"),
    TableEntry(0x00280002, "Samples per Pixel", "SamplesPerPixel"),
    TableEntry(0x00280008, "Number of Frames", "NumberOfFrames"),
)
TABLE_3_KEYWORDS = tuple(entry.keyword for entry in TABLE_3)

# Beyond Table 3, copied from the source because a valid, decodable file needs them:
# SOP Class UID is Type 1 (SOP Common module) and the File Meta's Media Storage SOP Class UID
# repeats it; Planar Configuration is Type 1C in the Image Pixel module (Samples per Pixel > 1) and
# tells the decoder how colour samples are interleaved.
COPIED_FOR_VALIDITY = ("SOPClassUID", "PlanarConfiguration")
# Type 1 UIDs (SOP Common, General Study, General Series) that Table 3 drops: written with new
# values derived from image_id (see new_uids), so the file stays valid and references (SR, GSPS)
# still work, without the originals.
REPLACED_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
OUTPUT_KEYWORDS = frozenset(TABLE_3_KEYWORDS + COPIED_FOR_VALIDITY + REPLACED_UIDS)
# File Meta Information written (pydicom adds the group length, version and implementation name).
OUTPUT_FILE_META_KEYWORDS = frozenset(
    {
        "FileMetaInformationGroupLength",
        "FileMetaInformationVersion",
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "ImplementationVersionName",
    }
)
# Image Pixel module (PS3.3 C.7.6.3) Type 1 attributes, all in Table 3: without any of them the
# output would not be a decodable image, so the file fails instead.
REQUIRED_IMAGE_PIXEL = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
)

# Value formats of the string VRs among the kept tags (PS3.5 Table 6.2-1), per value.
_TEXT_VR_PATTERNS = {
    "AS": re.compile(r"\d{3}[DWMY]"),
    "CS": re.compile(r"[A-Z0-9_ ]{0,16}"),
    "DS": re.compile(r"(?=.{0,16}$) *[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)? *"),
    "IS": re.compile(r"(?=.{0,12}$) *[+-]?\d+ *"),
}
_BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "OB", "OW", "OB or OW", "US or SS"})

DEFAULT_HASH = "md5"  # service.settings.Settings.image_id_hash's default
DICOM_SUFFIX = ".dicom"  # the VinDr layout's file names: <image_id>.dicom


class DeidentificationError(ValueError):
    """A file that cannot be de-identified into a valid image. The message never quotes a value."""


# --------------------------------------------------------------------------------------------
# Core: one dataset in, one de-identified dataset out
# --------------------------------------------------------------------------------------------


def check_hash_name(hash_name: str) -> str:
    """`hash_name` if hashlib has it with a fixed-length hex digest (not the SHAKE variants)."""
    try:
        hashlib.new(hash_name).hexdigest()
    except (ValueError, TypeError):  # unknown name; SHAKE's hexdigest() needs a length
        usable = sorted(name for name in hashlib.algorithms_guaranteed if not name.startswith("shake"))
        raise ValueError(f"unknown or unusable hash {hash_name!r}; one of {usable}") from None
    return hash_name


def new_uids(image_id: str, hash_name: str) -> dict[str, UID]:
    """Replacement SOP Instance / Study / Series UIDs, a deterministic function of `image_id`.

    They reveal nothing the file name does not: whoever can compute image_id (from the original
    UID) can compute these, and nobody can go back from them to the original UID.
    """
    return {
        keyword: generate_uid(entropy_srcs=["training.deidentify", hash_name, image_id, keyword])
        for keyword in REPLACED_UIDS
    }


def _values(value: object) -> list:
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def value_matches_vr(element: DataElement) -> bool:
    """Whether `element` has the VR PS3.6 gives its tag and every value is well-formed for it.

    Kept tags only carry numbers and short codes; checking the format means a misused field (a
    name typed into Patient's Age, a note in Patient's Weight written as LO) is dropped, not
    copied.
    """
    dictionary_vr = dictionary_VR(element.tag)
    if dictionary_vr != element.VR and element.VR not in dictionary_vr.split(" or "):
        return False
    if element.VR in _BINARY_VRS or element.value in (None, "", b""):
        return True
    pattern = _TEXT_VR_PATTERNS.get(element.VR)
    if pattern is None:
        return False  # not a VR any kept tag has: nothing to vouch for
    return all(pattern.fullmatch(str(value)) for value in _values(element.value))


def kept_element(ds: Dataset, keyword: str) -> DataElement | None:
    """A copy of `ds`'s element `keyword` when it is present and valid for its VR, else None."""
    try:
        # Not ds.get(keyword): that returns the value, and the element itself is wanted.
        # Converts the raw element: may raise.
        element = ds[keyword] if keyword in ds else None  # noqa: SIM401
        if element is None or not value_matches_vr(element):
            return None
    except Exception:  # pydicom cannot read the value: dropped like any invalid one (dropped_for_vr counts it)
        return None
    copied = DataElement(element.tag, element.VR, deepcopy(element.value))
    copied.is_undefined_length = element.is_undefined_length  # encapsulated Pixel Data
    return copied


def transfer_syntax_of(ds: Dataset) -> UID:
    """The source's transfer syntax: from its File Meta, else how pydicom read a bare dataset."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax:
        return UID(str(syntax))
    encodings = {
        (True, True): ImplicitVRLittleEndian,
        (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian,
    }
    encoding = getattr(ds, "original_encoding", (None, None))
    if encoding in encodings:
        return UID(encodings[encoding])
    raise DeidentificationError("no Transfer Syntax UID")


def sop_class_of(ds: Dataset) -> UID:
    """The source's SOP Class UID (dataset, else File Meta); it must be one well-formed UID."""
    file_meta = getattr(ds, "file_meta", None)
    candidates = [ds.get("SOPClassUID"), file_meta.get("MediaStorageSOPClassUID") if file_meta else None]
    for value in candidates:
        if isinstance(value, str) and len(value) <= 64 and RE_VALID_UID.match(value):
            return UID(value)
    raise DeidentificationError("no valid SOP Class UID")


def source_image_id(ds: Dataset, hash_name: str = DEFAULT_HASH) -> str:
    """image_id of the source: hashlib `hash_name` hex digest of SOP Instance UID (0008,0018)."""
    try:
        sop_instance_uid = ds.get("SOPInstanceUID")
    except (ValueError, TypeError):
        sop_instance_uid = None
    if not isinstance(sop_instance_uid, str) or not sop_instance_uid.strip():
        raise DeidentificationError("no SOP Instance UID")
    return hashed_image_id(str(sop_instance_uid), check_hash_name(hash_name))


def deidentify_dataset(ds: Dataset, hash_name: str = DEFAULT_HASH) -> tuple[str, Dataset]:
    """(image_id, de-identified copy of `ds`); `ds` is not modified. See the module docstring.

    Raises DeidentificationError when the source has no SOP Instance UID or SOP Class UID, or
    lacks a valid Image Pixel module attribute (:data:`REQUIRED_IMAGE_PIXEL`).
    """
    image_id = source_image_id(ds, hash_name)
    sop_class = sop_class_of(ds)
    transfer_syntax = transfer_syntax_of(ds)

    out = Dataset()  # a new dataset: no preamble, no private blocks, no read-time state
    for keyword in (*TABLE_3_KEYWORDS, "PlanarConfiguration"):  # SOP Class UID: checked below
        element = kept_element(ds, keyword)
        if element is not None:
            out.add(element)
    missing = [keyword for keyword in REQUIRED_IMAGE_PIXEL if keyword not in out]
    if missing:
        raise DeidentificationError(f"{', '.join(missing)} missing or not valid for its VR")
    out.SOPClassUID = sop_class
    for keyword, uid in new_uids(image_id, hash_name).items():
        setattr(out, keyword, uid)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID  # the writer is pydicom, not the source's
    out.file_meta = meta
    return image_id, out


def burned_in_annotation(ds: Dataset) -> bool:
    """Whether the source declares text burned into its pixels (BurnedInAnnotation YES)."""
    try:
        return str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"
    except (ValueError, TypeError):
        return False


def dropped_for_vr(source: Dataset, output: Dataset) -> list[str]:
    """Table 3 keywords present in `source` but not in `output`: values not valid for their VR."""
    return [keyword for keyword in TABLE_3_KEYWORDS if keyword in source and keyword not in output]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def looks_like_dicom(head: bytes) -> bool:
    """Part 10 ('DICM' at byte 128) or a bare little-endian dataset starting in group 0008."""
    return head[128:132] == b"DICM" or head[:2] == b"\x08\x00"


def find_files(src: Path, exclude: Path | None = None) -> list[Path]:
    """`src` itself, or every file under it (recursively) except those under `exclude`, sorted."""
    if src.is_file():
        return [src]
    excluded = exclude.resolve() if exclude is not None else None
    files = []
    for path in src.rglob("*"):
        if not path.is_file():
            continue
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue  # --out inside --src: never read our own output
        files.append(path)
    return sorted(files)


@dataclass
class FileResult:
    """What happened to one file. `reason` is a fixed text or an exception type name, never a value."""

    index: int  # 1-based position in find_files' order
    status: str  # "written", "skipped" or "failed"
    reason: str = ""
    image_id: str = ""
    data: bytes = b""  # the de-identified Part 10 bytes when status is "written"
    burned_in: bool = False
    dropped: list[str] = field(default_factory=list)  # Table 3 keywords dropped for their VR
    warnings: int = 0  # pydicom warnings raised (not shown: they quote values)


@contextmanager
def pydicom_muted() -> Iterator[list[warnings.WarningMessage]]:
    """Record pydicom's warnings instead of showing them, and silence its logger meanwhile.

    pydicom reports an invalid value by quoting it ("Invalid value for VR DS: '<the value>'"), both
    as a warning and on the 'pydicom' logger, so either could put PHI on a console or in a log file.
    """
    logger = logging.getLogger("pydicom")
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # record every one, so the count is right
            yield caught
    finally:
        logger.disabled = was_disabled


def deidentify_file(index: int, path: Path, hash_name: str) -> FileResult:
    """Read, de-identify and encode one file; never raises for bad input (it is a FileResult)."""
    with pydicom_muted() as caught:
        result = _deidentify_file(index, path, hash_name)
    result.warnings = len(caught)
    return result


def _deidentify_file(index: int, path: Path, hash_name: str) -> FileResult:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        return FileResult(index, "failed", f"unreadable file ({type(exc).__name__})")
    if not looks_like_dicom(head):
        return FileResult(index, "skipped", "not DICOM")
    try:
        ds = pydicom.dcmread(path, force=head[128:132] != b"DICM")
    except InvalidDicomError:
        return FileResult(index, "skipped", "not DICOM")
    except Exception as exc:  # pydicom raises many types on truncated or corrupt files
        return FileResult(index, "failed", f"unreadable DICOM ({type(exc).__name__})")
    if "PixelData" not in ds:
        return FileResult(index, "skipped", "DICOM without Pixel Data")
    try:
        image_id, out = deidentify_dataset(ds, hash_name)
        data = dicom_bytes(out)
    except DeidentificationError as exc:
        return FileResult(index, "failed", str(exc))
    except Exception as exc:  # a value pydicom cannot handle; its message may quote the value
        return FileResult(index, "failed", f"cannot de-identify ({type(exc).__name__})")
    return FileResult(
        index,
        "written",
        image_id=image_id,
        data=data,
        burned_in=burned_in_annotation(ds),
        dropped=dropped_for_vr(ds, out),
    )


def _deidentify_job(job: tuple[int, str, str]) -> FileResult:
    index, path, hash_name = job
    return deidentify_file(index, Path(path), hash_name)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary name, so an interrupted run leaves no half file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def _results(jobs: list[tuple[int, str, str]], workers: int) -> Iterator[FileResult]:
    if workers > 1:
        # Results come back in job order, so the first of two files with one SOP Instance UID wins.
        with ProcessPoolExecutor(workers) as pool:
            yield from pool.map(_deidentify_job, jobs, chunksize=4)
    else:
        yield from map(_deidentify_job, jobs)


@dataclass
class Summary:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    burned_in: list[str] = field(default_factory=list)  # image_ids flagged for pixel review
    dropped: Counter = field(default_factory=Counter)  # Table 3 keyword -> files where it was invalid
    warnings: int = 0

    def line(self, seconds: float, out: Path) -> str:
        def detail(counts: Counter) -> str:
            return f" ({', '.join(f'{reason}: {n}' for reason, n in sorted(counts.items()))})" if counts else ""

        text = (
            f"deidentify: wrote {self.written}, skipped {sum(self.skipped.values())}"
            f"{detail(self.skipped)}, failed {sum(self.failed.values())}{detail(self.failed)} "
            f"in {seconds:.1f} s to {out}"
        )
        if self.burned_in:
            text += f"; {len(self.burned_in)} flagged BurnedInAnnotation YES (review their pixels)"
        if self.dropped:
            text += f"; values dropped as not valid for their VR{detail(self.dropped)}"
        if self.warnings:
            text += f"; {self.warnings} pydicom warnings not shown (they quote header values)"
        return text


def deidentify_tree(src: Path, out: Path, hash_name: str = DEFAULT_HASH, workers: int = 1) -> Summary:
    """De-identify every DICOM under `src` into `out` (see the module docstring); a Summary."""
    check_hash_name(hash_name)
    out.mkdir(parents=True, exist_ok=True)
    files = find_files(src, exclude=out)
    jobs = [(index, str(path), hash_name) for index, path in enumerate(files, start=1)]
    summary = Summary()
    seen: set[str] = set()
    with tqdm(total=len(jobs), desc="deidentify", unit="file", disable=None) as bar:
        for result in _results(jobs, workers):
            bar.update()
            summary.warnings += result.warnings
            if result.status == "written" and result.image_id in seen:
                result = FileResult(result.index, "skipped", "duplicate SOP Instance UID")
            if result.status == "skipped":
                summary.skipped[result.reason] += 1
                continue
            if result.status == "failed":
                summary.failed[result.reason] += 1
                tqdm.write(f"deidentify: failed: file #{result.index}: {result.reason}", file=sys.stderr)
                continue
            seen.add(result.image_id)
            write_atomically(out / f"{result.image_id}{DICOM_SUFFIX}", result.data)
            summary.written += 1
            summary.dropped.update(result.dropped)
            if result.burned_in:
                summary.burned_in.append(result.image_id)
                tqdm.write(
                    f"deidentify: flagged: {result.image_id}{DICOM_SUFFIX}: source says "
                    "BurnedInAnnotation YES; review its pixels for text",
                    file=sys.stderr,
                )
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _hash_argument(text: str) -> str:
    try:
        return check_hash_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.deidentify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path, required=True, help="a DICOM file or a folder searched recursively")
    parser.add_argument("--out", type=Path, required=True, help="folder for <image_id>.dicom files")
    parser.add_argument(
        "--hash",
        type=_hash_argument,
        default=DEFAULT_HASH,
        help="hashlib algorithm for image_id (default md5; match the service's CXR_IMAGE_ID_HASH)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (output is identical)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit status: 0, or 1 when any file failed."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.src.exists():
        parser.error("--src does not exist")  # the path is not echoed: it may contain a name
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    started = time.perf_counter()
    summary = deidentify_tree(args.src, args.out, args.hash, args.workers)
    print(summary.line(time.perf_counter() - started, args.out))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
