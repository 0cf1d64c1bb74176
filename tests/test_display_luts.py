"""The display follows the VOI LUT Sequence, VOI LUT Function, Presentation LUT Shape and Pixel Padding the way
pydicom's apply_voi_lut / apply_presentation_lut do, and the GSPS shows the image the same way."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi, apply_voi_lut, apply_windowing

from service.dicom.pipeline import InputSpec, prepare
from service.dicom.preprocess import Normalization
from service.viewer_outputs.gsps import build_gsps
from tests.dicom_checks import dciodvfy_errors
from training.synthetic import dicom_bytes, synthesize_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

SPEC = InputSpec(64, Normalization(0.5, 0.25))
RESULT = {"model": {"pack": "p", "version": "1"}, "findings": [], "diseases": []}


def _phantom(signed: bool = False, photometric: str = "MONOCHROME2", bits: int = 12) -> pydicom.Dataset:
    ds, _ = synthesize_instance(seed=51, rows=192, cols=160, bits_stored=bits, signed=signed, photometric=photometric)
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _shown(ds: pydicom.Dataset):
    """The service's display image and prepared image for this dataset, read back from its bytes."""
    prepared = prepare(dicom_bytes(ds), SPEC, keep_display=True)
    return prepared.display, prepared


def _stored(ds: pydicom.Dataset) -> np.ndarray:
    return pydicom.dcmread(io.BytesIO(dicom_bytes(ds))).pixel_array


def _lut_item(entries: int, first: int, bits: int, data: np.ndarray, as_ow: bool) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.LUTDescriptor = [entries, first, bits]
    if as_ow:
        item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())
    else:
        item.add_new(0x00283006, "US", [int(v) for v in data])
    return item


@pytest.mark.parametrize(
    "bits, entries, first, as_ow, rescale",
    [
        (16, 4096, 0, False, None),  # 12-bit input, 16-bit output, LUT Data as US
        (16, 3000, 500, True, None),  # fewer entries than inputs, a first mapped value, LUT Data as OW
        (12, 4096, 0, True, (1.0, -1024.0)),  # applied to modality values (rescaled)
        (8, 256, 1800, False, (0.0625, 1700.0)),  # an 8-bit LUT (pydicom wraps inputs past 255 entries: kept below)
    ],
)
def test_voi_lut_sequence_matches_pydicom(bits, entries, first, as_ow, rescale):
    """The first VOI LUT Sequence item maps modality values as pydicom's apply_voi_lut does (over the window)."""
    ds = _phantom()
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ramp = np.linspace(0, 1, entries) ** 0.6  # a gamma curve, as vendors' LUTs are
    data = np.rint(ramp * (2**bits - 1)).astype(np.uint16)
    ds.VOILUTSequence = [_lut_item(entries, first, bits, data, as_ow)]
    ds.WindowCenter, ds.WindowWidth = 100, 50  # present too: the LUT wins (pydicom's prefer_lut default)
    shown, _ = _shown(ds)
    expected = apply_voi_lut(apply_modality_lut(_stored(ds), ds), ds) / (2 ** int(data.max()).bit_length() - 1)
    np.testing.assert_allclose(shown, expected, atol=1e-6)


