"""Pixel preprocessing shared by the service and training (one source of truth, no train/serve skew).

Stages, each a pure numpy function:
  stored pixels --modality LUT--> physical values --VOI (window / LUT)--> display range [0, 1]
  --MONOCHROME1 inverted--> "bright = dense" image --letterbox resize--> model input size
  --normalise--> float32 1xHxW model input.

Boxes travel the other way through `Letterbox.to_original`, so the service answers in the
original image's pixel space (x = column, y = row), the VinDr CSV convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # PS3.3 C.11.2.1.3; absent means LINEAR


@dataclass(frozen=True, eq=False)
class VoiLut:
    """The first item of a VOI LUT Sequence (PS3.3 C.11.2.1.1): stored output values for consecutive inputs."""

    first_mapped: int  # the input mapped to data[0]; lower inputs map to data[0], those past the end to data[-1]
    data: np.ndarray  # output values, unsigned
    bits: int  # bits per entry, as the LUT Descriptor declares them

    @property
    def output_max(self) -> int:
        """The value that displays as white: the top of the smallest bit depth holding every entry.

        Not 2**bits - 1 from the descriptor: some devices (Agfa CRs among them) declare 16 bits for 12-bit
        entries, which would show the image at a sixteenth of its brightness; viewers (Horos, Cornerstone)
        scale by the entries' range the same way.
        """
        return max(2 ** max(int(self.data.max()).bit_length(), 1) - 1, 1)


@dataclass(frozen=True)
class PixelParams:
    """The header values that turn stored pixels into the displayed image (PS3.3 C.11, PS3.4 N.2)."""

    photometric: str  # MONOCHROME1 or MONOCHROME2
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_center: float | None = None
    window_width: float | None = None
    voi_function: str = "LINEAR"  # VOILUTFunction of the window: LINEAR, LINEAR_EXACT or SIGMOID
    voi_lut: VoiLut | None = None  # VOI LUT Sequence; used instead of the window when both are present
    presentation_shape: str | None = None  # PresentationLUTShape: IDENTITY or INVERSE
    padding: tuple[int, int] | None = None  # stored values that are padding (Pixel Padding Value / Range Limit)

    @property
    def inverted(self) -> bool:
        """Whether the display inverts the VOI output (so that bright means dense).

        A Presentation LUT Shape, when the image has one, says so itself: DX images pair INVERSE with
        MONOCHROME1 (PS3.3 C.8.11.1.1), and the inversion it stands for is the only one. Without it,
        MONOCHROME1 (low values bright) is inverted.
        """
        if self.presentation_shape is not None:
            return self.presentation_shape == "INVERSE"
        return self.photometric == "MONOCHROME1"

    @classmethod
    def from_dataset(cls, ds: Any) -> PixelParams:
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        if function not in VOI_FUNCTIONS:
            function = "LINEAR"  # an unknown function: the default one rather than none
        center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
        # LINEAR needs a width of at least one stored value; the other two any positive width (PS3.3
        # C.11.2.1.2.1, C.11.2.1.3). Otherwise fall back to the pixel range rather than a binary image.
        if center is None or width is None or width < (1 if function == "LINEAR" else 0) or width == 0:
            center = width = None
        shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
        return cls(
            photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
            rescale_slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            rescale_intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            window_center=center,
            window_width=width,
            voi_function=function,
            voi_lut=_voi_lut(ds),
            presentation_shape=shape if shape in ("IDENTITY", "INVERSE") else None,
            padding=_padding(ds),
        )


def _first_value(element: Any) -> float | None:
    """Window tags may hold several values (alternative windows); the first is the default one."""
    if element is None:
        return None
    value = element.value if hasattr(element, "value") else element
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _integers(value: Any) -> list[int] | None:
    """One integer or several as a list; None when any value is not an integer."""
    values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(number) and number == int(number) for number in numbers):
        return None
    return [int(number) for number in numbers]


def _voi_lut(ds: Any) -> VoiLut | None:
    """The first VOI LUT Sequence item, as pydicom's apply_voi reads it; None when absent or unusable.

    Unusable (then the window or the pixel range applies): bits per entry other than 8 or 10-16 (pydicom
    supports no others), fewer LUT Data values than the descriptor declares, or no sequence of items at all.
    """
    try:
        return _first_voi_lut_item(ds)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError):  # not a sequence, or items of odd types
        return None


def _first_voi_lut_item(ds: Any) -> VoiLut | None:
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    descriptor = _integers(item.get("LUTDescriptor"))
    if "LUTData" not in item or descriptor is None or len(descriptor) != 3:
        return None
    entries, first_mapped, bits = descriptor
    entries = entries or 2**16  # PS3.3 C.11.2.1.1: 0 means 2^16 entries
    if bits != 8 and not 10 <= bits <= 16:
        return None
    element = item["LUTData"]
    if element.VR == "OW" or isinstance(element.value, (bytes, bytearray)):
        little_endian = getattr(ds, "original_encoding", (None, True))[1] is not False
        data = np.frombuffer(bytes(element.value)[: 2 * entries], dtype="<u2" if little_endian else ">u2")
    else:
        values = _integers(element.value)
        data = np.asarray(values if values is not None else [], dtype=np.int64)
    if data.size < entries or data.min() < 0:
        return None
    return VoiLut(first_mapped=first_mapped, data=data[:entries].astype(np.uint16, copy=False), bits=bits)


def _padding(ds: Any) -> tuple[int, int] | None:
    """The stored values that are padding (PS3.3 C.7.5.1.1.2): Pixel Padding Value, or the range it spans with
    Pixel Padding Range Limit; None when the image declares none."""
    value = _integers(ds.get("PixelPaddingValue")) if "PixelPaddingValue" in ds else None
    if not value or len(value) != 1:
        return None
    limit = _integers(ds.get("PixelPaddingRangeLimit")) if "PixelPaddingRangeLimit" in ds else None
    ends = [value[0], limit[0]] if limit and len(limit) == 1 else [value[0], value[0]]
    bits = int(ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1 and bits in (8, 16, 32):
        # US or SS by the pixel representation; a signed value written as US reads as its two's complement.
        ends = [end - 2**bits if end >= 2 ** (bits - 1) else end for end in ends]
    return min(ends), max(ends)


def padding_mask(pixels: np.ndarray, padding: tuple[int, int] | None) -> np.ndarray | None:
    """True where a stored pixel is padding; None when there is no padding to mark."""
    if padding is None:
        return None
    low, high = padding
    mask = pixels == low if low == high else (pixels >= low) & (pixels <= high)
    return mask if mask.any() else None


def apply_modality_lut(pixels: np.ndarray, slope: float, intercept: float, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> physical values (PS3.3 C.11.1, linear rescale), as float32; into `out` when given."""
    if out is None:
        values = pixels.astype(np.float32, copy=False)
    else:
        values = out
        np.copyto(values, pixels, casting="unsafe")  # as astype: any stored integer type to float32
    if slope != 1.0 or intercept != 0.0:
        if out is None:
            return values * np.float32(slope) + np.float32(intercept)
        np.multiply(values, np.float32(slope), out=values)
        np.add(values, np.float32(intercept), out=values)
    return values


