"""JSON result -> PNG of the image with boxes, "label score" captions and a disease header line.

For a quick look (browser, chat, ticket), not for reading: the header says NOT FOR DIAGNOSTIC USE.
The PNG has exactly the source image's size, so its pixels line up with the JSON boxes.

With the heatmaps (`overlay=heatmaps`, a result with each disease's `heatmap`) it is a mosaic instead: that
annotated image first, then one panel per disease, most probable first, with its map in colour over the image
(colour: where the evidence is, relative to the image; opacity: the disease's probability over its threshold, so
positive diseases are drawn in full and unlikely ones faintly) and a colour scale; panels are reduced to at most
`PANEL_SIDE` pixels on their long side.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.viewer_outputs import DISCLAIMER, disease_text, finding_text
from service.viewer_outputs.heatmaps import colour, on_image, overlay, strength
from service.viewer_outputs.layout import Rect, label_colour, place_caption

HEADER_DISEASES = 3  # the most probable diseases named in the header
PANEL_SIDE = 768  # long side of a mosaic panel at most (a 3000 px radiograph would make a 12000 px mosaic)
MOSAIC_COLUMNS = 4
MOSAIC_GAP = 4


def render_png(display: np.ndarray, result: dict) -> bytes:
    """PNG bytes of `display` (float HxW in [0, 1], bright = dense) with `result` drawn on it."""
    return _encode(annotated_image(display, result))


def _encode(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)  # speed over a few % of size
    return out.getvalue()


def _grey(display: np.ndarray) -> np.ndarray:
    if display.ndim != 2:
        raise ValueError(f"display must be a 2-D greyscale image, not shape {display.shape}")
    return np.rint(np.clip(np.nan_to_num(display, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def annotated_image(display: np.ndarray, result: dict) -> Image.Image:
    """`display` as an RGB image of the same size with the boxes, captions and the header drawn on it
    (the pixels of the PNG and of the burned-in DICOM image)."""
    grey = _grey(display)
    rows, columns = grey.shape
    image = Image.fromarray(grey).convert("RGB")
    draw = ImageDraw.Draw(image)
    # Scale strokes and text with the image, so a 500 px and a 3000 px radiograph look alike.
    short_side = min(rows, columns)
    font = _font(max(10, round(short_side / 45)))
    line = max(1, round(short_side / 400))

    findings = result.get("findings") or []
    for finding in findings:
        box = finding["box"]
        # Box edges are pixel boundaries; PIL's rectangle includes both end pixels.
        x0, y0 = _clamp(box["x_min"], columns), _clamp(box["y_min"], rows)
        x1, y1 = _clamp(float(box["x_max"]) - 1, columns), _clamp(float(box["y_max"]) - 1, rows)
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=label_colour(str(finding["label"])), width=line)

    diseases = sorted(result.get("diseases") or [], key=lambda d: -float(d["probability"]))
    segments = [DISCLAIMER] + [disease_text(d) for d in diseases[:HEADER_DISEASES]]
    header_bottom = 0.0
    for text in _wrap(draw, segments, font, columns):
        width, height = _backed_size(draw, text, font)
        header_bottom = (
            _draw_backed(draw, text, (0, header_bottom, width, header_bottom + height), (255, 255, 255), font)[3] + 1
        )

    # Captions last, so no box is drawn over one; they never hide under the header lines or
    # under each other (layout.place_caption stacks captions of coinciding boxes).
    placed: list[Rect] = []
    for finding in findings:
        text = finding_text(finding)
        anchor = (_clamp(finding["box"]["x_min"], columns), _clamp(finding["box"]["y_min"], rows))
        rect = place_caption(anchor, _backed_size(draw, text, font), image.size, taken=placed, floor=header_bottom)
        placed.append(_draw_backed(draw, text, rect, label_colour(str(finding["label"])), font))

    return image


def render_heatmap_png(display: np.ndarray, result: dict) -> bytes:
    """PNG bytes of the heatmap mosaic (module docstring) of a result whose diseases carry a `heatmap`."""
    diseases = sorted(
        (d for d in result.get("diseases") or [] if d.get("heatmap")), key=lambda d: -float(d["probability"])
    )
    if not diseases:
        raise ValueError("the result has no disease heatmaps to draw")
    grey = _grey(display)
    scale = min(1.0, PANEL_SIDE / max(grey.shape))
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    panels = [annotated_image(display, result).resize(size, Image.Resampling.BILINEAR)]
    small = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))
    font = _font(max(10, round(min(size) / 30)))
    for disease in diseases:
        heat = on_image(disease["heatmap"], size[1], size[0], scale)
        panel = Image.fromarray(overlay(small, heat, strength(disease)))
        draw = ImageDraw.Draw(panel)
        text = disease_text(disease)
        width, height = _backed_size(draw, text, font)
        _draw_backed(draw, text, (0, 0, width, height), (255, 255, 255), font)
        _colour_scale(draw, font, panel.size)
        panels.append(panel)
    return _encode(_mosaic(panels))


def _colour_scale(draw: ImageDraw.ImageDraw, font, size: tuple[int, int]) -> None:
    """A horizontal colour bar along the panel's bottom edge, with what its ends mean above it."""
    columns, rows = size
    height = max(6, rows // 60)
    left, right = columns // 20, columns - columns // 20
    bar = colour(np.linspace(0.0, 1.0, max(1, right - left)))
    top = rows - height - 2
    for offset, rgb in enumerate(bar):
        draw.line((left + offset, top, left + offset, top + height), fill=tuple(int(c) for c in rgb))
    text = "weaker   evidence in this image   stronger"
    width, text_height = _backed_size(draw, text, font)
    _draw_backed(draw, text, (left, top - text_height - 1, left + width, top - 1), (255, 255, 255), font)


def _mosaic(panels: list[Image.Image]) -> Image.Image:
    columns = min(MOSAIC_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    width, height = panels[0].size
    sheet = Image.new("RGB", (columns * width + (columns - 1) * MOSAIC_GAP, rows * height + (rows - 1) * MOSAIC_GAP))
    for index, panel in enumerate(panels):
        sheet.paste(panel, ((index % columns) * (width + MOSAIC_GAP), (index // columns) * (height + MOSAIC_GAP)))
    return sheet


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 scales its bundled font when FreeType is available (a bitmap font otherwise).
    return ImageFont.load_default(size=size)


def _clamp(value: float, limit: int) -> int:
    return int(min(max(round(float(value)), 0), limit - 1))


def _wrap(draw: ImageDraw.ImageDraw, segments: list[str], font, width: int) -> list[str]:
    """Join segments with separators into as few lines as fit the image width."""
    lines: list[str] = []
    for segment in segments:
        joined = f"{lines[-1]}  |  {segment}" if lines else segment
        if lines and draw.textlength(joined, font=font) <= width - 4:
            lines[-1] = joined
        else:
            lines.append(segment)
    return lines


_PAD = 2  # text inset in its dark backing


def _backed_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    """(width, height) of a caption's dark backing: the text's extent plus the inset on both sides."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left + 2 * _PAD, bottom - top + 2 * _PAD


def _draw_backed(draw: ImageDraw.ImageDraw, text: str, rect: Rect, colour: tuple[int, int, int], font) -> Rect:
    """Text on a dark backing filling `rect`; returns `rect`."""
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.rectangle(rect, fill=(0, 0, 0))
    draw.text((rect[0] + _PAD - left, rect[1] + _PAD - top), text, fill=colour, font=font)
    return rect
