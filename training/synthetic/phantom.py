"""One phantom: anatomy, planted findings, display and labels (`render_case`), before any DICOM encoding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.labels import SYNTHETIC_LOCAL
from training.synthetic.anatomy import Canvas, Geometry, render_anatomy, sample_geometry, step, tone
from training.synthetic.difficulty import Difficulty, resolve_difficulty
from training.synthetic.findings import (
    CARDIOMEGALY,
    HYPERINFLATION,
    PLANTERS,
    add_box,
    disease_labels,
    draw_findings,
)

_WORK_SIDE = 640  # longest side of the coarse grid the anatomy is rendered on


@dataclass(frozen=True)
class Finding:
    """One planted box, in original pixel space (x = column, y = row, max edges exclusive)."""

    label: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass
class PhantomCase:
    density: np.ndarray  # float32 (rows, cols) in [0, 1], bright = dense, as displayed
    findings: list[Finding]
    image_labels: dict[str, int]  # every VINDR_PCXR label name -> 0/1
    age_months: int = 24  # the phantom's age; anatomy proportions depend on it
    sex: str = "M"


def render_case(
    rng: np.random.Generator, rows: int, cols: int, difficulty: Difficulty, findings: Sequence[str] | None = None
) -> PhantomCase:
    """Render one phantom. `findings=None` draws them at random; a sequence plants exactly those.

    Every draw comes from `rng`, in the order of the steps below, so a seed gives the same phantom.
    """
    difficulty = resolve_difficulty(difficulty)
    wanted = _findings_to_plant(rng, findings)
    age = int(np.clip(round(rng.lognormal(math.log(20.0), 0.8)), 1, 119))
    sex = "M" if rng.random() < 0.58 else "F"

    h, w = _work_grid(rows, cols)
    g = sample_geometry(rng, h, w, rows / cols, difficulty.anatomy_variability, age)
    _reshape_anatomy(g, wanted, rng, difficulty)
    px, py = g.grid()
    cv = Canvas(
        g=g,
        rng=rng,
        difficulty=difficulty,
        px=px,
        py=py,
        att=np.zeros((h, w), np.float32),
        lung={},
        air={},
        heart=np.zeros(1),
    )
    render_anatomy(cv)
    _plant_findings(cv, wanted)

    density = _display(cv, rows, cols)
    boxes = _boxes_in_pixels(cv.boxes, rows / h, cols / w, rows, cols)
    labels = disease_labels(rng, {b.label for b in boxes}, difficulty)
    return PhantomCase(density=density, findings=boxes, image_labels=labels, age_months=age, sex=sex)


def _findings_to_plant(rng: np.random.Generator, findings: Sequence[str] | None) -> list[str]:
    if findings is None:
        return draw_findings(rng)
    unknown = [f for f in findings if f not in SYNTHETIC_LOCAL]
    if unknown:
        raise ValueError(f"cannot plant {unknown}; plantable: {list(SYNTHETIC_LOCAL)}")
    return list(dict.fromkeys(findings))


def _work_grid(rows: int, cols: int) -> tuple[int, int]:
    """(rows, columns) of the coarse grid the anatomy is rendered on: longest side _WORK_SIDE, never upscaled."""
    scale = max(rows, cols) / _WORK_SIDE
    if scale < 1.0:
        scale = 1.0
    return max(32, int(round(rows / scale))), max(32, int(round(cols / scale)))


def _strength(rng: np.random.Generator, difficulty: Difficulty) -> float:
    """A finding's strength multiplier, drawn from the difficulty's contrast range."""
    return float(rng.uniform(*difficulty.contrast))


def _size(rng: np.random.Generator, difficulty: Difficulty) -> float:
    """A finding's size multiplier, drawn from the difficulty's size range."""
    return float(rng.uniform(*difficulty.size))


def _reshape_anatomy(g: Geometry, wanted: list[str], rng: np.random.Generator, difficulty: Difficulty) -> None:
    """Cardiomegaly and lung hyperinflation are drawn as changed anatomy, before the anatomy is rendered."""
    if CARDIOMEGALY in wanted:
        g.ctr = float(np.clip(0.6 + 0.055 * _strength(rng, difficulty) + rng.uniform(0.0, 0.03), 0.61, 0.78))
    if HYPERINFLATION in wanted:
        s = _strength(rng, difficulty)
        for side in (-1, 1):
            g.base[side] += 0.07 + 0.06 * s
            g.dome[side] *= max(0.15, 0.55 - 0.2 * s)
        g.air *= 1.0 + 0.15 * s
        g.lw *= 1.02
        g.heart_top += 0.04 * s  # the heart hangs lower and looks narrow
        g.ctr *= 0.93


def _plant_findings(cv: Canvas, wanted: list[str]) -> None:
    """Add each finding's density and box; cardiomegaly and hyperinflation (already in the anatomy) only get boxes."""
    g, h, w = cv.g, cv.g.h, cv.g.w
    for label in wanted:
        if label in PLANTERS:
            PLANTERS[label](cv, _strength(cv.rng, cv.difficulty), _size(cv.rng, cv.difficulty))
        elif label == CARDIOMEGALY:
            dia = min(g.base[-1] - 0.5 * g.dome[-1], g.base[1] - 0.5 * g.dome[1]) + 0.02
            visible = cv.heart * step((dia - cv.py) * g.sy, 2 * g.edge)
            add_box(cv, CARDIOMEGALY, visible, (slice(0, h), slice(0, w)), frac=0.5)
        elif label == HYPERINFLATION:
            add_box(cv, HYPERINFLATION, np.maximum(cv.lung[-1], cv.lung[1]), (slice(0, h), slice(0, w)), frac=0.5)


def _display(cv: Canvas, rows: int, cols: int) -> np.ndarray:
    """Tone curve on the coarse grid, bicubic upsampling to full size, then signal-dependent quantum noise."""
    low = tone(cv.att, cv.g)
    density = np.array(Image.fromarray(low.astype(np.float32)).resize((cols, rows), Image.BICUBIC), dtype=np.float32)
    noise = cv.rng.standard_normal((rows, cols), dtype=np.float32)
    noise *= cv.difficulty.noise_sigma * (0.6 + 0.8 * np.clip(density, 0.0, 1.0))
    density += noise
    np.clip(density, 0.0, 1.0, out=density)
    return density


def _boxes_in_pixels(boxes: list[tuple], fy: float, fx: float, rows: int, cols: int) -> list[Finding]:
    """Coarse-grid boxes (label, row0, row1, col0, col1) in full-resolution pixels, clipped; empty ones dropped."""
    found: list[Finding] = []
    for label, r0, r1, c0, c1 in boxes:
        x0, x1 = max(0.0, c0 * fx), min(float(cols), c1 * fx)
        y0, y1 = max(0.0, r0 * fy), min(float(rows), r1 * fy)
        if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
            found.append(Finding(label, round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)))
    return found
