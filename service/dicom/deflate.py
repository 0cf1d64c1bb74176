"""Deflated Explicit VR Little Endian datasets, inflated under a byte cap before pydicom reads them.

pydicom inflates a deflated dataset in one `zlib.decompress` call before a single element is read, so a
body of a few hundred kilobytes can expand to gigabytes in the server process (a "deflate bomb": zeros
compress about 1000:1) and nothing can be checked first. Here the dataset is inflated in 1 MiB steps
(`zlib.decompressobj` with `max_length`):

1. up to `DecodeLimits.max_header_bytes`, enough to hold any real header; the header is read from
   those bytes up to Pixel Data, so a huge element before the pixels (a private one inflating to a
   gigabyte, say) is refused right there;
2. then only as far as the image the header declares needs: Rows x Columns x frames x samples x bytes,
   which is itself capped by `DecodeLimits.max_pixel_bytes`, plus the header allowance again for
   anything after Pixel Data.

The result is the same file re-encoded as Explicit VR Little Endian (the meta header's transfer syntax
rewritten), which pydicom then reads like any uncompressed upload.
"""

from __future__ import annotations

import io
import zlib

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from service.errors import MalformedDicom, UnusableImage
from service.settings import DecodeLimits

INFLATE_STEP = 1 << 20  # most bytes inflated per zlib call
INPUT_STEP = 64 * 1024  # most compressed bytes handed to one zlib call
PIXEL_DATA = 0x7FE00010


def _not_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def read_file_meta(body: bytes) -> tuple[FileMetaDataset, int] | None:
    """The File Meta Information of a Part 10 body and the offset where the dataset starts; None without 'DICM'.

    Read the way pydicom reads it (elements of group 0002, Explicit VR Little Endian, or Implicit VR when
    the first element makes no sense as explicit: pydicom issue #503), so both agree on the transfer syntax.
    """
    if len(body) < 132 or body[128:132] != b"DICM":
        return None
    for implicit in (False, True):
        stream = io.BytesIO(body)
        try:
            read_preamble(stream, force=False)
            meta = FileMetaDataset(
                read_dataset(stream, is_implicit_VR=implicit, is_little_endian=True, stop_when=_not_meta)
            )
            if meta:
                meta[next(iter(meta.keys()))]  # converts the first value: an unknown VR means implicit
        except NotImplementedError:
            continue
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise MalformedDicom(f"The DICOM file meta header could not be parsed ({type(exc).__name__}).") from None
        return meta, stream.tell()
    raise MalformedDicom("The DICOM file meta header could not be parsed.")


def is_deflated(meta: FileMetaDataset) -> bool:
    return str(meta.get("TransferSyntaxUID", "")).rstrip("\0 ") == DeflatedExplicitVRLittleEndian


def _header_of(prefix: bytes) -> tuple[Dataset, int | None]:
    """The elements before Pixel Data in an inflated prefix, and where Pixel Data starts (None: not in the prefix)."""
    reached: list[int] = []

    def at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag == PIXEL_DATA:
            reached.append(length)
            return True
        return False

    stream = io.BytesIO(prefix)
    try:
        # Large values (a private block) are skipped, not read: only the image attributes are needed here.
        header = read_dataset(
            stream, is_implicit_VR=False, is_little_endian=True, stop_when=at_pixel_data, defer_size=64 * 1024
        )
    except EOFError:  # the prefix ends inside an element: the header is longer than the prefix
        return Dataset(), None
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise MalformedDicom(f"The deflated dataset could not be parsed ({type(exc).__name__}).") from None
    return header, (stream.tell() if reached else None)


