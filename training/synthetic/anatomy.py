"""Normal anatomy of a phantom, rendered on a coarse grid in "attenuation" units (README.md, step 1).

A patient frame (`px` across the thorax, -1..1 between the lateral lung margins, image left = patient right
as in a PA view; `py` down, 0 at the lung apices and 1 at the costophrenic angles) is placed in the image
with random size, position and in-plane rotation (`Geometry`); the anatomy is a sum of analytic soft-edged
shapes evaluated on that grid (`render_anatomy`), and `tone` turns attenuation into displayed density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.synthetic.difficulty import Difficulty


def step(d: np.ndarray, width: float) -> np.ndarray:
    """Smooth 0->1 step of `width` centred on d = 0 (d > 0 is inside)."""
    t = np.clip(d * (1.0 / width) + 0.5, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class Geometry:
    """Patient-frame parameters and the patient <-> coarse-grid transform."""

    h: int
    w: int
    aspect: float  # rows / cols; image y runs 0..aspect in width units
    cx: float  # image x (width units) of the midline
    cyc: float  # image y of the lung mid-height (py = 0.5)
    sx: float  # width units per px unit
    sy: float  # width units per py unit
    theta: float
    lc: float = 0.52  # lung centre |px|
    lw: float = 0.44  # lung half-width (px units)
    qa: float = 0.36  # height of the apical cap (py units)
    base: dict = field(default_factory=dict)  # side -> py of the costophrenic angle
    dome: dict = field(default_factory=dict)  # side -> dome height (py units)
    thymus: float = 0.1
    air: float = 0.55
    ctr: float = 0.5
    heart_hx: float = 0.0  # px of the junction of the two heart borders
    heart_top: float = 0.47  # py of the top of the cardiac silhouette
    hilum: dict = field(default_factory=dict)  # side -> (px, py)
    arms_up: bool = False
    rib_y0: float = -0.12
    rib_d: float = 0.075
    rib_e: float = 0.0035
    rib_a: float = 0.1
    rib_b: float = 0.24
    rib_w: float = 0.42
    tone_mid: float = 0.66  # attenuation shown as mid-grey
    tone_slope: float = 4.5  # steepness of the film-like tone curve
    tone_floor: float = 0.03  # display value of the darkest air

    @property
    def ux(self) -> float:
        return 1.0 / self.w

    @property
    def uy(self) -> float:
        return self.aspect / self.h

    @property
    def edge(self) -> float:  # soft-edge width in width units (~1.3 coarse pixels)
        return 1.3 / self.w

    def to_image(self, px, py):
        dx = np.asarray(px) * self.sx
        dy = (np.asarray(py) - 0.5) * self.sy
        c, s = math.cos(self.theta), math.sin(self.theta)
        return self.cx + dx * c - dy * s, self.cyc + dx * s + dy * c

    def to_pix(self, px, py):
        """Patient frame -> coarse-grid (col, row) pixel coordinates."""
        x, y = self.to_image(px, py)
        return x / self.ux - 0.5, y / self.uy - 0.5

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        xs = ((np.arange(self.w, dtype=np.float32) + 0.5) * self.ux - self.cx)[None, :]
        ys = ((np.arange(self.h, dtype=np.float32) + 0.5) * self.uy - self.cyc)[:, None]
        c, s = math.cos(self.theta), math.sin(self.theta)
        px = (xs * c + ys * s) * (1.0 / self.sx)
        py = (-xs * s + ys * c) * (1.0 / self.sy) + 0.5
        return px.astype(np.float32), py.astype(np.float32)

    def lung_width_px(self) -> float:
        return 2 * self.lw * self.sx / self.ux


def sample_geometry(rng: np.random.Generator, h: int, w: int, aspect: float, var: float, age_months: int) -> Geometry:
    def jit(sd: float) -> float:
        return float(rng.normal(0.0, sd * var))

    young = float(np.clip(1.0 - age_months / 60.0, 0.0, 1.0))  # 1 = newborn, 0 = >= 5 years
    ratio = 1.62 - 0.12 * young + jit(0.07)  # lung height / half thorax width: younger is rounder
    sy = aspect * (0.43 + jit(0.035))  # lungs span ~43% of the image height
    sx = sy / ratio
    # keep shoulders and the (possibly hyperinflated) lung bases inside the image
    sx = min(sx, 0.46 / 1.35)
    sy = min(sx * ratio, aspect * 0.7 / 1.3)
    y_apex = aspect * (0.13 + jit(0.025)) + 0.1 * sy
    y_apex = float(np.clip(y_apex, 0.45 * sy, aspect - 1.3 * sy))
    g = Geometry(h=h, w=w, aspect=aspect, cx=0.5 + jit(0.025), cyc=y_apex + 0.5 * sy, sx=sx, sy=sy, theta=jit(0.035))
    g.cx = float(np.clip(g.cx, 1.1 * sx, 1.0 - 1.1 * sx))
    g.lc = 0.52 + jit(0.015)
    g.lw = 0.44 + jit(0.015)
    g.qa = 0.36 + jit(0.03)
    base = 1.0 + jit(0.02)
    g.base = {-1: base - 0.035 + jit(0.01), 1: base}
    dome = 0.13 + jit(0.02)
    g.dome = {-1: dome + jit(0.01), 1: dome + jit(0.01)}
    g.thymus = float(np.clip(0.06 + 0.14 * young + jit(0.04), 0.0, 0.3))
    g.air = 0.55 * (1.0 + jit(0.06))
    g.ctr = float(rng.uniform(0.45, 0.52) + 0.05 * young)
    g.heart_top = 0.47 + jit(0.03)
    g.heart_hx = 0.0 + jit(0.03)
    g.hilum = {-1: (-0.24 + jit(0.02), 0.5 + jit(0.02)), 1: (0.24 + jit(0.02), 0.47 + jit(0.02))}
    g.arms_up = bool(rng.random() < 0.5)
    g.rib_y0 = -0.13 + jit(0.02)
    g.rib_d = 0.073 * (1.0 + jit(0.04))
    g.rib_e = 0.0035 * (1.0 + jit(0.1))
    g.rib_a = 0.1 + jit(0.02)
    g.rib_b = 0.33 + jit(0.03)
    g.rib_w = 0.36 + jit(0.03)
    g.tone_mid = 0.66 + jit(0.04)
    g.tone_slope = 4.5 * (1.0 + jit(0.08))
    g.tone_floor = float(np.clip(0.03 + jit(0.02), 0.0, 0.1))
    return g


@dataclass
class Canvas:
    g: Geometry
    rng: np.random.Generator
    difficulty: Difficulty
    px: np.ndarray
    py: np.ndarray
    att: np.ndarray  # attenuation image being built
    lung: dict  # side -> soft mask
    air: dict  # side -> air attenuation subtracted for that lung (already includes profile)
    heart: np.ndarray
    boxes: list = field(default_factory=list)  # (label, row0, row1, col0, col1) coarse pixels


def _lung(g: Geometry, px: np.ndarray, py: np.ndarray, side: int):
    """Soft lung-field mask for one side (-1 image left / patient right, +1 image right)."""
    u = (px * side - g.lc) * (1.0 / g.lw)  # +1 lateral margin, -1 medial margin
    q = py
    e = g.edge
    lat = 1.0 - 0.07 * ((q - 0.75) * 2.5) ** 2
    med = -1.0 + g.thymus * np.exp(-(((q - 0.3) * (1 / 0.14)) ** 2))
    mid = 0.5 * (lat + med)
    half = 0.5 * (lat - med)
    z = (u - mid) / half
    # Walls and apex as one implicit function: straight walls below qc, an elliptical cap above.
    qc = g.qa - 0.02
    rho = np.sqrt(z * z + (np.minimum(q - qc, 0.0) * (1.0 / g.qa)) ** 2)
    wx = half * (g.lw * g.sx)
    scale = np.where(q < qc, np.minimum(wx, g.qa * g.sy), wx)
    up = -0.15
    q_dia = g.base[side] + 0.02 - g.dome[side] * (1.0 - ((u - up) * (1 / 1.2)) ** 2)
    mask = step((1.0 - rho) * scale, 2.0 * e) * step((q_dia - q) * g.sy, e)
    profile = 0.4 + 0.6 * np.sqrt(np.clip(1.0 - z * z, 0.0, 1.0))
    profile *= 0.72 + 0.28 * np.clip((q_dia - q) * (1 / 0.22), 0.0, 1.0)
    profile *= 0.78 + 0.22 * np.clip(q * (1 / 0.3), 0.0, 1.0)
    return mask, profile, q_dia


def _heart_base(g: Geometry) -> float:
    """py where the heart borders meet the diaphragm (just above the medial dome level)."""
    return min(g.base[s] + 0.02 - 0.5 * g.dome[s] for s in (-1, 1)) - 0.02


def _heart(g: Geometry, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Cardiac silhouette: two quarter-ellipse shoulders (right atrium on the image left, the
    larger left ventricle on the image right) over vertical sides that run into the diaphragm,
    where the heart merges with the equally dense liver. Width = ctr * thoracic width."""
    width = g.ctr * 2.0 * (g.lc + g.lw) * g.sx  # width units
    hy = _heart_base(g)
    hb = hy - g.heart_top
    dx = (px - g.heart_hx) * g.sx
    left = dx < 0  # image left = patient's right heart border
    a = np.where(left, 0.38 * width, 0.62 * width).astype(np.float32)
    b = np.where(left, 0.75 * hb * g.sy, hb * g.sy).astype(np.float32)
    yc = np.where(left, hy + 0.02, hy - 0.03).astype(np.float32)
    dy = np.minimum((py - yc) * g.sy, 0.0)
    rho = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    return step((1.0 - rho) * a, 3.0 * g.edge)


