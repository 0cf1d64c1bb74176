"""Pixel decoders of the base install: permissive licences only, and none that can take the process down.

pylibjpeg-libjpeg (GPLv3) is not part of the service (tests/test_licences.py). What pydicom decodes each
compressed syntax with instead (tests/test_transfer_syntaxes.py checks every one; lossless ones bit-exact):

- JPEG Baseline: Pillow, then imagecodecs (both libjpeg-turbo)
- JPEG Extended (8 and 12 bits), JPEG Lossless (process 14 and its SV1 form): imagecodecs' libjpeg-turbo,
  through the plugin below (pydicom has no imagecodecs plugin; its Pillow one refuses 12-bit samples)
- JPEG-LS: pyjpegls (CharLS)
- JPEG 2000: pylibjpeg-openjpeg, then Pillow (OpenJPEG too); HTJ2K: pylibjpeg-openjpeg
- RLE: pylibjpeg-rle, then pydicom's own decoder

Two plugins are taken out of pydicom's lists for these syntaxes even when their packages are installed, so that
the service decodes alike everywhere: pylibjpeg's (for the JPEG and JPEG-LS syntaxes it means pylibjpeg-libjpeg,
GPLv3, which a training or developer environment may still have), and GDCM's (python-gdcm, BSD): on a corrupt
JPEG Baseline stream GDCM throws a C++ exception nothing catches and the process aborts (SIGABRT), where every
plugin above raises an error the service answers with a 4xx.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from pydicom import uid
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner

# Imported only when such an image arrives: it is a large package.
HAVE_IMAGECODECS = importlib.util.find_spec("imagecodecs") is not None

# What pydicom's plugin interface asks of this module: the syntaxes it decodes and what it needs for them.
JPEG_SYNTAXES = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1)
DECODER_DEPENDENCIES = dict.fromkeys(JPEG_SYNTAXES, ("imagecodecs>=2024.1",))
_PLUGIN = ("imagecodecs", ("service.dicom.codecs", "decode_jpeg_frame"))
# Plugins never used, per syntax (see above).
_EXCLUDED = {
    **dict.fromkeys((*JPEG_SYNTAXES, uid.JPEGLSLossless, uid.JPEGLSNearLossless), ("pylibjpeg", "gdcm")),
    **dict.fromkeys((uid.JPEG2000Lossless, uid.JPEG2000), ("gdcm",)),
}


def is_available(syntax: str) -> bool:
    """Whether this module can decode `syntax` here (pydicom's plugin interface)."""
    return HAVE_IMAGECODECS and syntax in DECODER_DEPENDENCIES


def decode_jpeg_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One JPEG frame (8 to 16-bit samples, lossy or lossless) decoded by libjpeg-turbo, as little-endian values.

    Signed data comes out as the unsigned values of its bits; pydicom converts them as it does for every JPEG
    plugin.
    """
    from imagecodecs import jpeg8_decode

    frame = np.asarray(jpeg8_decode(src))
    if frame.ndim != 2 and runner.samples_per_pixel == 1:
        raise ValueError(f"expected one sample per pixel, the JPEG stream decoded to shape {frame.shape}")
    return frame.astype(f"<u{max(runner.bits_allocated // 8, 1)}", copy=False).tobytes()


def configure_pixel_decoders() -> None:
    """Take the excluded plugins out and add the imagecodecs plugin for the JPEG syntaxes; idempotent."""
    for syntax, labels in _EXCLUDED.items():
        decoder = get_decoder(syntax)
        for label in labels:
            if label in decoder._available or label in decoder._unavailable:  # no public way to ask for a label
                decoder.remove_plugin(label)
    for syntax in JPEG_SYNTAXES:
        decoder = get_decoder(syntax)
        if _PLUGIN[0] not in decoder._available and _PLUGIN[0] not in decoder._unavailable:
            decoder.add_plugin(*_PLUGIN)