def _declared_pixel_bytes(header: Dataset, limits: DecodeLimits) -> int:
    """Bytes of pixel data the header declares, refused (422) above the decode limit, as the header checks do."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        frames = int(header.get("NumberOfFrames", 1) or 1)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        bits_allocated = int(header.BitsAllocated)
    except Exception:  # missing, or not numbers: the same refusal the header checks would give
        raise MalformedDicom("Rows, Columns or BitsAllocated is missing or not a number.") from None
    declared = rows * columns * max(frames, 1) * max(samples, 1) * max(-(-bits_allocated // 8), 1)
    if declared > limits.max_pixel_bytes:
        raise UnusableImage(f"The decoded image would take {declared} bytes; the limit is {limits.max_pixel_bytes}.")
    return declared


def inflated_size_limit(prefix: bytes, finished: bool, limits: DecodeLimits) -> int:
    """How many inflated bytes this dataset may have, judged from its first `max_header_bytes` inflated bytes."""
    header, pixel_data_at = _header_of(prefix)
    if pixel_data_at is None:
        if finished:  # the whole dataset is in hand (it has no Pixel Data: refused later, with that reason)
            return len(prefix)
        raise UnusableImage(
            f"The DICOM header (everything before Pixel Data) exceeds {limits.max_header_bytes} bytes once inflated."
        )
    return pixel_data_at + _declared_pixel_bytes(header, limits) + limits.max_header_bytes


def inflated_body(body: bytes, limits: DecodeLimits, header_only: bool = False) -> bytes:
    """`body` itself, or, when its meta header says the dataset is deflated, the same file in Explicit VR Little
    Endian with the dataset inflated under the caps.

    Raises UnusableImage (422) as soon as the inflated bytes exceed what the header allows (see the module
    docstring), MalformedDicom (400) for a corrupt or truncated deflate stream. `header_only`: inflate no more
    than `max_header_bytes`, for a reader that stops before the pixels; nothing is refused then.
    """
    found = read_file_meta(body)
    if found is None or not is_deflated(found[0]):
        return body
    meta, start = found
    out = bytearray(_explicit_meta(body, meta))  # the inflated dataset is appended to its new meta header
    dataset_at = len(out)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    source, read = memoryview(body)[start:], 0
    pending: bytes | memoryview = b""
    limit, judged = limits.max_header_bytes, False
    while True:
        if not pending and read < len(source):
            # zlib copies the input it has not consumed yet (unconsumed_tail) on every call: hand it a
            # slice at a time, not the rest of a body that may be 100 MiB.
            pending, read = source[read : read + INPUT_STEP], read + INPUT_STEP
        inflated = len(out) - dataset_at
        try:
            # At most one byte past the limit: enough to know it is exceeded, never more held in memory.
            piece = inflater.decompress(pending, min(INFLATE_STEP, limit + 1 - inflated))
        except zlib.error:
            raise MalformedDicom("The deflated dataset could not be inflated (corrupt deflate stream).") from None
        pending = inflater.unconsumed_tail
        out += piece
        inflated += len(piece)
        finished = inflater.eof or not (piece or pending or read < len(source))
        if header_only and (finished or inflated >= limit):
            return bytes(out)
        if not judged and (finished or inflated >= limit):
            with memoryview(out) as view:  # one copy of the prefix, not two
                prefix = bytes(view[dataset_at:])
            limit, judged = inflated_size_limit(prefix, finished, limits), True
            del prefix
        if inflated > limit:
            raise UnusableImage(
                f"The deflated dataset inflates to more than its header allows ({limit} bytes: the declared "
                f"image plus {limits.max_header_bytes} bytes of other elements)."
            )
        if finished:
            break
    if not inflater.eof:
        raise MalformedDicom("The deflated dataset is truncated.")
    return bytes(out)


def _explicit_meta(body: bytes, meta: FileMetaDataset) -> bytes:
    """Preamble, 'DICM' and the meta header with the transfer syntax of the inflated dataset."""
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # Written as it came (only the transfer syntax changed); the group length, if any, is left out rather
    # than stale: pydicom reads the meta group by its tags.
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength
    buffer = DicomBytesIO()
    try:
        write_file_meta_info(buffer, meta, enforce_standard=False)
    except Exception as exc:  # a value pydicom cannot write back
        raise MalformedDicom(f"The DICOM file meta header could not be re-encoded ({type(exc).__name__}).") from None
    return body[:132] + buffer.getvalue()
