"""Deflated datasets inflate under a byte cap: deflate bombs are refused (4xx) without the server's memory growing."""

from __future__ import annotations

import copy
import io
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from service.dicom.decode import read_dataset
from service.dicom.deflate import inflated_body
from service.errors import MalformedDicom, UnusableImage
from service.settings import DecodeLimits
from tests.live import LiveService
from training.synthetic import dicom_bytes, synthesize_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

ZERO_BLOCK = 1 << 20
GIB = 1 << 30
MAX_LENGTH = 0xFFFFFFFE  # the longest even value a 4-byte length can declare


def _deflate(*segments: bytes | int) -> bytes:
    """Raw deflate of the segments in order, an int being that many zero bytes, built in milliseconds at any size.

    After a full flush the compressor starts afresh, so 1 MiB of zeros always compresses to the same block, and
    that block repeated is a valid stream of that many mebibytes of zeros (about 1000:1).
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(bytes(ZERO_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream: list[bytes] = []
    for segment in segments:
        if isinstance(segment, int):
            blocks, rest = divmod(segment, ZERO_BLOCK)
            stream += [block * blocks, compressor.compress(bytes(rest)) + compressor.flush(zlib.Z_FULL_FLUSH)]
        else:
            stream.append(compressor.compress(segment) + compressor.flush(zlib.Z_FULL_FLUSH))
    return b"".join(stream) + compressor.flush()


def _element_header(group: int, element: int, vr: bytes, length: int) -> bytes:
    """Explicit VR little-endian element header with a 4-byte length (OB, UN, ...)."""
    return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", length)


def _parts(ds: pydicom.Dataset) -> tuple[bytes, bytes, bytes]:
    """(preamble + meta naming the deflated syntax, dataset bytes before Pixel Data, Pixel Data element) of `ds`."""
    meta = ds.file_meta
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    pixels = ds.PixelData
    del ds.PixelData
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    return (
        b"\0" * 128 + b"DICM" + buffer.getvalue(),
        header.getvalue(),
        _element_header(0x7FE0, 0x0010, b"OW", len(pixels)) + pixels,
    )


@pytest.fixture(scope="module")
def phantom() -> pydicom.Dataset:
    ds, _ = synthesize_instance(seed=31, rows=256, cols=224, bits_stored=12)
    return ds


def bomb(phantom: pydicom.Dataset, where: str, zeros: int) -> bytes:
    """A deflated phantom with `zeros` zero bytes added: in private elements, in Pixel Data, or after it."""
    meta, header, pixel_data = _parts(copy.deepcopy(phantom))
    if where == "private":  # (0009,10xx) OB elements before Pixel Data, as a vendor's private block would be
        creator = struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 8) + b"BOMBCORP"
        elements: list[bytes | int] = [header + creator]
        for index, start in enumerate(range(0, zeros, MAX_LENGTH)):
            length = min(MAX_LENGTH, zeros - start)
            elements += [_element_header(0x0009, 0x1000 + index, b"OB", length), length]
        return meta + _deflate(*elements, pixel_data)
    if where == "pixels":  # Pixel Data far longer than Rows x Columns needs
        pixels = pixel_data[12:]
        return meta + _deflate(header + _element_header(0x7FE0, 0x0010, b"OW", len(pixels) + zeros) + pixels, zeros)
    if where == "trailing":  # Data Set Trailing Padding (FFFC,FFFC) after the pixels
        return meta + _deflate(header + pixel_data + _element_header(0xFFFC, 0xFFFC, b"OB", zeros), zeros)
    raise ValueError(where)


def test_deflated_phantom_reads_like_the_uncompressed_one():
    """A deflated phantom inflates to the same header and pixels pydicom reads from it directly."""
    ds, _ = synthesize_instance(seed=32, rows=256, cols=224, transfer_syntax="deflate")
    body = dicom_bytes(ds)
    direct, bounded = pydicom.dcmread(io.BytesIO(body)), read_dataset(body)
    assert np.array_equal(direct.pixel_array, bounded.pixel_array)
    assert bounded.PatientID == direct.PatientID and bounded.SOPInstanceUID == direct.SOPInstanceUID
    assert bounded.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


@pytest.mark.parametrize("where", ["private", "pixels", "trailing"])
def test_bomb_is_refused_before_it_inflates(phantom, where):
    """A 1 GiB deflate bomb (about 1 MiB of body) is refused with 422 after inflating no more than the caps allow."""
    import tracemalloc

    data = bomb(phantom, where, GIB)
    assert len(data) < 1.2 * 1024 * 1024
    limits = DecodeLimits()
    tracemalloc.start()
    try:
        with pytest.raises(UnusableImage, match="header"):
            inflated_body(data, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Held at most: the header allowance, or the declared image plus it twice; here far below a gigabyte.
    assert peak < 3 * limits.max_header_bytes + 256 * 224 * 2 + (1 << 20), peak


def test_a_small_header_allowance_refuses_big_headers_and_truncated_streams_are_malformed(phantom):
    """The header allowance is a setting; a deflate stream cut short is malformed (400), not a partial image."""
    data = bomb(phantom, "private", 256 * 1024)
    assert read_dataset(data, DecodeLimits()).Rows == 256  # 256 KiB of private data fit the 4 MiB allowance
    with pytest.raises(UnusableImage, match="exceeds 131072 bytes"):
        read_dataset(data, DecodeLimits(max_header_bytes=128 * 1024))
    ds, _ = synthesize_instance(seed=33, rows=256, cols=224, transfer_syntax="deflate")
    body = dicom_bytes(ds)
    with pytest.raises(MalformedDicom):
        read_dataset(body[: len(body) - 200])


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_server_refuses_bombs_without_growing(tiny_pack, tmp_path, phantom):
    """Bombs of 0.4 to 15 GiB (up to the body cap) get 422 JSON errors, RSS grows < 32 MiB, the server still serves."""
    env = {"CXR_DECODE_WORKERS": "1", "CXR_MAX_BODY_BYTES": str(16 * 1024 * 1024), "CXR_MAX_BATCH_SIZE": "2"}
    good = dicom_bytes(synthesize_instance(seed=34, rows=256, cols=224, transfer_syntax="deflate")[0])
    bombs = [("pixels", 400 * 1024 * 1024), ("private", GIB), ("trailing", 2 * GIB), ("private", 15 * GIB)]
    bombs = [(where, zeros, bomb(phantom, where, zeros)) for where, zeros in bombs]
    with LiveService(tiny_pack, tmp_path / "server.log", env=env) as server:

        def post(data: bytes, **params) -> httpx.Response:
            headers = {"Content-Type": "application/dicom"}
            return httpx.post(f"{server.base}/v1/predict", content=data, params=params, headers=headers, timeout=60)

        # Warm up every path a bomb takes (a good deflated image, JSON and SR), and receiving a body as large as
        # the largest bomb (not DICOM: 400), so that the growth measured is the inflation's alone.
        for _ in range(3):
            assert post(good).status_code == 200 and post(good, format="sr").status_code == 200
            assert post(b"\xff" * len(bombs[-1][2])).status_code == 400
        baseline = _rss_kib(server.process.pid)
        for where, zeros, data in bombs:
            response = post(data)
            assert response.status_code == 422 and response.json()["error"]["code"] == "unusable_image", response.text
            growth_mib = (_rss_kib(server.process.pid) - baseline) / 1024
            print(f"{where} bomb of {zeros / GIB:.2f} GiB in {len(data) / 2**20:.2f} MiB: RSS +{growth_mib:.1f} MiB")
            assert growth_mib < 32, (where, zeros, growth_mib)
        # A STOW-RS body carrying a bomb: the instance fails, its failure report reads no more than the header.
        boundary = "bombboundary"
        stow = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + bombs[2][2]
        stow += f"\r\n--{boundary}--\r\n".encode()
        response = httpx.post(
            f"{server.base}/v1/studies",
            content=stow,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
            timeout=60,
        )
        assert response.status_code == 409, response.text
        assert (_rss_kib(server.process.pid) - baseline) / 1024 < 32
        assert post(good).status_code == 200
