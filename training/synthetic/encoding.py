"""How a phantom's density image is stored: bit depth, sign, photometric interpretation, rescale, VOI window
and transfer syntax (README.md, step 6). `CODECS` is the one table of the 16 transfer syntaxes the generator
writes; `encode_dataset` is the one place that writes them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_encoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)


@dataclass(frozen=True)
class Codec:
    """How the generator writes one transfer syntax (see :func:`encode_dataset`)."""

    uid: str
    encoder: str  # who writes the pixels: "native", "pydicom:<plugin>", "imagecodecs:<function>"
    bits: tuple[int, ...] = (8, 12, 16)  # BitsStored values the codec can carry
    signed: bool = True  # PixelRepresentation 1 (two's complement) can be carried exactly
    lossy: bool = False
    method: str | None = None  # LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5.1) when lossy


# Names accepted by --transfer-syntax (their UIDs are accepted too). Only "explicit", "implicit"
# and "rle" are in the random default mix (_TS_WEIGHTS); the others are written when forced.
CODECS: dict[str, Codec] = {
    "explicit": Codec(ExplicitVRLittleEndian, "native"),
    "implicit": Codec(ImplicitVRLittleEndian, "native"),
    "big-endian": Codec(ExplicitVRBigEndian, "native"),  # retired, but still sent by some PACS
    "deflate": Codec(DeflatedExplicitVRLittleEndian, "native"),  # zlib-deflated dataset (pydicom)
    "rle": Codec(RLELossless, "pydicom:rle"),
    # JPEG processes 1 and 4 are lossy DCT codecs without a notion of sign: a two's complement
    # image would wrap around at zero, so they take unsigned data only. libjpeg-turbo writes 8-bit
    # data as baseline (SOF0), never as 8-bit process 2 (SOF1), so "jpeg-extended" is 12-bit.
    "jpeg-baseline": Codec(
        JPEGBaseline8Bit, "imagecodecs:jpeg8_encode", bits=(8,), signed=False, lossy=True, method="ISO_10918_1"
    ),
    "jpeg-extended": Codec(
        JPEGExtended12Bit, "imagecodecs:jpeg8_encode", bits=(12,), signed=False, lossy=True, method="ISO_10918_1"
    ),
    "jpeg-lossless": Codec(JPEGLossless, "imagecodecs:jpeg8_encode"),  # process 14, predictor 6
    "jpeg-lossless-sv1": Codec(JPEGLosslessSV1, "imagecodecs:jpeg8_encode"),  # predictor 1
    "jpeg-ls": Codec(JPEGLSLossless, "pydicom:pyjpegls"),
    "jpeg-ls-near": Codec(JPEGLSNearLossless, "pydicom:pyjpegls", lossy=True, method="ISO_14495_1"),
    "j2k": Codec(JPEG2000Lossless, "pydicom:pylibjpeg-openjpeg"),
    "j2k-lossy": Codec(JPEG2000, "pydicom:pylibjpeg-openjpeg", lossy=True, method="ISO_15444_1"),
    # OpenJPH writes the container's precision (8 or 16 bits) into the codestream, so 12-bit data
    # travels in a 16-bit HTJ2K codestream (values identical; pydicom decodes it exactly).
    "htj2k": Codec(HTJ2KLossless, "imagecodecs:htj2k_encode"),
    "htj2k-rpcl": Codec(HTJ2KLosslessRPCL, "imagecodecs:htj2k_encode"),
    "htj2k-lossy": Codec(HTJ2K, "imagecodecs:htj2k_encode", lossy=True, method="ISO_15444_15"),
}
TRANSFER_SYNTAXES = {name: codec.uid for name, codec in CODECS.items()}
_TS_WEIGHTS = {"explicit": 0.7, "implicit": 0.15, "rle": 0.15}
_UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}

# Lossy settings: visibly lossy, yet far below the display's 8-bit resolution of the density.
JPEG_QUALITY = 90  # libjpeg quality, processes 1 and 4
J2K_COMPRESSION_RATIO = 10.0  # JPEG 2000 irreversible (9/7) target ratio
HTJ2K_QSTEP = 0.01  # OpenJPH base quantisation step, relative to the data's own bit depth


def jpeg_ls_near(bits_stored: int) -> int:
    """The JPEG-LS NEAR parameter (largest absolute error, in stored values) for a bit depth:
    2, 16 and 255 (the largest NEAR JPEG-LS allows) for 8, 12 and 16 bits."""
    return min(255, max(2, 1 << (bits_stored - 8)))


@dataclass(frozen=True)
class PixelEncoding:
    """How the density image is stored: see :func:`choose_encoding` / :func:`encode_pixels`."""

    transfer_syntax: str
    photometric: str  # MONOCHROME1 or MONOCHROME2
    bits_stored: int  # 8, 12 or 16
    signed: bool  # PixelRepresentation 1
    slope: float
    intercept: float
    windowed: bool  # write WindowCenter/WindowWidth

    @property
    def bits_allocated(self) -> int:
        return 8 if self.bits_stored <= 8 else 16


def resolve_transfer_syntax(transfer_syntax: str) -> str:
    if transfer_syntax in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[transfer_syntax]
    if transfer_syntax in TRANSFER_SYNTAXES.values():
        return pydicom.uid.UID(transfer_syntax)
    raise ValueError(
        f"unsupported transfer syntax {transfer_syntax!r}; one of {sorted(TRANSFER_SYNTAXES)} or their UIDs"
    )


def codec_for(transfer_syntax: str) -> tuple[str, Codec]:
    """(name, Codec) for a transfer syntax given by name or UID."""
    uid = resolve_transfer_syntax(transfer_syntax)
    return next((name, codec) for name, codec in CODECS.items() if codec.uid == uid)


def can_encode(transfer_syntax: str) -> bool:
    """Whether this installation has the encoder the generator needs for `transfer_syntax`."""
    _, codec = codec_for(transfer_syntax)
    kind, _, what = codec.encoder.partition(":")
    if kind == "native":
        return True
    if kind == "pydicom":
        return get_encoder(codec.uid).is_available
    try:
        import imagecodecs
    except ImportError:
        return False
    module = {"jpeg8_encode": "JPEG8", "htj2k_encode": "HTJ2K"}[what]
    return bool(getattr(getattr(imagecodecs, module, None), "available", False))


def choose_encoding(
    rng: np.random.Generator,
    transfer_syntax: str | None = None,
    photometric: str | None = None,
    bits_stored: int | None = None,
    signed: bool | None = None,
    windowed: bool | None = None,
) -> PixelEncoding:
    """Draw how one image is stored; any argument given forces that choice.

    A drawn bit depth or sign the forced transfer syntax cannot carry is replaced by the nearest
    one it can (JPEG baseline: 8-bit unsigned); a forced one it cannot carry is an error. The
    random draws are the same whatever is forced, so the default mix is unaffected.
    """
    names = list(_TS_WEIGHTS)
    ts_draw = names[int(rng.choice(len(names), p=list(_TS_WEIGHTS.values())))]
    photo_draw = "MONOCHROME1" if rng.random() < 0.25 else "MONOCHROME2"
    bits_draw = int(rng.choice((8, 12, 16), p=(0.15, 0.45, 0.4)))
    signed_draw = bool(rng.random() < 0.15)
    rescale = [(1.0, 0.0), (1.0, -1024.0), (0.5, 0.0), (2.0, -100.0)][int(rng.choice(4, p=(0.7, 0.15, 0.1, 0.05)))]
    windowed_draw = bool(rng.random() < 0.8)
    photometric = photometric or photo_draw
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    bits = bits_stored or bits_draw
    if bits not in (8, 12, 16):
        raise ValueError(f"bits_stored must be 8, 12 or 16, not {bits}")
    name, codec = codec_for(transfer_syntax or ts_draw)
    if bits not in codec.bits:
        if bits_stored:
            raise ValueError(f"{name} cannot store {bits}-bit pixels (it takes {codec.bits})")
        bits = min(codec.bits, key=lambda b: (abs(b - bits), b))
    is_signed = signed_draw if signed is None else signed
    if is_signed and not codec.signed:
        if signed:
            raise ValueError(f"{name} cannot store signed pixels exactly")
        is_signed = False
    return PixelEncoding(
        transfer_syntax=codec.uid,
        photometric=photometric,
        bits_stored=bits,
        signed=is_signed,
        slope=rescale[0],
        intercept=rescale[1],
        windowed=windowed_draw if windowed is None else windowed,
    )


def encode_pixels(density: np.ndarray, enc: PixelEncoding, rng: np.random.Generator):
    """Quantise density to stored values; returns (array, window center, window width).

    Density 0..1 maps linearly onto a random sub-range [sv0, sv1] of the stored range (inverted
    for MONOCHROME1). The window spans exactly the modality values of sv0..sv1, so
    display = window(slope * SV + intercept) (then 1 - display for MONOCHROME1) == density.
    """
    bits = enc.bits_stored
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if enc.signed else (0, (1 << bits) - 1)
    span = hi - lo
    margin = 0.03 if bits == 8 else 0.15
    sv0 = lo + int(rng.uniform(0.0, margin) * span)
    sv1 = hi - int(rng.uniform(0.0, margin) * span)
    scaled = density * np.float32(sv1 - sv0)
    stored = np.float32(sv1) - scaled if enc.photometric == "MONOCHROME1" else scaled + np.float32(sv0)
    dtypes = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}
    dtype = dtypes[(enc.bits_allocated, enc.signed)]
    arr = np.clip(np.rint(stored), lo, hi).astype(dtype)
    m0 = enc.slope * sv0 + enc.intercept
    m1 = enc.slope * sv1 + enc.intercept
    return arr, (m0 + m1) / 2.0 + 0.5, (m1 - m0) + 1.0


def encode_dataset(ds: Dataset, transfer_syntax: str) -> None:
    """Put the (uncompressed, little endian) pixel data of `ds` into `transfer_syntax`, in place.

    The one place that knows about transfer syntaxes (:data:`CODECS`). pydicom's own encoders
    (``ds.compress``) write RLE, JPEG-LS and JPEG 2000; imagecodecs writes the JPEG processes
    (libjpeg-turbo) and HTJ2K (OpenJPH), encapsulated here. The SOP Instance UID never changes
    (image_id = md5 of it). Lossy syntaxes set LossyImageCompression "01" with the ratio and
    method, and drop Smallest/LargestImagePixelValue, which the decoded values may overshoot.
    """
    name, codec = codec_for(transfer_syntax)
    uid = codec.uid
    bits, is_signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    if bits not in codec.bits or (is_signed and not codec.signed):
        raise ValueError(
            f"{name} cannot store {bits}-bit {'signed' if is_signed else 'unsigned'} "
            f"pixels; use choose_encoding() to pick a compatible encoding"
        )
    if uid in _UNCOMPRESSED:  # Deflated is written by pydicom's dcmwrite (dataset-level zlib)
        ds.file_meta.TransferSyntaxUID = uid
        return
    if uid == ExplicitVRBigEndian:
        if ds.BitsAllocated > 8:  # OW is byte-swapped in big endian; OB (8-bit) is not
            arr = ds.pixel_array
            ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = uid
        return
    if codec.encoder.startswith("pydicom:"):
        if uid == JPEGLSNearLossless:
            near = jpeg_ls_near(bits)
            arr = ds.pixel_array
            if is_signed:
                # JPEG-LS has no sign: keep the error from crossing the two's complement wrap
                # (pydicom refuses otherwise) by pulling the extremes in by NEAR.
                lo, hi = -(1 << (bits - 1)) + near, (1 << (bits - 1)) - 1 - near
                arr = np.clip(arr, lo, hi).astype(arr.dtype)
            ds.compress(uid, arr, jls_error=near, generate_instance_uid=False)
        elif uid == JPEG2000:
            ds.compress(uid, j2k_cr=[J2K_COMPRESSION_RATIO], generate_instance_uid=False)
        else:
            ds.compress(uid, generate_instance_uid=False)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    else:
        frame = _imagecodecs_frame(uid, ds.pixel_array, bits, is_signed)
        ds.PixelData = encapsulate([frame])
        element = ds["PixelData"]
        element.VR = "OB"  # PS3.5 A.4: encapsulated pixel data is OB, undefined length
        element.is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = uid
    if codec.lossy:
        raw = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{raw / len(frame):.2f}"
        ds.LossyImageCompressionMethod = codec.method
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
    else:
        ds.LossyImageCompression = "00"


def _imagecodecs_frame(uid: str, arr: np.ndarray, bits: int, is_signed: bool) -> bytes:
    """One codestream for the syntaxes pydicom cannot write itself (JPEG processes, HTJ2K)."""
    try:
        import imagecodecs
    except ImportError:
        raise RuntimeError(f"writing {pydicom.uid.UID(uid).name} needs imagecodecs (pip install imagecodecs)") from None
    if uid in (JPEGLossless, JPEGLosslessSV1):
        if is_signed:  # JPEG has no sign: store the BitsStored-bit two's complement pattern
            unsigned = np.uint8 if arr.dtype.itemsize == 1 else np.uint16
            arr = arr.view(unsigned) & unsigned((1 << bits) - 1)
        predictor = 1 if uid == JPEGLosslessSV1 else 6
        return bytes(imagecodecs.jpeg8_encode(arr, lossless=True, predictor=predictor, bitspersample=bits))
    if uid in (JPEGBaseline8Bit, JPEGExtended12Bit):  # unsigned only (see CODECS)
        return bytes(imagecodecs.jpeg8_encode(arr, level=JPEG_QUALITY, bitspersample=bits))
    if uid in (HTJ2KLossless, HTJ2KLosslessRPCL):
        # OpenJPH's progression order is RPCL; for the RPCL syntax add TLM markers and one
        # tile-part per resolution, so a viewer can fetch a low resolution first.
        rpcl = uid == HTJ2KLosslessRPCL
        tileparts = imagecodecs.HTJ2K.TILEPART.RESOLUTIONS if rpcl else None
        return bytes(imagecodecs.htj2k_encode(arr, reversible=True, tlm=rpcl or None, tilepart=tileparts))
    if uid == HTJ2K:
        container = 8 * arr.dtype.itemsize  # the codestream's precision; the step is relative to it
        qstep = HTJ2K_QSTEP / (1 << (container - bits))
        return bytes(imagecodecs.htj2k_encode(arr, level=qstep, reversible=False))
    raise ValueError(f"no imagecodecs encoder for {uid}")


def dicom_bytes(ds: Dataset) -> bytes:
    """Part 10 bytes (128-byte preamble, DICM, file meta) of `ds`."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
