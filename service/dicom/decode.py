"""DICOM bytes -> validated dataset -> stored pixel array.

Guards run on the header before any pixel data is decoded, so an absurd or hostile file is
rejected for the price of parsing a few hundred bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import RE_VALID_UID, UID

from service.dicom.charsets import fix_pydicom_character_sets, unknown_terms
from service.dicom.codecs import configure_pixel_decoders
from service.dicom.deflate import inflated_body
from service.errors import MalformedDicom, NotDicom, UnsupportedTransferSyntax, UnusableImage
from service.settings import DecodeLimits

SUPPORTED_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")

# The elements the decoder and the preprocessing read, with the VR PS3.6 gives them. An explicit VR
# file that writes one with another VR (Rows as DS, RescaleSlope as IS, ...) gets values of the
# wrong Python type, which fail far from here (in the pixel decoder, highdicom, the SR writer).
PIXEL_ELEMENT_VRS = {
    "Rows": "US",
    "Columns": "US",
    "BitsAllocated": "US",
    "BitsStored": "US",
    "HighBit": "US",
    "SamplesPerPixel": "US",
    "PixelRepresentation": "US",
    "PhotometricInterpretation": "CS",
    "NumberOfFrames": "IS",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
    "WindowCenter": "DS",
    "WindowWidth": "DS",
}
# What a DICOM result (SR, GSPS, burned-in image) needs to reference the image: one valid UID each.
REFERENCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


# Pixel data stored as plain numbers: decoding is numpy work that releases the GIL (deflate is zlib).
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    }
)
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


def peek_transfer_syntax(body: bytes) -> str | None:
    """The Transfer Syntax UID of a DICOM file's meta header, read without parsing the dataset.

    None when the body has no readable Part 10 meta header (the full parser then decides what it is).
    The meta group is always Explicit VR Little Endian (PS3.10 7.1).
    """
    if len(body) < 132 or body[128:132] != b"DICM":
        return None
    offset, end = 132, min(len(body), 132 + 65536)
    while offset + 8 <= end:
        group, element = (
            int.from_bytes(body[offset : offset + 2], "little"),
            int.from_bytes(body[offset + 2 : offset + 4], "little"),
        )
        if group != 0x0002:
            return None
        vr = body[offset + 4 : offset + 6]
        if vr in _LONG_LENGTH_VRS:
            length, value_at = int.from_bytes(body[offset + 8 : offset + 12], "little"), offset + 12
        else:
            length, value_at = int.from_bytes(body[offset + 6 : offset + 8], "little"), offset + 8
        if element == 0x0010:
            return body[value_at : value_at + length].rstrip(b"\x00 ").decode("ascii", errors="replace")
        offset = value_at + length
    return None


def has_native_pixel_data(body: bytes) -> bool:
    """Whether the file's meta header names an uncompressed transfer syntax (the decode routing rule)."""
    return peek_transfer_syntax(body) in NATIVE_TRANSFER_SYNTAXES


def read_dataset(body: bytes, limits: DecodeLimits = DecodeLimits()) -> Dataset:
    """Parse a DICOM Part 10 body (or a bare dataset) into a pydicom Dataset, pixels untouched.

    A deflated dataset is inflated first, under the caps of `limits` (service.dicom.deflate): pydicom would
    inflate all of it before reading a single element.
    """
    if not body:
        raise NotDicom("The request body is empty; send one DICOM Part 10 file.")
    if len(body) >= 132 and body[128:132] != b"DICM" and body[:4] != b"\x08\x00\x05\x00":
        # Neither a Part 10 file (preamble + 'DICM') nor a bare little-endian dataset that starts
        # with group 0008: reject early instead of letting the parser guess.
        raise NotDicom("The body is not DICOM: no 'DICM' marker at byte 128.")
    body = inflated_body(body, limits)
    fix_pydicom_character_sets()  # before any text is decoded
    try:
        # The 128-byte preamble is ignored by the parser; only 'DICM' and what follows is read.
        ds = pydicom.dcmread(io.BytesIO(body), force=body[128:132] != b"DICM")
        # pydicom converts element values lazily, on first access: an unknown VR or an undecodable
        # value would otherwise surface later, wherever the header happens to be read (the summary,
        # the gate, the SR). Converting every element here, nested sequences included, makes
        # every parse failure a parse error.
        ds.walk(_picklable_names)
        if getattr(ds, "file_meta", None) is not None:
            ds.file_meta.walk(lambda dataset, element: None)
    except InvalidDicomError as exc:
        raise NotDicom(f"The body is not DICOM: {exc}") from None
    except Exception as exc:  # pydicom raises many types on truncated or corrupt input
        raise MalformedDicom(f"The DICOM file could not be parsed ({type(exc).__name__}).") from None
    if "PixelData" not in ds:
        raise UnusableImage("The DICOM instance has no Pixel Data.")
    return ds


def _picklable_names(dataset: Dataset, element: DataElement) -> None:
    """Re-wrap several person names (a PN with VM > 1) so that the header can be pickled.

    pydicom's PN reader wraps them in a MultiValue whose constructor is a function local to the reader, which
    pickle cannot serialise: the header of a compressed image (decoded in a worker process) could then not come
    back, and two Other Patient Names were a 500. Assigned as a list, pydicom wraps them with a picklable one.
    """
    if element.VR == "PN" and isinstance(element.value, MultiValue):
        element.value = list(element.value)


