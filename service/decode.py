"""DICOM bytes -> validated dataset -> stored pixel array.

Guards run on the header before any pixel data is decoded, so an absurd or hostile file is
rejected for the price of parsing a few hundred bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from service.errors import MalformedDicom, NotDicom, UnsupportedTransferSyntax, UnusableImage

SUPPORTED_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 100_000_000  # rows x columns x frames
    max_pixel_bytes: int = 256 * 1024 * 1024  # the decoded array: rows x columns x frames x samples x bytes
    max_rows_or_columns: int = 16_384
    min_rows_or_columns: int = 32


def read_dataset(body: bytes) -> Dataset:
    """Parse a DICOM Part 10 body (or a bare dataset) into a pydicom Dataset, pixels untouched."""
    if not body:
        raise NotDicom("The request body is empty; send one DICOM Part 10 file.")
    if len(body) >= 132 and body[128:132] != b"DICM" and body[:4] != b"\x08\x00\x05\x00":
        # Neither a Part 10 file (preamble + 'DICM') nor a bare little-endian dataset that starts
        # with group 0008: reject early instead of letting the parser guess.
        raise NotDicom("The body is not DICOM: no 'DICM' marker at byte 128.")
    try:
        # The 128-byte preamble is ignored by the parser; only 'DICM' and what follows is read.
        ds = pydicom.dcmread(io.BytesIO(body), force=body[128:132] != b"DICM")
    except InvalidDicomError as exc:
        raise NotDicom(f"The body is not DICOM: {exc}") from None
    except Exception as exc:  # pydicom raises many types on truncated or corrupt input
        raise MalformedDicom(f"The DICOM file could not be parsed ({type(exc).__name__}).") from None
    if "PixelData" not in ds:
        raise UnusableImage("The DICOM instance has no Pixel Data.")
    return ds


def check_image_header(ds: Dataset, limits: DecodeLimits) -> None:
    """Reject images this service cannot read as one grayscale radiograph, before decoding."""
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
    if not (limits.min_rows_or_columns <= rows <= limits.max_rows_or_columns
            and limits.min_rows_or_columns <= columns <= limits.max_rows_or_columns):
        raise UnusableImage(f"Image size {rows}x{columns} is outside the accepted range.")
    if rows * columns * frames > limits.max_pixels:
        raise UnusableImage(f"Image of {rows * columns} pixels exceeds the limit of {limits.max_pixels}.")
    decoded_bytes = rows * columns * frames * samples * (bits_allocated // 8)
    if decoded_bytes > limits.max_pixel_bytes:
        raise UnusableImage(f"The decoded image would take {decoded_bytes} bytes; the limit is {limits.max_pixel_bytes}.")


def check_decodable(ds: Dataset) -> None:
    """Refuse (415) a transfer syntax this installation has no working pixel decoder for.

    pydicom raises NotImplementedError only for syntaxes it has no decoder class for (private or
    video UIDs); for a known compressed syntax whose plugins are all missing (e.g. JPEG-LS without
    pylibjpeg-libjpeg / pyjpegls) it raises a RuntimeError that looks like any corrupt-data error.
    Asking the decoder first tells the two apart without decoding anything.
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not syntax:
        return  # bare dataset: pydicom decodes it as native little endian
    uid = UID(str(syntax))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise UnsupportedTransferSyntax(
            f"Transfer syntax {uid.name} cannot be decoded by this service.") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no decoder plugin installed"
        raise UnsupportedTransferSyntax(
            f"Transfer syntax {uid.name} cannot be decoded by this installation ({missing}).")


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
    if pixels.ndim != 2:
        raise UnusableImage(f"Expected a single 2-D frame, decoded an array of shape {pixels.shape}.")
    if not pixels.dtype.isnative:  # Explicit VR Big Endian decodes to a big-endian view ('>u2')
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels
