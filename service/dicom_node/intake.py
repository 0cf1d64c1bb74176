"""Checks a received instance passes before it is acknowledged, and the status each failure gets.

Cheap header checks only (the C-STORE is waiting): what the pipeline would certainly refuse later,
and what no later retry could fix, is refused now, so the sender sees the failure instead of a
success followed by silence. Decoding itself happens in the pipeline, as for HTTP.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes

from service.dicom.decode import (
    NATIVE_TRANSFER_SYNTAXES,
    check_image_header,
    check_referenceable,
    read_dataset,
)
from service.dicom.pipeline import image_id
from service.dicom.status import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, failure_status
from service.errors import ApiError
from service.settings import DecodeLimits

# What the node stores: chest radiographs as CR or DX objects (PS3.4 B.5); every other SOP class is
# refused at association (presentation context rejected: abstract syntax not supported).
IMAGE_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
VERIFICATION = "1.2.840.10008.1.1"


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes this installation can decode, uncompressed ones first (the pipeline's own list)."""
    native = [uid for uid in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2") if uid in NATIVE_TRANSFER_SYNTAXES]
    native += sorted(NATIVE_TRANSFER_SYNTAXES - set(native))
    compressed = []
    for uid in AllTransferSyntaxes:
        if uid in NATIVE_TRANSFER_SYNTAXES or not UID(uid).is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                compressed.append(str(uid))
        except NotImplementedError:  # no decoder class at all (video, private)
            continue
    return native + compressed


class Refusal(Exception):
    """A C-STORE answered with a failure status; `reason` is an error code, safe to log and to send back."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Accepted:
    image_id: str
    content_sha256: str
    rows: int
    columns: int


def check_instance(data: bytes, sop_class: str, limits: DecodeLimits, id_algorithm: str) -> Accepted:
    """Refuse (Refusal) an instance the pipeline could never turn into results; describe one it can."""
    try:
        ds = read_dataset(data, limits)
        check_image_header(ds, limits)
        check_referenceable(ds)  # the results are DICOM objects that reference the image
    except ApiError as error:
        raise Refusal(failure_status(error.code), error.code) from None
    if str(ds.SOPClassUID) != sop_class:
        # The dataset says it is something else than the presentation context it came on.
        raise Refusal(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "sop_class_mismatch")
    if _pixel_data_truncated(ds):
        raise Refusal(CANNOT_UNDERSTAND, "pixel_data_truncated")
    return Accepted(
        image_id=image_id(str(ds.SOPInstanceUID), id_algorithm),
        content_sha256=hashlib.sha256(data).hexdigest(),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def _pixel_data_truncated(ds: Dataset) -> bool:
    """Uncompressed pixel data shorter than Rows x Columns x bytes per pixel (a cut-off transfer)."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if getattr(ds, "file_meta", None) else ""
    if syntax and syntax not in NATIVE_TRANSFER_SYNTAXES:
        return False  # compressed: only decoding can tell, in the pipeline
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * (int(ds.BitsAllocated) // 8)
    return len(ds.PixelData) < expected


def result_allowance(outputs: tuple[str, ...], rows: int, columns: int, segments: int = 0) -> int:
    """Spool bytes reserved at intake for a job's results, so results of accepted instances fit the budget.

    SR and GSPS are a few KiB (64 KiB covers dozens of findings); the burned-in image is RGB at the
    source's size; the heatmap Segmentation at most one byte per pixel and segment (RLE only ever shrinks
    smooth maps). The reservation is replaced by the real sizes once the results are written.
    """
    per_pixel = {"sc": 3, "seg": segments}
    return sum(64 * 1024 + rows * columns * per_pixel.get(kind, 0) for kind in outputs)