def test_eight_bit_lut_with_more_than_256_entries_reads_every_entry():
    """A 12-bit-in, 8-bit-out VOI LUT reads entry 300 for input 300 (pydicom's index wraps at 256 there)."""
    ds = _phantom()
    data = (np.arange(4096) // 16).astype(np.uint16)
    ds.VOILUTSequence = [_lut_item(4096, 0, 8, data, False)]
    stored = _stored(ds)
    shown, _ = _shown(ds)
    np.testing.assert_allclose(shown, data[np.clip(stored, 0, 4095)] / 255.0, atol=1e-6)
    assert not np.allclose(apply_voi(stored, ds) / 255.0, shown)  # where pydicom's own result differs


def test_lut_declared_wider_than_its_entries_is_scaled_by_their_range():
    """12-bit entries in a LUT declared 16 bits wide (as some CRs write it) display over the full range."""
    ds = _phantom()
    data = np.arange(4096, dtype=np.uint16)
    ds.VOILUTSequence = [_lut_item(4096, 0, 16, data, False)]
    shown, _ = _shown(ds)
    np.testing.assert_allclose(shown, np.clip(_stored(ds), 0, 4095) / 4095.0, atol=1e-6)


def _pydicom_window(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's windowing output scaled from its output range [y_min, y_max] to [0, 1]."""
    ends = apply_windowing(np.array([-1e30, 1e30]), ds.copy())  # far below and above the window: y_min, y_max
    return (apply_voi_lut(apply_modality_lut(stored, ds), ds.copy()) - ends[0]) / (ends[1] - ends[0])


@pytest.mark.parametrize("function", [None, "LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("signed, rescale", [(False, None), (True, (0.5, -200.0))])
@pytest.mark.parametrize("center, width", [(1500.0, 1800.0), (300.0, 0.5)])
def test_window_with_its_voi_lut_function_matches_pydicom(function, signed, rescale, center, width):
    """The window follows VOILUTFunction (absent = LINEAR) as pydicom's apply_windowing does, on rescaled signed data
    too; a width LINEAR does not allow falls back to the pixel range."""
    ds = _phantom(signed=signed)
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.WindowCenter, ds.WindowWidth = center, width
    if function:
        ds.VOILUTFunction = function
    shown, prepared = _shown(ds)
    stored = _stored(ds)
    if width < 1 and function in (None, "LINEAR"):
        values = apply_modality_lut(stored, ds)
        np.testing.assert_allclose(shown, (values - values.min()) / (values.max() - values.min()), atol=1e-5)
        assert prepared.display_range == pytest.approx((values.min(), values.max()))
        return
    np.testing.assert_allclose(shown, _pydicom_window(stored, ds), atol=1e-5)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("shape", ["INVERSE", "IDENTITY", None])
def test_presentation_lut_shape_decides_the_polarity(photometric, shape):
    """INVERSE inverts and IDENTITY does not, whatever the photometric interpretation (DX pairs INVERSE with
    MONOCHROME1), as pydicom's apply_presentation_lut; without a shape MONOCHROME1 is inverted."""
    ds = _phantom(photometric=photometric)
    ds.WindowCenter, ds.WindowWidth = 2000.0, 2000.0  # saturates: the VOI output reaches its maximum
    if shape:
        ds.PresentationLUTShape = shape
    shown, _ = _shown(ds)
    windowed = _pydicom_window(_stored(ds), ds)
    assert windowed.max() == 1.0  # where pydicom's inversion about the array's own maximum is the standard's
    if shape:
        expected = apply_presentation_lut(windowed, ds)
    else:
        expected = 1.0 - windowed if photometric == "MONOCHROME1" else windowed
    np.testing.assert_allclose(shown, expected, atol=1e-5)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("limit", [None, 40])
def test_padding_is_left_out_of_the_range_and_shown_black(photometric, limit):
    """Pixels at Pixel Padding Value (up to its Range Limit) do not count in the min-max range and display as 0."""
    ds = _phantom(photometric=photometric)
    stored = _stored(ds).copy()
    stored[:, :30] = 0  # a padded border far below the anatomy, as collimated CR/DX images have
    stored[:, 30:40] = 25
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.PixelPaddingValue = 0
    if limit is not None:
        ds.PixelPaddingRangeLimit = limit
    shown, prepared = _shown(ds)
    padding = stored <= 40 if limit is not None else stored == 0
    content = stored[~padding].astype(np.float64)
    expected = (stored - content.min()) / (content.max() - content.min())
    expected = 1.0 - expected if photometric == "MONOCHROME1" else expected
    np.testing.assert_allclose(shown[~padding], expected[~padding], atol=1e-5)
    assert (shown[padding] == 0.0).all()
    assert prepared.display_range == (content.min(), content.max())


def test_signed_padding_value_written_as_us_is_read_as_its_twos_complement():
    """On signed pixel data a Pixel Padding Value of 0x8000 written as US means -32768."""
    ds = _phantom(signed=True, bits=16)
    stored = _stored(ds).copy()
    stored[:20] = -32768
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.add_new(0x00280120, "US", 0x8000)
    shown, _ = _shown(ds)
    assert (shown[:20] == 0.0).all()
    # The anatomy spans the whole range; counted in, -32768 would have squeezed it into the upper half.
    assert shown[20:].min() == pytest.approx(0.0) and shown[20:].max() == pytest.approx(1.0)


def _voi_item(gsps: pydicom.Dataset) -> pydicom.Dataset:
    return gsps.SoftcopyVOILUTSequence[0]


def test_gsps_carries_the_voi_and_polarity_the_service_displayed(tmp_path):
    """The GSPS has the image's VOI LUT (scaled as displayed), its window with the VOI LUT Function, or the non-padding
    range; INVERSE exactly when the service inverted; and passes dciodvfy."""
    ds = _phantom(photometric="MONOCHROME1")
    ds.VOILUTSequence = [_lut_item(4096, 0, 16, np.arange(4096, dtype=np.uint16), False)]
    ds.PresentationLUTShape = "INVERSE"
    _, prepared = _shown(ds)
    gsps = build_gsps(prepared.header, RESULT, prepared.display_range)
    lut = _voi_item(gsps).VOILUTSequence[0]
    assert list(lut.LUTDescriptor) == [4096, 0, 16] and gsps.PresentationLUTShape == "INVERSE"
    assert dciodvfy_errors(gsps, tmp_path) == []

    ds = _phantom()
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1500.0, 1000.0, "SIGMOID"
    ds.PresentationLUTShape = "IDENTITY"
    _, prepared = _shown(ds)
    gsps = build_gsps(prepared.header, RESULT, prepared.display_range)
    voi = _voi_item(gsps)
    assert (float(voi.WindowCenter), float(voi.WindowWidth), voi.VOILUTFunction) == (1500.0, 1000.0, "SIGMOID")
    assert gsps.PresentationLUTShape == "IDENTITY"
    assert dciodvfy_errors(gsps, tmp_path) == []

    ds = _phantom()
    ds.WindowCenter, ds.WindowWidth = "", ""  # empty: no window (highdicom cannot copy it)
    stored = _stored(ds)
    ds.PixelPaddingValue = int(stored.max())
    _, prepared = _shown(ds)
    gsps = build_gsps(prepared.header, RESULT, prepared.display_range)
    low, high = float(stored[stored != stored.max()].min()), float(stored[stored != stored.max()].max())
    voi = _voi_item(gsps)
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == ((low + high) / 2 + 0.5, high - low + 1)
    assert dciodvfy_errors(gsps, tmp_path) == []
