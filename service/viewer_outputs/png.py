"""JSON result -> PNG of the image with boxes, "label score" captions and a disease header line.

For a quick look (browser, chat, ticket), not for reading: the header says NOT FOR DIAGNOSTIC USE.
The PNG has exactly the source image's size, so its pixels line up with the JSON boxes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.viewer_outputs import DISCLAIMER, disease_text, finding_text
from service.viewer_outputs.layout import Rect, label_colour, place_caption

HEADER_DISEASES = 3  # the most probable diseases named in the header


def render_png(display: np.ndarray, result: dict) -> bytes:
    """PNG bytes of `display` (float HxW in [0, 1], bright = dense) with `result` drawn on it."""
    out = io.BytesIO()
    annotated_image(display, result).save(out, format="PNG", compress_level=3)  # speed over a few % of size
    return out.getvalue()


def annotated_image(display: np.ndarray, result: dict) -> Image.Image:
    """`display` as an RGB image of the same size with the boxes, captions and the header drawn on it
    (the pixels of the PNG and of the burned-in DICOM image)."""
    if display.ndim != 2:
        raise ValueError(f"display must be a 2-D greyscale image, not shape {display.shape}")
    rows, columns = display.shape
    grey = np.rint(np.clip(np.nan_to_num(display, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
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