def apply_window(
    values: np.ndarray, center: float, width: float, out: np.ndarray | None = None, function: str = "LINEAR"
) -> np.ndarray:
    """A VOI window (PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3 LINEAR_EXACT and SIGMOID), scaled to [0, 1].

    The same mappings as pydicom's apply_windowing, whose output range [y_min, y_max] is [0, 1] here. Into
    `out` (may be `values`) when given.
    """
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if function == "SIGMOID":  # 1 / (1 + exp(-4 (x - c) / w))
        np.subtract(values, np.float32(center), out=out)
        np.multiply(out, np.float32(-4.0 / width), out=out)
        np.exp(out, out=out)
        np.add(out, np.float32(1.0), out=out)
        return np.reciprocal(out, out=out)
    if function == "LINEAR_EXACT":  # (x - c) / w + 0.5, clipped
        np.subtract(values, np.float32(center), out=out)
        np.divide(out, np.float32(width), out=out)
        np.add(out, np.float32(0.5), out=out)
        return np.clip(out, 0.0, 1.0, out=out)
    low = center - 0.5 - (width - 1.0) / 2.0
    if width == 1.0:  # degenerate window: a threshold at `low`
        np.greater(values, low, out=out)
        return out
    np.subtract(values, np.float32(center - 0.5), out=out)
    np.divide(out, np.float32(width - 1.0), out=out)
    np.add(out, np.float32(0.5), out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def apply_voi_lut_table(values: np.ndarray, lut: VoiLut, out: np.ndarray | None = None) -> np.ndarray:
    """A VOI LUT Sequence's table (PS3.3 C.11.2.1.1), scaled to [0, 1] by `lut.output_max`.

    Indexed as pydicom's apply_voi does (input - first mapped value, truncated, clipped to the table), except
    that the index never wraps: pydicom keeps it in the table's own integer type, so an 8-bit table of more
    than 256 entries (12-bit input, 8-bit output) reads the wrong entries there.
    """
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    index = np.subtract(values, np.float32(lut.first_mapped), dtype=np.float32)
    np.clip(index, 0, lut.data.size - 1, out=index)
    table = lut.data.astype(np.float32) / np.float32(lut.output_max)
    np.take(table, index.astype(np.intp), out=out)
    return out


def scale_to_range(values: np.ndarray, out: np.ndarray | None = None, exclude: np.ndarray | None = None) -> np.ndarray:
    """Min-max to [0, 1] when the header carries no usable window; into `out` (may be `values`) when given.

    `exclude` marks pixels left out of the range (padding), so that they cannot dominate it.
    """
    if exclude is None:
        low, high = float(values.min()), float(values.max())
    else:
        kept = values[~exclude]
        low, high = (float(kept.min()), float(kept.max())) if kept.size else (0.0, 0.0)
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if high <= low:
        out.fill(0.0)
        return out
    np.subtract(values, np.float32(low), out=out)
    return np.divide(out, np.float32(high - low), out=out)


def modality_range(pixels: np.ndarray, params: PixelParams, extremes: np.ndarray | None = None) -> tuple[float, float]:
    """(low, high) of the non-padding pixels' modality values: what the min-max fallback scales to [0, 1].

    `extremes`: the modality values of the stored minimum and maximum, when already at hand (no padding).
    """
    padding = padding_mask(pixels, params.padding)
    if padding is not None or extremes is None:
        kept = pixels if padding is None else pixels[~padding]
        if kept.size == 0:
            return 0.0, 0.0
        extremes = apply_modality_lut(
            np.array([kept.min(), kept.max()]), params.rescale_slope, params.rescale_intercept
        )
    return float(np.min(extremes)), float(np.max(extremes))


def display_image(pixels: np.ndarray, params: PixelParams) -> np.ndarray:
    """Stored pixels -> float32 image in [0, 1] where bright means dense (MONOCHROME2 look).

    Modality LUT -> VOI (the VOI LUT Sequence, else the window with its VOI LUT Function, else the range
    of the non-padding pixels) -> inversion (Presentation LUT Shape, else MONOCHROME1) -> padding pixels
    set to the display minimum (black).

    Every step writes into one full-size float32 array: each temporary of a radiograph is a fresh
    multi-megabyte allocation whose pages the kernel must fault in and zero, which cost as much as
    the arithmetic itself. Same operations in the same order as the pure functions, so the same bits.
    """
    image = np.empty(pixels.shape, dtype=np.float32)
    padding = padding_mask(pixels, params.padding)
    apply_modality_lut(pixels, params.rescale_slope, params.rescale_intercept, out=image)
    if params.voi_lut is not None:
        apply_voi_lut_table(image, params.voi_lut, out=image)
    elif params.window_center is not None and params.window_width is not None:
        apply_window(image, params.window_center, params.window_width, out=image, function=params.voi_function)
    else:
        scale_to_range(image, out=image, exclude=padding)
    if params.inverted:
        np.subtract(np.float32(1.0), image, out=image)
    if padding is not None:
        image[padding] = 0.0
    return image


@dataclass(frozen=True)
class Letterbox:
    """Aspect-preserving resize into a size x size canvas, anchored at the top-left corner.

    Anchoring at the origin (padding only right/bottom) makes the box mapping a pure per-axis
    scale, with no offsets to get wrong.
    """

    rows: int
    columns: int
    size: int

    @property
    def resized_shape(self) -> tuple[int, int]:
        scale = self.size / max(self.rows, self.columns)
        return (
            max(1, min(self.size, round(self.rows * scale))),
            max(1, min(self.size, round(self.columns * scale))),
        )

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Model pixels per original pixel along x (columns) and y (rows)."""
        resized_rows, resized_columns = self.resized_shape
        return resized_columns / self.columns, resized_rows / self.rows

    def to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Original-space xyxy boxes -> model-input-space xyxy boxes."""
        sx, sy = self.scale_xy
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.float32([sx, sy, sx, sy])

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Model-input-space xyxy boxes -> original-space boxes, clipped to the image."""
        sx, sy = self.scale_xy
        original = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / np.float32([sx, sy, sx, sy])
        original[:, 0::2] = np.clip(original[:, 0::2], 0.0, self.columns)
        original[:, 1::2] = np.clip(original[:, 1::2], 0.0, self.rows)
        return original


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize a [0, 1] image into a size x size canvas (zero padding) and return the mapping."""
    geometry = Letterbox(rows=image.shape[0], columns=image.shape[1], size=size)
    resized_rows, resized_columns = geometry.resized_shape
    # PIL's float ("F") bilinear resize antialiases when downscaling, like the radiologist's view
    # at that scale; it is deterministic and identical in training and serving.
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
        (resized_columns, resized_rows), Image.Resampling.BILINEAR
    )
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[:resized_rows, :resized_columns] = np.asarray(resized, dtype=np.float32)
    return canvas, geometry


@dataclass(frozen=True)
class Normalization:
    mean: float
    std: float

    def apply(self, image: np.ndarray) -> np.ndarray:
        return ((image - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32, copy=False)


def model_input(display: np.ndarray, size: int, normalization: Normalization) -> tuple[np.ndarray, Letterbox]:
    """Display image ([0, 1], original size) -> (1 x size x size float32 model input, box mapping)."""
    canvas, geometry = letterbox(display, size)
    return normalization.apply(canvas)[np.newaxis], geometry
