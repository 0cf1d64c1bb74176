"""Pixel preprocessing: DICOM LUT maths, letterbox geometry and the box round trip."""

import numpy as np
import pytest

from service.dicom.preprocess import (
    Letterbox,
    Normalization,
    PixelParams,
    apply_modality_lut,
    apply_window,
    display_image,
    letterbox,
    model_input,
    scale_to_range,
)


def test_modality_lut_applies_slope_and_intercept():
    """Stored values become slope * value + intercept as float32."""
    out = apply_modality_lut(np.array([[0, 10], [20, 4095]], dtype=np.uint16), 0.5, -1024.0)
    np.testing.assert_array_equal(out, np.array([[-1024, -1019], [-1014, 1023.5]], dtype=np.float32))
    assert out.dtype == np.float32


def test_window_follows_dicom_linear_function():
    """The LINEAR window of PS3.3 C.11.2.1.2.1 maps c-0.5-(w-1)/2 to 0 and c-0.5+(w-1)/2 to 1."""
    center, width = 100.0, 41.0
    values = np.array([0, 79.5, 99.5, 119.5, 200], dtype=np.float32)
    np.testing.assert_allclose(apply_window(values, center, width), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_range_scaling_handles_constant_images():
    """Min-max scaling spans [0, 1] and a constant image becomes zeros instead of NaN."""
    np.testing.assert_allclose(scale_to_range(np.array([2.0, 4.0, 6.0], dtype=np.float32)), [0, 0.5, 1])
    assert not np.isnan(scale_to_range(np.full((4, 4), 7.0, dtype=np.float32))).any()


def test_monochrome1_is_inverted():
    """MONOCHROME1 (bright = low value) displays as the inverse of the same MONOCHROME2 data."""
    pixels = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    m2 = display_image(pixels, PixelParams("MONOCHROME2", window_center=150, window_width=301))
    m1 = display_image(pixels, PixelParams("MONOCHROME1", window_center=150, window_width=301))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_window_is_read_from_multivalued_tags():
    """The first of several windows is the default one; an unusable width falls back to the pixel range."""
    import pydicom

    ds = pydicom.Dataset()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter = [300, 500]
    ds.WindowWidth = [600, 1000]
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    assert PixelParams.from_dataset(ds) == PixelParams("MONOCHROME1", 2.0, -10.0, 300.0, 600.0)
    ds.WindowWidth = 0
    assert PixelParams.from_dataset(ds).window_width is None


@pytest.mark.parametrize("rows,columns", [(1643, 1349), (1349, 1643), (512, 512), (777, 2001)])
def test_letterbox_geometry_round_trips(rows, columns):
    """Boxes mapped into model space and back are unchanged (pure geometry, any aspect ratio)."""
    geometry = Letterbox(rows, columns, 256)
    boxes = np.array([[0, 0, columns, rows], [123.4, 456.7, 890.1, 700.0]], dtype=np.float32)
    boxes = np.minimum(boxes, [columns, rows, columns, rows])
    np.testing.assert_allclose(geometry.to_original(geometry.to_model(boxes)), boxes, atol=1e-3)
    assert max(geometry.resized_shape) == 256


def _edges(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel positions where a 0..1 step profile crosses 0.5 (rising, then falling)."""
    above = np.nonzero(profile >= 0.5)[0]
    first, last = above[0], above[-1]
    rise = first - 1 + (0.5 - profile[first - 1]) / (profile[first] - profile[first - 1])
    fall = last + (profile[last] - 0.5) / (profile[last] - profile[last + 1])
    return float(rise + 0.5), float(fall + 0.5)  # pixel centres sit at i + 0.5


def test_box_drawn_on_unusual_size_survives_preprocessing_round_trip():
    """A rectangle drawn at known coordinates on a 1643x1349 image is found, after resizing to the model
    input and mapping back, at the same coordinates within two original pixels."""
    rows, columns = 1643, 1349
    x_min, y_min, x_max, y_max = 412, 533, 981, 1210
    pixels = np.full((rows, columns), 100, dtype=np.uint16)
    pixels[y_min:y_max, x_min:x_max] = 3000
    display = display_image(pixels, PixelParams("MONOCHROME2"))
    tensor, geometry = model_input(display, 256, Normalization(0.5, 0.25))
    image = tensor[0] * 0.25 + 0.5
    inside_rows, inside_columns = np.nonzero(image > 0.5)
    centre_row = image[int(np.median(inside_rows))]
    centre_column = image[:, int(np.median(inside_columns))]
    found_x_min, found_x_max = _edges(centre_row)
    found_y_min, found_y_max = _edges(centre_column)
    recovered = geometry.to_original(np.array([found_x_min, found_y_min, found_x_max, found_y_max]))[0]
    np.testing.assert_allclose(recovered, [x_min, y_min, x_max, y_max], atol=2.0)


def test_letterbox_pads_right_and_bottom_with_zero():
    """The resized image sits at the top-left; padding is black (0) before normalisation."""
    canvas, geometry = letterbox(np.ones((100, 50), dtype=np.float32), 64)
    assert geometry.resized_shape == (64, 32)
    assert canvas[:, :32].min() == pytest.approx(1.0, abs=1e-5)
    assert canvas[:, 32:].max() == 0.0


def _display_by_expression(pixels: np.ndarray, params: PixelParams) -> np.ndarray:
    """The display transform written as plain numpy expressions (one temporary per step), as it was first written."""
    values = pixels.astype(np.float32)
    if params.rescale_slope != 1.0 or params.rescale_intercept != 0.0:
        values = values * np.float32(params.rescale_slope) + np.float32(params.rescale_intercept)
    if params.window_center is not None and params.window_width is not None:
        center, width = params.window_center, params.window_width
        if width == 1.0:
            image = (values > center - 0.5).astype(np.float32)
        else:
            image = np.clip((values - np.float32(center - 0.5)) / np.float32(width - 1.0) + np.float32(0.5), 0.0, 1.0)
    else:
        low, high = float(values.min()), float(values.max())
        image = (np.zeros_like(values) if high <= low else (values - np.float32(low)) / np.float32(high - low)).astype(
            np.float32
        )
    return 1.0 - image if params.photometric == "MONOCHROME1" else image


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int32, np.float32])
def test_in_place_display_transform_gives_the_same_bits_as_the_expressions(dtype):
    """display_image works in one buffer for speed; training and serving must still see the very same floats."""
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    noise = rng.integers(info.min, info.max, (61, 47), endpoint=True) if info else rng.normal(0, 900, (61, 47))
    for pixels in (noise.astype(dtype), np.full((20, 30), 7, dtype)):
        before = pixels.copy()
        for slope, intercept in [(1.0, 0.0), (0.5, -1024.0), (-2.0, 3.0), (3.7, 12.5)]:
            for center, width in [(None, None), (2048.0, 4096.0), (100.5, 1.0), (-500.0, 30000.0)]:
                for photometric in ("MONOCHROME1", "MONOCHROME2"):
                    params = PixelParams(photometric, slope, intercept, center, width)
                    got = display_image(pixels, params)
                    assert got.dtype == np.float32
                    np.testing.assert_array_equal(got, _display_by_expression(pixels, params), err_msg=str(params))
        np.testing.assert_array_equal(pixels, before)  # the decoded pixels are never written to


def test_window_and_range_write_into_a_given_buffer():
    """With `out`, the pure functions fill that buffer (it may be the input) and return it."""
    values = np.array([0, 79.5, 99.5, 119.5, 200], dtype=np.float32)
    expected = apply_window(values, 100.0, 41.0)
    assert apply_window(values, 100.0, 41.0, out=values) is values
    np.testing.assert_array_equal(values, expected)
    ramp = np.array([2.0, 4.0, 6.0], dtype=np.float32)
    assert scale_to_range(ramp, out=ramp) is ramp
    np.testing.assert_allclose(ramp, [0, 0.5, 1])
