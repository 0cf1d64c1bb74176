"""Class activation maps -> each disease's `heatmap` in the JSON answer (`?include=heatmaps`).

The classifier's `heatmaps` output holds, per label, a map of logits at feature resolution (training/heatmaps.py:
the map's mean is the label's logit). The JSON carries each map as an 8-bit grayscale PNG at that resolution and
the rectangle of original pixels it covers:

    "heatmap": {"png": "<base64>", "x_min": -99.5, "y_min": -99.5, "x_max": 1543.5, "y_max": 1543.5}

- The PNG says where, the disease's `probability` says how likely. Pixel value v = round(255 * (m - mean) /
  (max - mean)), clipped at 0, for the map m of logits: 255 at the cell where the evidence for the disease is
  strongest, 0 wherever it is at or below the map's mean. The mean is not arbitrary: for a class activation map
  it equals the disease's logit, so a lit cell is one that argues for the disease more than the image as a whole
  does. Relative, so every map uses the full 8 bits (logit maps range over tens of units, and a fixed scale
  would saturate); a flat map is all 0.
- The rectangle is where the model input region the map covers lands in the original image, through the inverse
  of the letterbox: cells are centred on their receptive fields (the pack's `heatmaps.grid`), so the map starts
  half a cell above and left of the image, and on the image's short side it runs on over the model's padding.
  Draw the PNG stretched over the rectangle (bilinear), clipped to the image.

Pure functions of the model output and the letterbox geometry; the viewer outputs read the JSON form back
(service/viewer_outputs/heatmaps.py).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.dicom.preprocess import Letterbox


@dataclass(frozen=True)
class HeatmapGrid:
    """How a map lies on the model input: cell (i, j) covers origin + stride * j ... + stride, y alike."""

    stride: float
    origin: float

    @classmethod
    def from_manifest(cls, entry: dict | None, input_size: int, map_size: int) -> HeatmapGrid:
        grid = (entry or {}).get("grid") or {}
        # A pack without the grid: cells tile the input from its corner (no receptive-field shift known).
        return cls(float(grid.get("stride", input_size / map_size)), float(grid.get("origin", 0.0)))


def to_pixels(logits: np.ndarray) -> np.ndarray:
    """(..., h, w) logit maps -> uint8 maps, 255 at each map's maximum, 0 at or below its mean (module docstring)."""
    maps = np.asarray(logits, dtype=np.float64)
    mean = maps.mean(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - mean
    relative = np.divide(maps - mean, span, out=np.zeros_like(maps), where=span > 0)
    return np.rint(np.clip(relative, 0.0, 1.0) * 255.0).astype(np.uint8)


def region(geometry: Letterbox, grid: HeatmapGrid, rows: int, columns: int) -> dict[str, float]:
    """Original-pixel rectangle of a rows x columns map: the letterbox inverse of the model-input region it covers
    (not clipped to the image)."""
    sx, sy = geometry.scale_xy
    return {
        "x_min": round(grid.origin / sx, 2),
        "y_min": round(grid.origin / sy, 2),
        "x_max": round((grid.origin + grid.stride * columns) / sx, 2),
        "y_max": round((grid.origin + grid.stride * rows) / sy, 2),
    }


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def heatmaps_json(maps: np.ndarray, geometry: Letterbox, grid: HeatmapGrid) -> list[dict]:
    """(K, h, w) logit maps of one image -> K `heatmap` objects, in label order."""
    rows, columns = maps.shape[-2:]
    covered = region(geometry, grid, rows, columns)
    return [{"png": base64.b64encode(png_bytes(pixels)).decode("ascii"), **covered} for pixels in to_pixels(maps)]