def _line_band(px, py, g, p0, p1, half_width):
    """Soft band around the segment p0-p1 (patient frame), widths in width units."""
    x0, y0 = p0[0] * g.sx, p0[1] * g.sy
    x1, y1 = p1[0] * g.sx, p1[1] * g.sy
    X, Y = px * g.sx, py * g.sy
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * vx + (Y - y0) * vy) * (1.0 / (vx * vx + vy * vy)), 0.0, 1.0)
    d = np.sqrt((X - x0 - t * vx) ** 2 + (Y - y0 - t * vy) ** 2)
    return step(half_width - d, 2 * g.edge)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Band-limited noise (~unit std, feature size ~`cell` px) by bicubic upsampling."""
    gh, gw = max(2, int(round(h / cell)) + 2), max(2, int(round(w / cell)) + 2)
    coarse = rng.standard_normal((gh, gw), dtype=np.float32)
    up = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return up * (1.0 / max(float(up.std()), 1e-6))


def draw_tree(draw: ImageDraw.ImageDraw, rng, x, y, angle, length, width, depth, value):
    """Recursive branching polyline (vessels, bronchi) in coarse pixel coordinates."""
    pts = [(x, y)]
    a = angle
    for _ in range(3):
        a += rng.normal(0.0, 0.12)
        x += math.cos(a) * length / 3
        y += math.sin(a) * length / 3
        pts.append((x, y))
    draw.line(pts, fill=int(value), width=max(1, int(round(width))))
    if depth > 0:
        for sign in (-1, 1):
            if rng.random() < 0.85:
                draw_tree(
                    draw,
                    rng,
                    x,
                    y,
                    a + sign * rng.uniform(0.25, 0.6),
                    length * rng.uniform(0.6, 0.8),
                    width * 0.7,
                    depth - 1,
                    value * 0.8,
                )


def tone(att: np.ndarray, g: Geometry) -> np.ndarray:
    """Film-like tone curve: attenuation -> displayed density in [0, 1] (compresses dense areas)."""
    lo = 1.0 / (1.0 + math.exp(g.tone_slope * g.tone_mid))
    hi = 1.0 / (1.0 + math.exp(-g.tone_slope * (1.6 - g.tone_mid)))
    sig = 1.0 / (1.0 + np.exp(-g.tone_slope * (att - g.tone_mid)))
    shown = g.tone_floor + (1.0 - g.tone_floor) * np.clip((sig - lo) / (hi - lo), 0.0, 1.0)
    return shown.astype(np.float32)


def render_anatomy(cv: Canvas) -> None:
    """Sum the normal anatomy into cv.att (attenuation: ~1 = full soft-tissue thickness).

    Each step adds its structure to cv.att in place, in this order (the random draws and the float sums
    depend on it); the lungs and heart step also fills cv.lung, cv.air and cv.heart for the findings.
    """
    body = _soft_tissue(cv)
    _arms_and_shoulders(cv, body)
    _lungs_and_heart(cv)
    _hila(cv)
    _airways(cv)
    _spine(cv, body)
    lungs = np.maximum(cv.lung[-1], cv.lung[1])
    _ribs(cv, lungs)
    _clavicles(cv)
    _abdominal_gas(cv, body)
    _vascular_markings(cv, lungs)
    _exposure_gradient(cv)


def _soft_tissue(cv: Canvas) -> np.ndarray:
    """Soft-tissue envelope: neck, shoulders, chest wall, abdomen; thinner at the edges. Starts cv.att; returns
    the body mask."""
    g, px, py = cv.g, cv.px, cv.py
    half = (0.36 + 0.9 * step(py + 0.14, 0.24) - 0.16 * step(py - 0.28, 0.45)).astype(np.float32)
    body = step((half - np.abs(px)) * g.sx, 3 * g.edge)
    thick = np.sqrt(np.clip(1.0 - (px / (half + 0.04)) ** 2, 0.0, 1.0))
    cv.att = body * (0.45 + 0.55 * thick)
    return body


def _arms_and_shoulders(cv: Canvas, body: np.ndarray) -> None:
    """Arms (up or down, a thin air gap from the chest wall), humeral heads, scapulae."""
    g, px, py, e = cv.g, cv.px, cv.py, cv.g.edge
    for side in (-1, 1):
        shoulder = (side * 1.2, -0.05)
        hand = (side * 2.2, -2.5) if g.arms_up else (side * 1.5, 4.0)
        arm = _line_band(px, py, g, shoulder, hand, 0.11 * g.sx)
        cv.att += 0.55 * arm * (1.0 - body)
        cv.att += 0.22 * _line_band(px, py, g, shoulder, hand, 0.035 * g.sx)
        d = np.sqrt(((px - side * 1.2) * g.sx) ** 2 + ((py + 0.06) * g.sy) ** 2)
        cv.att += 0.15 * step(0.13 * g.sx - d, 3 * e)
        d = np.sqrt(((px - side * 0.98) * (1 / 0.2)) ** 2 + ((py - 0.2) * (1 / 0.32)) ** 2)
        cv.att += 0.05 * step((1.0 - d) * g.sx, 4 * e) * body


def _lungs_and_heart(cv: Canvas) -> None:
    """Lungs subtract air; the heart covers the medial lower lung (and sits on the diaphragm, where it merges
    with the equally dense liver)."""
    g, px, py = cv.g, cv.px, cv.py
    heart = _heart(g, px, py)
    cv.heart = heart
    mottle = smooth_noise(cv.rng, g.h, g.w, g.h / 28.0)
    clutter = 1.0 + 0.05 * cv.difficulty.texture * mottle
    for side in (-1, 1):
        mask, profile, _ = _lung(g, px, py, side)
        cv.lung[side] = mask
        air = g.air * mask * profile * clutter
        cv.air[side] = air
        cv.att -= air * (1.0 - 0.85 * heart)


def _hila(cv: Canvas) -> None:
    """Hila and the aortic knob."""
    g, px, py = cv.g, cv.px, cv.py
    for side in (-1, 1):
        hx, hy = g.hilum[side]
        d2 = ((px - hx) * (1 / 0.08)) ** 2 + ((py - hy) * (1 / 0.06)) ** 2
        cv.att += 0.12 * np.exp(-d2)
    d2 = ((px - 0.13) * (1 / 0.06)) ** 2 + ((py - 0.3) * (1 / 0.04)) ** 2
    cv.att += 0.06 * np.exp(-d2)


def _airways(cv: Canvas) -> None:
    """Trachea and main bronchi (air).

    Union (max) of the bands, so segment end caps do not overlap into dark blobs; the bronchi fade where they
    enter the equally lucent lung.
    """
    g, px, py = cv.g, cv.px, cv.py
    carina = (0.01, 0.42)
    taper = 0.45 + 0.55 * step(carina[1] - 0.05 - py, 0.1)
    airway = 0.3 * taper * _line_band(px, py, g, (0.0, -0.8), carina, 0.02 * g.sx / 0.35)
    lungs_now = np.maximum(cv.lung[-1], cv.lung[1])
    for side in (-1, 1):
        bronchus = _line_band(px, py, g, (carina[0], carina[1] - 0.02), (side * 0.13, 0.48), 0.013 * g.sx / 0.35)
        airway = np.maximum(airway, 0.13 * bronchus * (1.0 - 0.8 * lungs_now))
    cv.att -= airway


def _spine(cv: Canvas, body: np.ndarray) -> None:
    """Spine: vertebral bodies, disc spaces, pedicles."""
    g, py, ax = cv.g, cv.py, np.abs(cv.px)
    period = 0.082
    phase = (py * (1.0 / period)) % 1.0
    column = step((0.11 - ax) * g.sx, 2 * g.edge) * body
    body_v = 0.75 + 0.25 * step(0.36 - np.abs(phase - 0.5), 0.12)
    pedicle = np.exp(-(((ax - 0.08) * (1 / 0.02)) ** 2) - ((phase - 0.5) * (1 / 0.2)) ** 2)
    cv.att += (0.09 * body_v + 0.05 * pedicle) * column


def _ribs(cv: Canvas, lungs: np.ndarray) -> None:
    """Posterior ribs: one closed-form family of arched bands, spacing growing downwards; they show best over
    the lungs and fade over the dense mediastinum / abdomen. Then the faint anterior ribs."""
    g, py = cv.g, cv.py
    t = np.abs(cv.px) * (1.0 / 1.0)
    s = py + g.rib_a * t - g.rib_b * t**2.6
    disc = g.rib_d**2 + 4 * g.rib_e * np.maximum(s - g.rib_y0, -(g.rib_d**2) / (4 * g.rib_e))
    r = (np.sqrt(np.maximum(disc, 0.0)) - g.rib_d) * (1.0 / (2 * g.rib_e))
    f = r - np.floor(r)
    dist = np.abs(f - 0.5 * g.rib_w)
    spacing = (g.rib_d + 2 * g.rib_e * r) * g.sy  # width units per rib index
    band = step((0.5 * g.rib_w - dist) * spacing, 1.2 * g.edge)
    cortex = 0.65 + 0.35 * (dist * (2.0 / g.rib_w)) ** 2
    region = step(1.08 - t, 0.06) * step(t - 0.05, 0.08) * step(r, 0.2) * step(10.3 - r, 0.4)
    cv.att += 0.09 * band * cortex * region * (0.3 + 0.7 * lungs * (1.0 - 0.6 * cv.heart))
    # Anterior ribs: faint, descending medially; costal cartilage invisible near the sternum.
    s2 = py - 0.3 * (1.0 - t)
    r2 = (s2 - 0.02) * (1.0 / 0.115)
    f2 = r2 - np.floor(r2)
    band2 = step(0.16 - np.abs(f2 - 0.17), 0.08)
    region2 = step(t - 0.35, 0.15) * step(1.0 - t, 0.06) * step(r2, 0.2) * step(6.0 - r2, 0.3)
    cv.att += 0.04 * band2 * region2 * lungs


def _clavicles(cv: Canvas) -> None:
    """Clavicles: S-shaped bands from the sternum up towards the shoulders."""
    g, py, ax = cv.g, cv.py, np.abs(cv.px)
    tc = np.clip((ax - 0.1) * (1.0 / 1.1), 0.0, 1.0)
    yc = 0.0 - 0.1 * tc + 0.025 * np.sin(2 * math.pi * tc)
    clav = step((0.026 - np.abs(py - yc)) * g.sy, 1.5 * g.edge) * step(ax - 0.1, 0.05) * step(1.2 - ax, 0.06)
    cv.att += 0.2 * clav * (0.8 + 0.2 * np.abs(py - yc) * (1 / 0.026))


def _abdominal_gas(cv: Canvas, body: np.ndarray) -> None:
    """Stomach bubble under the left hemidiaphragm, bowel gas lower down."""
    g, rng, px, py, e = cv.g, cv.rng, cv.px, cv.py, cv.g.edge
    abdomen = step((py - g.base[1] - 0.12) * g.sy, 8 * e) * body * step(1.0 - np.abs(px), 0.15)
    if rng.random() < 0.7:
        d = np.sqrt(((px - 0.5 - 0.12 * rng.random()) * (1 / 0.13)) ** 2 + ((py - g.base[1] - 0.1) * (1 / 0.045)) ** 2)
        cv.att -= 0.22 * step((1.0 - d) * 0.05 * g.sy, 3 * e)
    gas = np.clip(smooth_noise(rng, g.h, g.w, g.h / 30.0) - 1.5, 0.0, 0.6)
    cv.att -= 0.2 * gas * abdomen * step(py - g.base[1] - 0.3, 0.15)


def _vascular_markings(cv: Canvas, lungs: np.ndarray) -> None:
    """Vascular markings: branching trees from each hilum, fading to the periphery."""
    g, rng = cv.g, cv.rng
    img = Image.new("L", (g.w, g.h), 0)
    draw = ImageDraw.Draw(img)
    lwp = g.lung_width_px()
    for side in (-1, 1):
        hx, hy = g.hilum[side]
        col, row = g.to_pix(hx, hy)
        for a in np.linspace(-1.1, 1.3, 8):
            a = a + rng.normal(0.0, 0.12)
            ang = a if side > 0 else math.pi - a
            start = lwp * rng.uniform(0.03, 0.08)
            draw_tree(
                draw,
                rng,
                col + math.cos(ang + g.theta) * start,
                row + math.sin(ang + g.theta) * start,
                ang + g.theta,
                lwp * rng.uniform(0.17, 0.25),
                lwp * 0.02,
                3,
                230,
            )
    vessels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.1)), dtype=np.float32) * (1 / 255.0)
    cv.att += 0.13 * cv.difficulty.texture * vessels * lungs


def _exposure_gradient(cv: Canvas) -> None:
    """Smooth exposure gradient (heel effect, scatter)."""
    g, rng, var = cv.g, cv.rng, cv.difficulty.anatomy_variability
    yy = np.linspace(-0.5, 0.5, g.h, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, g.w, dtype=np.float32)[None, :]
    cv.att += float(rng.normal(0, 0.05 * var)) * xx + float(rng.normal(0, 0.05 * var)) * yy
    cv.att += 0.02 * var * smooth_noise(rng, g.h, g.w, g.h / 3.0)
