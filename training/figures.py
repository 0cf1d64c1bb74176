"""Saving report figures as small PNGs (they ship inside model packs, which must stay small)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PALETTE_COLOURS = 256  # line plots use a few dozen colours; an adaptive palette keeps them and anti-aliasing


def save_png(figure, path: Path, dpi: int = 100) -> Path:
    """Render a matplotlib Figure with Agg and write it as a palette PNG (about a third of the RGBA file's size)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    rgb.quantize(PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return Path(path)