def check_image_header(ds: Dataset, limits: DecodeLimits) -> None:
    """Reject images this service cannot read as one grayscale radiograph, before decoding."""
    for keyword, vr in PIXEL_ELEMENT_VRS.items():
        if keyword in ds and vr != ds[keyword].VR:
            raise MalformedDicom(f"{keyword} has VR {ds[keyword].VR}; PS3.6 defines it as {vr}.")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits_allocated = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise MalformedDicom("Rows, Columns or BitsAllocated is missing or not a number.") from None
    if frames != 1:
        raise UnusableImage(f"Multi-frame images are not supported ({frames} frames); send one frame.")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in SUPPORTED_PHOTOMETRICS:
        raise UnusableImage(
            f"Only grayscale images (MONOCHROME1/2, one sample per pixel) are supported, "
            f"got {photometric or 'no PhotometricInterpretation'} with {samples} samples."
        )
    if bits_allocated not in (8, 16, 32):
        raise UnusableImage(f"BitsAllocated {bits_allocated} is not supported (8, 16 or 32).")
    if not (
        limits.min_rows_or_columns <= rows <= limits.max_rows_or_columns
        and limits.min_rows_or_columns <= columns <= limits.max_rows_or_columns
    ):
        raise UnusableImage(f"Image size {rows}x{columns} is outside the accepted range.")
    if rows * columns * frames > limits.max_pixels:
        raise UnusableImage(f"Image of {rows * columns} pixels exceeds the limit of {limits.max_pixels}.")
    decoded_bytes = rows * columns * frames * samples * (bits_allocated // 8)
    if decoded_bytes > limits.max_pixel_bytes:
        raise UnusableImage(
            f"The decoded image would take {decoded_bytes} bytes; the limit is {limits.max_pixel_bytes}."
        )
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        # The modality LUT needs these as numbers; an unreadable value (several values, text,
        # NaN) would otherwise fail or poison every pixel only after decoding.
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise MalformedDicom(f"{keyword} is not a single decimal number.") from None
        if not math.isfinite(number):
            raise MalformedDicom(f"{keyword} is not a finite number.")


def check_referenceable(ds: Dataset) -> None:
    """Refuse (422) a DICOM result (SR, GSPS, burned-in image) for an image that lacks a UID they must reference it by.

    The JSON answer needs none of these (a missing SOP Instance UID just gives no image_id), so
    this runs only when a DICOM output is asked for.
    """
    for keyword in REFERENCE_UIDS:
        # By tag, get() gives the element (by keyword it gives the value; data_element raises KeyError when absent).
        element = ds.get(Tag(keyword))
        # Written under another VR than UI (a PACS bug), it is not a UID the outputs can carry either.
        value = element.value if element is not None and element.VR == "UI" else None
        if not isinstance(value, str) or len(value) > 64 or not RE_VALID_UID.match(value):
            missing = element is None or element.value in (None, "")
            raise UnusableImage(
                f"A DICOM result (SR, GSPS or burned-in image) must reference the image by its {keyword}, which is "
                f"{'missing' if missing else 'not one valid UID'}; ask for JSON instead."
            )
    if UID(ds.SOPClassUID).type != "SOP Class":
        raise UnusableImage(
            "A DICOM result (SR, GSPS or burned-in image) can only reference an image of a standard SOP class; "
            "ask for JSON instead."
        )
    # The DICOM results copy the patient and study attributes: text of an unknown character set would be garbled.
    if unknown_terms(ds.get("SpecificCharacterSet")):
        raise UnusableImage(
            "SpecificCharacterSet holds a value that is not a defined term (PS3.3 C.12.1.1.2), so the patient and "
            "study attributes cannot be copied into a DICOM result; ask for JSON instead."
        )


def check_decodable(ds: Dataset) -> None:
    """Refuse (415) a transfer syntax this installation has no working pixel decoder for.

    pydicom raises NotImplementedError only for syntaxes it has no decoder class for (private or
    video UIDs); for a known compressed syntax whose plugins are all missing (e.g. JPEG-LS without
    pyjpegls) it raises a RuntimeError that looks like any corrupt-data error.
    Asking the decoder first tells the two apart without decoding anything.
    """
    configure_pixel_decoders()  # permissive plugins only, none that aborts (service/dicom/codecs.py)
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not syntax:
        return  # bare dataset: pydicom decodes it as native little endian
    uid = UID(str(syntax))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise UnsupportedTransferSyntax(f"Transfer syntax {uid.name} cannot be decoded by this service.") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no decoder plugin installed"
        raise UnsupportedTransferSyntax(
            f"Transfer syntax {uid.name} cannot be decoded by this installation ({missing})."
        )


def _is_rust_panic(exc: BaseException) -> bool:
    """pyo3's PanicException lives in a `pyo3_runtime` module that cannot be imported, so match it by type."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Decode the single frame into a 2-D array of stored values."""
    check_decodable(ds)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        pixels = ds.pixel_array
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntax(
            f"Transfer syntax {syntax or 'unknown'} cannot be decoded by this installation: {exc}"
        ) from None
    except Exception as exc:  # truncated or corrupt pixel data
        raise MalformedDicom(f"The pixel data could not be decoded ({type(exc).__name__}).") from None
    except BaseException as exc:
        if not _is_rust_panic(exc):
            raise
        # pylibjpeg-rle (Rust, via pyo3) panics instead of raising when the RLE segments do not
        # fit Rows x Columns; pyo3 turns the panic into pyo3_runtime.PanicException, a
        # BaseException that `except Exception` misses and that cannot be pickled back from a
        # decode worker (which breaks the whole pool). It is corrupt pixel data like any other.
        raise MalformedDicom(
            "The pixel data could not be decoded (the decoder rejected the compressed data)."
        ) from None
    if pixels.ndim != 2:
        raise UnusableImage(f"Expected a single 2-D frame, decoded an array of shape {pixels.shape}.")
    if not pixels.dtype.isnative:  # Explicit VR Big Endian decodes to a big-endian view ('>u2')
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels
