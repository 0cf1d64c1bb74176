"""Pixel preprocessing shared by the service and training (one source of truth, no train/serve skew).

Stages, each a pure numpy function:
  stored pixels --modality LUT--> physical values --VOI (window / LUT)--> display range [0, 1]
  --MONOCHROME1 inverted--> "bright = dense" image --letterbox resize--> model input size
  --normalise--> float32 1xHxW model input.

Boxes travel the other way through `Letterbox.to_original`, so the service answers in the
original image's pixel space (x = column, y = row), the VinDr CSV convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class PixelParams:
    """The header values that turn stored pixels into the displayed image."""

    photometric: str  # MONOCHROME1 or MONOCHROME2
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_center: float | None = None
    window_width: float | None = None

    @classmethod
    def from_dataset(cls, ds: Any) -> PixelParams:
        center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
        if center is None or width is None or width < 1:
            # A window narrower than one stored value is meaningless (PS3.3 C.11.2.1.2): fall back
            # to the pixel range rather than producing a binary image.
            center = width = None
        return cls(
            photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
            rescale_slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            rescale_intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            window_center=center,
            window_width=width,
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


def apply_window(values: np.ndarray, center: float, width: float, out: np.ndarray | None = None) -> np.ndarray:
    """DICOM LINEAR window function (PS3.3 C.11.2.1.2.1), scaled to [0, 1]; into `out` (may be `values`) when given."""
    low = center - 0.5 - (width - 1.0) / 2.0
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if width == 1.0:  # degenerate window: a threshold at `low`
        np.greater(values, low, out=out)
        return out
    np.subtract(values, np.float32(center - 0.5), out=out)
    np.divide(out, np.float32(width - 1.0), out=out)
    np.add(out, np.float32(0.5), out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def scale_to_range(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Min-max to [0, 1] when the header carries no usable window; into `out` (may be `values`) when given."""
    low, high = float(values.min()), float(values.max())
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if high <= low:
        out.fill(0.0)
        return out
    np.subtract(values, np.float32(low), out=out)
    return np.divide(out, np.float32(high - low), out=out)


def display_image(pixels: np.ndarray, params: PixelParams) -> np.ndarray:
    """Stored pixels -> float32 image in [0, 1] where bright means dense (MONOCHROME2 look).

    Every step writes into one full-size float32 array: each temporary of a radiograph is a fresh
    multi-megabyte allocation whose pages the kernel must fault in and zero, which cost as much as
    the arithmetic itself. Same operations in the same order as the pure functions, so the same bits.
    """
    image = np.empty(pixels.shape, dtype=np.float32)
    apply_modality_lut(pixels, params.rescale_slope, params.rescale_intercept, out=image)
    if params.window_center is not None and params.window_width is not None:
        apply_window(image, params.window_center, params.window_width, out=image)
    else:
        scale_to_range(image, out=image)
    if params.photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), image, out=image)
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
