"""JSON result -> PNG of the image with boxes, "label score" captions and a disease header line.

For a quick look (browser, chat, ticket), not for reading: the header says NOT FOR DIAGNOSTIC USE.
The PNG has exactly the source image's size, so its pixels line up with the JSON boxes.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.viewer_outputs import DISCLAIMER, disease_text, finding_text

# Saturated colours that stay visible on grey; a label keeps its colour across images.
PALETTE = (
    (255, 64, 64),
    (64, 200, 255),
    (255, 200, 0),
    (80, 255, 120),
    (255, 96, 255),
    (255, 140, 0),
    (160, 120, 255),
    (0, 255, 220),
)
HEADER_DISEASES = 3  # the most probable diseases named in the header


def label_colour(label: str) -> tuple[int, int, int]:
    """A stable colour per label (hash of the text, not of Python's randomised hash())."""
    return PALETTE[int(hashlib.sha1(label.encode("utf-8")).hexdigest(), 16) % len(PALETTE)]


def render_png(display: np.ndarray, result: dict) -> bytes:
    """PNG bytes of `display` (float HxW in [0, 1], bright = dense) with `result` drawn on it."""
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
    header_bottom = 0
    for text in _wrap(draw, segments, font, columns):
        header_bottom = _caption(draw, text, (0, header_bottom), (255, 255, 255), font, image.size, above=False)[3] + 1

    # Captions last, so no box is drawn over one; they never hide under the header lines or
    # under each other (a caption that would overlap an earlier one moves below it).
    placed: list[tuple[int, int, int, int]] = []
    for finding in findings:
        x0, y0 = _clamp(finding["box"]["x_min"], columns), _clamp(finding["box"]["y_min"], rows)
        placed.append(
            _caption(
                draw,
                finding_text(finding),
                (x0, y0),
                label_colour(str(finding["label"])),
                font,
                image.size,
                floor=header_bottom,
                avoid=placed,
            )
        )

    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)  # speed over a few percent of size
    return out.getvalue()


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


def _caption(
    draw: ImageDraw.ImageDraw,
    text: str,
    at: tuple[int, int],
    colour: tuple[int, int, int],
    font,
    size: tuple[int, int],
    *,
    above: bool = True,
    floor: int = 0,
    avoid: list[tuple[int, int, int, int]] = (),
) -> tuple[int, int, int, int]:
    """Text on a dark backing, above the point when there is room, else below it, kept inside
    the image, below `floor` and clear of the `avoid` rectangles. Returns the backing rectangle."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height, pad = right - left + 4, bottom - top + 4, 2
    columns, rows = size
    x, y = at
    lifted = y - height - 1  # backing ends one row above the point: the box edge stays visible
    y = lifted if above and lifted >= floor else max(y, floor)
    x = max(0, min(x, columns - width - 1))
    for other in sorted(avoid, key=lambda r: r[1]):
        if x < other[2] and other[0] < x + width and y < other[3] and other[1] < y + height:
            y = other[3] + 1
    y = max(0, min(y, rows - height - 1))
    draw.rectangle((x, y, x + width, y + height), fill=(0, 0, 0))
    draw.text((x + pad - left, y + pad - top), text, fill=colour, font=font)
    return x, y, x + width, y + height
