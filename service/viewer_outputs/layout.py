"""Where captions go and what colour a label gets: one rule for every output that draws boxes.

The PNG, the burned-in DICOM image and the GSPS all place a "label score" caption per box with
`place_caption` and colour a label with `label_colour`, so the three look alike and the tests of
one placement rule cover all of them.

Coordinates are image pixels, x = column and y = row, rectangles (x0, y0, x1, y1) inclusive-exclusive
like the boxes themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

Rect = tuple[float, float, float, float]

# Saturated colours that stay visible on grey; a label keeps its colour across images and outputs.
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


def label_colour(label: str) -> tuple[int, int, int]:
    """A stable colour per label (hash of the text, not of Python's randomised hash())."""
    return PALETTE[int(hashlib.sha1(label.encode("utf-8")).hexdigest(), 16) % len(PALETTE)]


def overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_caption(
    anchor: tuple[float, float],
    size: tuple[float, float],
    image_size: tuple[float, float],
    *,
    taken: Sequence[Rect] = (),
    floor: float = 0.0,
    gap: float = 1.0,
) -> Rect:
    """The rectangle of a caption of `size` (width, height) for a box whose top left corner is `anchor`.

    Just above the corner when there is room below `floor` (so the box's top edge stays visible),
    otherwise just inside the box; kept inside the image (columns, rows); moved down past every
    rectangle in `taken` it would overlap, so captions of coinciding boxes stack instead of
    overprinting each other.
    """
    width, height = size
    columns, rows = image_size
    x, y = anchor
    above = y - height - gap
    y = above if above >= floor else max(y, floor)
    x = max(0.0, min(x, columns - width - gap))
    for other in sorted(taken, key=lambda rect: rect[1]):
        if overlaps((x, y, x + width, y + height), other):
            y = other[3] + gap
    y = max(0.0, min(y, rows - height - gap))
    return (x, y, x + width, y + height)
