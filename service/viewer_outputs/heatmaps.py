"""A JSON `heatmap` (service/inference/heatmaps.py) as a viewer shows it: decoded, resampled onto the image's
pixel grid, its peak located, and coloured for the PNG overlay.

Resampling is what a client drawing the PNG stretched over its rectangle sees: bilinear between cell centres,
nothing outside the rectangle. Pure numpy/PIL; no model, no FastAPI.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

REGION_KEYS = ("x_min", "y_min", "x_max", "y_max")


def decode(heatmap: dict) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A JSON `heatmap` back to its uint8 (h, w) map and its (x_min, y_min, x_max, y_max) rectangle."""
    with Image.open(io.BytesIO(base64.b64decode(heatmap["png"]))) as image:
        pixels = np.asarray(image.convert("L"))
    return pixels, tuple(float(heatmap[key]) for key in REGION_KEYS)  # type: ignore[return-value]


def on_image(heatmap: dict, rows: int, columns: int, scale: float = 1.0) -> np.ndarray:
    """A JSON `heatmap` resampled onto the image's pixel grid: (rows, columns) float32 in [0, 1], bilinear between
    cell centres, 0 where the map does not reach (what a viewer drawing the PNG over its rectangle shows).

    `scale` < 1 samples a reduced copy of the image (rows and columns already scaled; the rectangle is scaled here)."""
    pixels, rectangle = decode(heatmap)
    x_min, y_min, x_max, y_max = (value * scale for value in rectangle)
    h, w = pixels.shape
    # Image pixel centres (c + 0.5) in map cell units, where cell centres sit at integer + 0.5.
    u = ((np.arange(columns) + 0.5) - x_min) * w / (x_max - x_min) - 0.5
    v = ((np.arange(rows) + 0.5) - y_min) * h / (y_max - y_min) - 0.5
    values = _bilinear(pixels.astype(np.float32) / 255.0, v, u)
    inside = ((v >= -0.5) & (v <= h - 0.5))[:, None] & ((u >= -0.5) & (u <= w - 0.5))[None, :]
    return np.where(inside, values, 0.0).astype(np.float32)


def _bilinear(grid: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Separable bilinear sampling of `grid` at rows `v` x columns `u` (edge cells extend to the map's border)."""
    h, w = grid.shape
    v, u = np.clip(v, 0, h - 1), np.clip(u, 0, w - 1)
    v0, u0 = np.floor(v).astype(int), np.floor(u).astype(int)
    v1, u1 = np.minimum(v0 + 1, h - 1), np.minimum(u0 + 1, w - 1)
    fv, fu = (v - v0)[:, None], (u - u0)[None, :]
    top = grid[v0][:, u0] * (1 - fu) + grid[v0][:, u1] * fu
    bottom = grid[v1][:, u0] * (1 - fu) + grid[v1][:, u1] * fu
    return top * (1 - fv) + bottom * fv


def strength(disease: dict) -> float:
    """How strongly to draw a disease's map: its probability over its operating threshold, at most 1, so a disease
    the pack reports as positive is drawn in full and an unlikely one faintly (the map itself is relative)."""
    threshold = float(disease.get("threshold") or 0.0)
    probability = float(disease["probability"])
    return 1.0 if threshold <= 0.0 else min(1.0, probability / threshold)


def peak(heatmap: dict) -> tuple[float, float]:
    """(x, y) in original pixels of a JSON heatmap's peak: the centre of the cell holding its largest value (the
    centroid of those cells, should several tie)."""
    pixels, (x_min, y_min, x_max, y_max) = decode(heatmap)
    h, w = pixels.shape
    rows, columns = np.nonzero(pixels == pixels.max())
    return (
        x_min + (columns.mean() + 0.5) * (x_max - x_min) / w,
        y_min + (rows.mean() + 0.5) * (y_max - y_min) / h,
    )


# matplotlib's "inferno" (perceptually uniform, readable in grey and by colour-blind readers) at nine stops,
# interpolated linearly: dark purple for weak evidence, yellow for strong. Copied so the service needs no matplotlib.
INFERNO = np.array(
    [
        (0, 0, 4),
        (33, 12, 74),
        (87, 16, 110),
        (138, 34, 106),
        (188, 55, 84),
        (228, 90, 49),
        (249, 142, 9),
        (249, 203, 53),
        (252, 255, 164),
    ],
    dtype=np.float32,
)
MAX_OPACITY = 0.75  # the strongest evidence still lets the anatomy under it show through


def colour(values: np.ndarray) -> np.ndarray:
    """[0, 1] values (any shape) -> inferno RGB float32 in [0, 255], shape (..., 3)."""
    stops = np.linspace(0.0, 1.0, len(INFERNO))
    flat = np.clip(values, 0.0, 1.0).ravel()
    rgb = np.stack([np.interp(flat, stops, INFERNO[:, c]) for c in range(3)], axis=-1)
    return rgb.reshape(*np.shape(values), 3).astype(np.float32)


def overlay(grey: np.ndarray, heat: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """uint8 RGB of a greyscale image (H, W uint8) under a heat map (H, W in [0, 1]): colour from the map, opacity
    growing with it (times `strength` in [0, 1]), so cells without evidence leave the image as it is."""
    alpha = (MAX_OPACITY * float(np.clip(strength, 0.0, 1.0)) * np.clip(heat, 0.0, 1.0))[..., None]
    base = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)
    return np.rint(base * (1.0 - alpha) + colour(heat) * alpha).astype(np.uint8)
