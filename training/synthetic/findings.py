"""Planted findings, the mix of findings per image, and the finding -> disease label rules (README.md, steps 2, 4, 5).

Each planter adds one finding's density to the attenuation image and records its box as the extent of its
own contribution, so boxes are exact. Cardiomegaly and lung hyperinflation change the anatomy instead
(`training.synthetic.phantom`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.labels import SYNTHETIC_GLOBAL, SYNTHETIC_LOCAL, VINDR_PCXR
from training.synthetic.anatomy import Canvas, Geometry, draw_tree, smooth_noise, step
from training.synthetic.difficulty import Difficulty

PIO = "Peribronchovascular interstitial opacity or PIO"
RETICULONODULAR = "Reticulonodular opacity"
BRONCHIAL_THICKENING = "Bronchial thickening"
CARDIOMEGALY = "Cardiomegaly"
OTHER_OPACITY = "Other opacity"
CONSOLIDATION = "Consolidation"
HYPERINFLATION = "Lung hyperinflation"
EFFUSION = "Pleural effusion"
NO_FINDING = "No finding"
assert set(SYNTHETIC_LOCAL) == {
    PIO,
    RETICULONODULAR,
    BRONCHIAL_THICKENING,
    CARDIOMEGALY,
    OTHER_OPACITY,
    CONSOLIDATION,
    HYPERINFLATION,
    EFFUSION,
}


def _window(g: Geometry, row: float, col: float, radius: float):
    r0, r1 = max(0, int(row - radius)), min(g.h, int(row + radius) + 2)
    c0, c1 = max(0, int(col - radius)), min(g.w, int(col + radius) + 2)
    rows = np.arange(r0, r1, dtype=np.float32)[:, None]
    cols = np.arange(c0, c1, dtype=np.float32)[None, :]
    return (slice(r0, r1), slice(c0, c1)), rows, cols


def add_box(cv: Canvas, label: str, mask: np.ndarray, sl, frac: float = 0.25) -> None:
    peak = float(mask.max()) if mask.size else 0.0
    if peak <= 1e-6:
        return
    keep = mask > frac * peak
    rr = np.flatnonzero(keep.any(axis=1))
    cc = np.flatnonzero(keep.any(axis=0))
    r0 = (sl[0].start or 0) + int(rr[0])
    c0 = (sl[1].start or 0) + int(cc[0])
    cv.boxes.append((label, r0, r0 + int(rr[-1] - rr[0]) + 1, c0, c0 + int(cc[-1] - cc[0]) + 1))


def _lung_point(cv: Canvas, side: int, q_range, u_range) -> tuple[float, float]:
    """A (row, col) coarse-pixel point well inside one lung and not behind the heart."""
    g = cv.g
    for _ in range(100):
        u = cv.rng.uniform(*u_range)
        q = cv.rng.uniform(*q_range)
        col, row = g.to_pix(side * (g.lc + u * g.lw), q)
        i, j = int(row), int(col)
        if 0 <= i < g.h and 0 <= j < g.w and cv.lung[side][i, j] * (1 - cv.heart[i, j]) > 0.9:
            return row, col
    weight = cv.lung[side] * (1 - cv.heart)
    i, j = np.unravel_index(int(np.argmax(weight)), weight.shape)
    return float(i), float(j)


def _sides(rng, p_both: float) -> tuple[int, ...]:
    if rng.random() < p_both:
        return (-1, 1)
    return (int(rng.choice((-1, 1))),)


def _plant_consolidation(cv: Canvas, strength: float, size: float) -> None:
    """Dense patchy airspace opacity with a fuzzy border, optional air bronchograms."""
    rng, g = cv.rng, cv.g
    side = int(rng.choice((-1, 1)))
    row, col = _lung_point(cv, side, (0.35, 0.85), (-0.4, 0.5))
    radius = 0.5 * rng.uniform(0.2, 0.45) * size * g.lung_width_px()
    sl, rows, cols = _window(g, row, col, 3.2 * radius)
    patch = np.zeros((rows.shape[0], cols.shape[1]), np.float32)
    for _ in range(int(rng.integers(3, 7))):
        oy, ox = rng.normal(0, 0.45 * radius, 2)
        rb = radius * rng.uniform(0.45, 0.8)
        ry = rb * rng.uniform(0.75, 1.3)
        patch += np.exp(-(((rows - row - oy) / ry) ** 2) - ((cols - col - ox) / rb) ** 2)
    texture = smooth_noise(rng, *patch.shape, max(2.0, radius / 4))
    patch *= 1.0 + 0.35 * texture
    patch *= np.exp(-((((rows - row) ** 2 + (cols - col) ** 2) / (2.2 * radius) ** 2) ** 2))
    dens = step(patch - 0.6, 1.1) * cv.lung[side][sl]
    if rng.random() < 0.5:  # air bronchograms
        img = Image.new("L", (patch.shape[1], patch.shape[0]), 0)
        draw = ImageDraw.Draw(img)
        hx, hy = g.hilum[side]
        hc, hr = g.to_pix(hx, hy)
        base_angle = math.atan2(row - hr, col - hc)
        for _ in range(int(rng.integers(1, 3))):
            draw_tree(
                draw,
                rng,
                col - sl[1].start - math.cos(base_angle) * radius,
                row - sl[0].start - math.sin(base_angle) * radius,
                base_angle + rng.normal(0, 0.3),
                1.5 * radius,
                max(1.0, radius / 14),
                2,
                255,
            )
        bronch = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), np.float32) * (1 / 255.0)
        dens = dens * (1.0 - 0.4 * bronch)
    cv.att[sl] += 0.2 * strength * dens
    add_box(cv, CONSOLIDATION, dens, sl)


def _plant_other_opacity(cv: Canvas, strength: float, size: float) -> None:
    """Roundish / irregular nodule-like opacity, 3-8% of the image width."""
    rng, g = cv.rng, cv.g
    side = int(rng.choice((-1, 1)))
    row, col = _lung_point(cv, side, (0.2, 0.85), (-0.6, 0.7))
    radius = 0.5 * rng.uniform(0.03, 0.08) * size * g.w
    sl, rows, cols = _window(g, row, col, 1.6 * radius + 2)
    dy, dx = rows - row, cols - col
    ang = np.arctan2(dy, dx)
    rr = radius * (
        1.0
        + rng.uniform(0.03, 0.15) * np.cos(2 * ang + rng.uniform(0, 6.3))
        + rng.uniform(0.0, 0.12) * np.cos(3 * ang + rng.uniform(0, 6.3))
    )
    rho = np.sqrt(dx * dx + dy * dy) / rr
    dens = np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0)) * 0.7 + 0.3 * step(1.0 - rho, 0.3)
    dens = dens * np.clip(cv.lung[side][sl] * 1.5, 0.0, 1.0)
    cv.att[sl] += 0.2 * strength * dens
    add_box(cv, OTHER_OPACITY, dens, sl, frac=0.2)


def _plant_pio(cv: Canvas, strength: float, size: float) -> None:
    """Streaky peribronchovascular densities radiating from a hilum; one box per side."""
    rng, g = cv.rng, cv.g
    lwp = g.lung_width_px()
    for side in _sides(rng, 0.6):
        img = Image.new("L", (g.w, g.h), 0)
        draw = ImageDraw.Draw(img)
        hx, hy = g.hilum[side]
        col, row = g.to_pix(hx, hy)
        for _ in range(int(rng.integers(9, 16))):
            a = rng.uniform(-0.9, 1.1)
            ang = (a if side > 0 else math.pi - a) + g.theta
            length = lwp * rng.uniform(0.3, 0.55) * size
            x, y = col + math.cos(ang) * lwp * 0.05, row + math.sin(ang) * lwp * 0.05
            pts = [(x, y)]
            for _ in range(4):
                ang += rng.normal(0, 0.1)
                x += math.cos(ang) * length / 4
                y += math.sin(ang) * length / 4
                pts.append((x, y))
            width = max(1, int(round(lwp * rng.uniform(0.012, 0.028))))
            draw.line(pts, fill=int(rng.uniform(150, 255)), width=width)
        streaks = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), np.float32) * (1 / 255.0)
        # peribronchial haze around the hilum, fading outwards
        cols_ = np.arange(g.w, dtype=np.float32)[None, :]
        rows_ = np.arange(g.h, dtype=np.float32)[:, None]
        d2 = ((cols_ - col) ** 2 + (rows_ - row) ** 2) / (0.35 * lwp * size) ** 2
        haze = np.exp(-d2)
        dens = (streaks * (0.55 + 0.45 * haze) + 0.25 * haze) * cv.lung[side]
        cv.att += 0.075 * strength * dens
        add_box(cv, PIO, dens, (slice(0, g.h), slice(0, g.w)), frac=0.2)


def _plant_reticulonodular(cv: Canvas, strength: float, size: float) -> None:
    """Fine net + dot texture over a mid/lower lung zone; one box per textured area."""
    rng, g = cv.rng, cv.g
    lwp = g.lung_width_px()
    for side in _sides(rng, 0.4):
        row, col = _lung_point(cv, side, (0.5, 0.8), (-0.2, 0.5))
        rx = 0.5 * rng.uniform(0.35, 0.6) * size * lwp
        ry = rx * rng.uniform(0.8, 1.3)
        sl, rows, cols = _window(g, row, col, 1.3 * max(rx, ry))
        region = step(1.0 - np.sqrt(((rows - row) / ry) ** 2 + ((cols - col) / rx) ** 2), 0.35)
        shape = region.shape
        cell = max(2.5, lwp * 0.045)
        n1 = smooth_noise(rng, *shape, cell)
        net = np.exp(-((n1 * (1 / 0.3)) ** 2))
        n2 = smooth_noise(rng, *shape, cell * 0.8)
        dots = np.clip((n2 - 1.5) * 1.5, 0.0, 1.0)
        dens = (0.7 * net + 0.8 * dots + 0.15) * region * cv.lung[side][sl]
        cv.att[sl] += 0.09 * strength * dens
        add_box(cv, RETICULONODULAR, region * cv.lung[side][sl], sl, frac=0.3)


def _plant_bronchial_thickening(cv: Canvas, strength: float, size: float) -> None:
    """Ring shadows and tram-track lines near a hilum; one box per side."""
    rng, g = cv.rng, cv.g
    lwp = g.lung_width_px()
    for side in _sides(rng, 0.3):
        img = Image.new("L", (g.w, g.h), 0)
        draw = ImageDraw.Draw(img)
        hx, hy = g.hilum[side]
        hc, hr = g.to_pix(hx, hy)
        for _ in range(int(rng.integers(3, 7))):  # end-on bronchi
            a = rng.uniform(-1.0, 1.2)
            ang = (a if side > 0 else math.pi - a) + g.theta
            dist = lwp * rng.uniform(0.1, 0.35) * size
            x, y = hc + math.cos(ang) * dist, hr + math.sin(ang) * dist
            rad = max(2.0, g.w * rng.uniform(0.006, 0.011) * size)
            wall = max(1, int(round(rad * rng.uniform(0.35, 0.5))))
            draw.ellipse((x - rad, y - rad, x + rad, y + rad), outline=255, width=wall)
        for _ in range(int(rng.integers(1, 4))):  # tram tracks: parallel walls of a bronchus
            a = rng.uniform(-0.6, 1.0)
            ang = (a if side > 0 else math.pi - a) + g.theta
            start = lwp * rng.uniform(0.08, 0.2)
            length = lwp * rng.uniform(0.15, 0.3) * size
            sep = max(2.0, g.w * 0.006 * size)
            nx, ny = -math.sin(ang), math.cos(ang)
            for k in (-1, 1):
                x0 = hc + math.cos(ang) * start + k * nx * sep
                y0 = hr + math.sin(ang) * start + k * ny * sep
                draw.line(
                    [(x0, y0), (x0 + math.cos(ang) * length, y0 + math.sin(ang) * length)],
                    fill=220,
                    width=max(1, int(round(sep * 0.5))),
                )
        dens = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)), np.float32) * (1 / 255.0)
        dens *= np.clip(cv.lung[side] * 1.3, 0.0, 1.0)
        cv.att += 0.13 * strength * dens
        add_box(cv, BRONCHIAL_THICKENING, dens, (slice(0, g.h), slice(0, g.w)), frac=0.2)


def _plant_effusion(cv: Canvas, strength: float, size: float) -> None:
    """Homogeneous fluid density at one lung base with a meniscus (higher laterally)."""
    rng, g = cv.rng, cv.g
    side = int(rng.choice((-1, 1)))
    u = (cv.px * side - g.lc) * (1.0 / g.lw)
    level = g.base[side] - rng.uniform(0.1, 0.28) * size
    meniscus = level + 0.14 * np.clip((1.0 - u) * 0.5, 0.0, 1.5) ** 1.5
    # fluid thins towards the meniscus, so the density fades upwards over a few pixels
    fluid = step((cv.py - meniscus) * g.sy - 3 * g.edge, 7 * g.edge) * cv.lung[side]
    gradient = 0.75 + 0.25 * np.clip((cv.py - meniscus) * 6.0, 0.0, 1.0)
    fill = min(0.9, 0.45 + 0.3 * strength)
    cv.att += fill * cv.air[side] * fluid * gradient
    add_box(cv, EFFUSION, fluid, (slice(0, g.h), slice(0, g.w)), frac=0.3)


PLANTERS = {
    CONSOLIDATION: _plant_consolidation,
    OTHER_OPACITY: _plant_other_opacity,
    PIO: _plant_pio,
    RETICULONODULAR: _plant_reticulonodular,
    BRONCHIAL_THICKENING: _plant_bronchial_thickening,
    EFFUSION: _plant_effusion,
}


def _finding_weights() -> np.ndarray:
    counts = np.array([VINDR_PCXR.by_name(n).train_count for n in SYNTHETIC_LOCAL], float)
    w = 0.06 + 0.8 * counts / counts.sum()
    w[SYNTHETIC_LOCAL.index(EFFUSION)] += 0.03  # 14 cases in the paper; keep it learnable
    return w / w.sum()


def draw_findings(rng: np.random.Generator) -> list[str]:
    if rng.random() < 0.45:
        return []
    k = int(rng.choice((1, 2, 3), p=(0.55, 0.3, 0.15)))
    idx = rng.choice(len(SYNTHETIC_LOCAL), size=k, replace=False, p=_finding_weights())
    chosen = [SYNTHETIC_LOCAL[i] for i in sorted(idx)]
    if HYPERINFLATION in chosen and PIO not in chosen and rng.random() < 0.4:
        chosen.insert(0, PIO)  # bronchiolitis: hyperinflation with peribronchial opacities
    return chosen


# The findings each disease rule below reads: where a disease's evidence lies on a phantom (the heatmap
# evaluation looks for a disease's heatmap peak inside these findings' boxes).
DISEASE_FINDINGS: dict[str, tuple[str, ...]] = {
    "Pneumonia": (CONSOLIDATION,),
    "Brocho-pneumonia": (RETICULONODULAR, PIO, OTHER_OPACITY),
    "Bronchitis": (BRONCHIAL_THICKENING, PIO),
    "Bronchiolitis": (HYPERINFLATION,),
    "Other diseases": (CARDIOMEGALY, EFFUSION),
}


def disease_labels(rng: np.random.Generator, local: set[str], d: Difficulty) -> dict[str, int]:
    causes = {
        "Pneumonia": CONSOLIDATION in local,
        "Brocho-pneumonia": RETICULONODULAR in local or (PIO in local and OTHER_OPACITY in local),
        "Bronchitis": (BRONCHIAL_THICKENING in local or (PIO in local and CONSOLIDATION not in local)),
        "Bronchiolitis": HYPERINFLATION in local,
        "Other diseases": CARDIOMEGALY in local or EFFUSION in local,
    }
    labels = {label.name: 0 for label in VINDR_PCXR.labels}
    for name in SYNTHETIC_GLOBAL:
        if name == NO_FINDING:
            continue
        draw = rng.random()  # always one draw per label, so the stream does not depend on causes
        labels[name] = int(draw < (1.0 - d.label_noise if causes[name] else d.spurious_rate))
    for name in local:
        labels[name] = 1
    labels[NO_FINDING] = int(not local and not any(labels[n] for n in SYNTHETIC_GLOBAL))
    return labels
