"""Synthetic pediatric chest X-ray phantoms written in the exact VinDr-PCXR layout.

SYNTHETIC PHANTOM - NOT CLINICAL DATA. The real datasets need credentialed access, so tests, the
demo model pack and the benchmarks run on these phantoms instead. Every DICOM says so in
ImageComments and SeriesDescription.

Layout written by :func:`generate_dataset` (as described in the VinDr-PCXR paper, "Data Records")::

    OUT/train/<image_id>.dicom          image_id = md5(SOPInstanceUID).hexdigest()
    OUT/test/<image_id>.dicom
    OUT/annotations_{train,test}.csv    image_id,rad_id,class_name,x_min,y_min,x_max,y_max,class_id
                                        one row per box, original pixel space (x = column,
                                        y = row, max edges exclusive); an image without a box
                                        gets one "No finding" row (class_id 37, empty coordinates)
    OUT/image_labels_{train,test}.csv   image_id,rad_ID,<one 0/1 column per VinDr-PCXR label>

Generative model
----------------
1. Anatomy. A patient frame (``px`` across the thorax, -1..1 between the lateral lung margins,
   image left = patient right as in a PA view; ``py`` down, 0 at the lung apices and 1 at the
   costophrenic angles) is placed in the image with random size, position and in-plane rotation.
   An "attenuation" image is summed from analytic soft-edged shapes evaluated on a coarse grid
   (longest side ~640 px): soft-tissue envelope with neck, shoulders and arms (up or down); two
   lung fields (rounded apices, diaphragm domes with sharp costophrenic angles, the right dome a
   little higher) that subtract air; heart (pediatric proportions, cardiothoracic ratio 0.45-0.57,
   bulging to the image's right); thymic widening of the upper mediastinum; spine with vertebral
   bodies and pedicles; trachea and main bronchi; posterior ribs (one closed-form family of
   arched bands, spacing growing downwards, brighter cortex) and faint anterior ribs; clavicles;
   scapulae; humeral heads; stomach bubble; hila with branching vascular markings fading to the
   periphery; parenchymal mottle; a smooth exposure gradient.
2. Findings (``SYNTHETIC_LOCAL``) are added to the attenuation image, each with its own strength
   and size; each one's box is the extent of its own contribution (thresholded), so boxes are exact.
   Nominal sizes (times the ``size`` knob): consolidation 20-45% of a lung's width (patchy blobs,
   fuzzy border, optional air bronchograms); other opacity 3-8% of the image width (irregular
   round); PIO 9-15 streaks reaching 30-55% of a lung's width from the hilum plus perihilar haze
   (one box per affected side); reticulonodular: net + dots over 35-60% of a lung's width in the
   mid/lower zone; bronchial thickening: 3-6 ring shadows and 1-3 tram tracks within ~35% of a
   lung's width of a hilum; pleural effusion: fluid up to 10-28% of the lung height at one base,
   meniscus higher laterally. Cardiomegaly (CTR >= 0.61, ~0.63-0.70 at default) and lung
   hyperinflation (lower, flatter diaphragm, more lucent lungs, narrower heart; one box around
   both lungs) change the anatomy parameters instead.
3. Display. Attenuation -> density in [0, 1] by a film-like sigmoid tone curve (random midpoint,
   slope and black level: exposure/processing variation; it compresses dense regions so the spine
   is faint behind the heart), upsampled to full resolution with PIL (bicubic), then
   signal-dependent quantum noise is added at full resolution. ``PhantomCase.density`` is this
   final image as displayed (bright = dense).
4. Labels. Local label columns are 1 exactly when the image has a box of that label. Global labels
   follow the paper's disease/finding relations, each rule firing with probability
   ``1 - label_noise`` plus a ``spurious_rate`` of causeless positives:
   Pneumonia <- Consolidation; Brocho-pneumonia <- Reticulonodular opacity or (PIO and Other
   opacity); Bronchitis <- Bronchial thickening or (PIO without Consolidation); Bronchiolitis <-
   Lung hyperinflation (which is often drawn together with PIO); Other diseases <- Cardiomegaly or
   Pleural effusion; No finding = 1 only with no local finding and no disease. Other columns are 0.
5. Finding mix. ~45% of images are normal; the others get 1-3 distinct findings drawn without
   replacement with weights ``0.06 + 0.8 * Table-2 share`` (effusion +0.03), so PIO is the most
   common (~27% of images) and each of the eight appears in >= ~6% of images.
6. DICOM. DX (For Presentation) or CR; 8, 12 or 16 bits stored, mostly unsigned; ~25% MONOCHROME1
   (stored values inverted so the display is the same); rescale slope/intercept sometimes
   non-trivial; a linear VOI window (PS3.3 C.11.2.1.2.1, applied after the rescale) that maps the
   density range onto the display range exactly, sometimes omitted (readers then use min-max);
   Explicit VR LE, Implicit VR LE or RLE Lossless. See :func:`choose_encoding`. Forcing a transfer
   syntax can also give big endian, deflate, the JPEG processes (baseline, extended 12-bit,
   lossless, lossless SV1), JPEG-LS (lossless, near-lossless), JPEG 2000 and HTJ2K (lossless,
   lossless RPCL, lossy): see :data:`CODECS` and :func:`encode_dataset`.

Difficulty knobs (:class:`Difficulty`, presets in ``DIFFICULTIES``):
``contrast`` (range of a multiplier on every finding's nominal strength: peak density change,
CTR excess, fluid fraction), ``size`` (range of a multiplier on nominal finding sizes),
``noise_sigma`` (quantum noise std in density units at mid-grey), ``anatomy_variability`` (scale
of random patient size/position/rotation/exposure spread, 0 = one canonical patient), ``texture``
(amplitude of normal vascular markings and parenchymal mottle, i.e. clutter that mimics
interstitial findings), ``label_noise`` (probability a finding->disease rule does not fire) and
``spurious_rate`` (probability of a causeless disease label). "default" is deliberately not
trivial (low-contrast small findings over ribs and noise); "easy" is clearly visible.

Everything is drawn from ``numpy.random.Generator`` streams derived from the seed, so a seed gives
identical bytes (RLE bytes depend on which pydicom RLE encoder plugin is installed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import multiprocessing
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFilter
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_encoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from tqdm import tqdm

from training.labels import SYNTHETIC_GLOBAL, SYNTHETIC_LOCAL, VINDR_PCXR

DISCLAIMER = "SYNTHETIC PHANTOM - NOT CLINICAL DATA"

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
    PIO, RETICULONODULAR, BRONCHIAL_THICKENING, CARDIOMEGALY, OTHER_OPACITY, CONSOLIDATION,
    HYPERINFLATION, EFFUSION,
}

ANNOTATION_HEADER = (
    "image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max", "class_id",
)
IMAGE_LABEL_HEADER = ("image_id", "rad_ID") + tuple(label.name for label in VINDR_PCXR.labels)

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


@dataclass(frozen=True)
class Codec:
    """How the generator writes one transfer syntax (see :func:`encode_dataset`)."""

    uid: str
    encoder: str  # who writes the pixels: "native", "pydicom:<plugin>", "imagecodecs:<function>"
    bits: tuple[int, ...] = (8, 12, 16)  # BitsStored values the codec can carry
    signed: bool = True  # PixelRepresentation 1 (two's complement) can be carried exactly
    lossy: bool = False
    method: str | None = None  # LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5.1) when lossy


# Names accepted by --transfer-syntax (their UIDs are accepted too). Only "explicit", "implicit"
# and "rle" are in the random default mix (_TS_WEIGHTS); the others are written when forced.
CODECS: dict[str, Codec] = {
    "explicit": Codec(ExplicitVRLittleEndian, "native"),
    "implicit": Codec(ImplicitVRLittleEndian, "native"),
    "big-endian": Codec(ExplicitVRBigEndian, "native"),  # retired, but still sent by some PACS
    "deflate": Codec(DeflatedExplicitVRLittleEndian, "native"),  # zlib-deflated dataset (pydicom)
    "rle": Codec(RLELossless, "pydicom:rle"),
    # JPEG processes 1 and 4 are lossy DCT codecs without a notion of sign: a two's complement
    # image would wrap around at zero, so they take unsigned data only. libjpeg-turbo writes 8-bit
    # data as baseline (SOF0), never as 8-bit process 2 (SOF1), so "jpeg-extended" is 12-bit.
    "jpeg-baseline": Codec(JPEGBaseline8Bit, "imagecodecs:jpeg8_encode", bits=(8,), signed=False,
                           lossy=True, method="ISO_10918_1"),
    "jpeg-extended": Codec(JPEGExtended12Bit, "imagecodecs:jpeg8_encode", bits=(12,),
                           signed=False, lossy=True, method="ISO_10918_1"),
    "jpeg-lossless": Codec(JPEGLossless, "imagecodecs:jpeg8_encode"),  # process 14, predictor 6
    "jpeg-lossless-sv1": Codec(JPEGLosslessSV1, "imagecodecs:jpeg8_encode"),  # predictor 1
    "jpeg-ls": Codec(JPEGLSLossless, "pydicom:pyjpegls"),
    "jpeg-ls-near": Codec(JPEGLSNearLossless, "pydicom:pyjpegls", lossy=True, method="ISO_14495_1"),
    "j2k": Codec(JPEG2000Lossless, "pydicom:pylibjpeg-openjpeg"),
    "j2k-lossy": Codec(JPEG2000, "pydicom:pylibjpeg-openjpeg", lossy=True, method="ISO_15444_1"),
    # OpenJPH writes the container's precision (8 or 16 bits) into the codestream, so 12-bit data
    # travels in a 16-bit HTJ2K codestream (values identical; pydicom decodes it exactly).
    "htj2k": Codec(HTJ2KLossless, "imagecodecs:htj2k_encode"),
    "htj2k-rpcl": Codec(HTJ2KLosslessRPCL, "imagecodecs:htj2k_encode"),
    "htj2k-lossy": Codec(HTJ2K, "imagecodecs:htj2k_encode", lossy=True, method="ISO_15444_15"),
}
TRANSFER_SYNTAXES = {name: codec.uid for name, codec in CODECS.items()}
_TS_WEIGHTS = {"explicit": 0.7, "implicit": 0.15, "rle": 0.15}
_UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}

# Lossy settings: visibly lossy, yet far below the display's 8-bit resolution of the density.
JPEG_QUALITY = 90  # libjpeg quality, processes 1 and 4
J2K_COMPRESSION_RATIO = 10.0  # JPEG 2000 irreversible (9/7) target ratio
HTJ2K_QSTEP = 0.01  # OpenJPH base quantisation step, relative to the data's own bit depth


def jpeg_ls_near(bits_stored: int) -> int:
    """The JPEG-LS NEAR parameter (largest absolute error, in stored values) for a bit depth:
    2, 16 and 255 (the largest NEAR JPEG-LS allows) for 8, 12 and 16 bits."""
    return min(255, max(2, 1 << (bits_stored - 8)))


_WORK_SIDE = 640  # longest side of the coarse grid the anatomy is rendered on


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difficulty:
    """How hard the phantoms are. Strength/size knobs are multipliers on each finding's nominal
    look, so one preset scales all eight findings consistently."""

    name: str
    contrast: tuple[float, float]  # range of the multiplier on a finding's nominal strength
    size: tuple[float, float]  # range of the multiplier on a finding's nominal size
    noise_sigma: float  # quantum noise std (density units, at mid-grey), full resolution
    anatomy_variability: float  # 0 = canonical patient, 1 = default spread of size/pose/exposure
    texture: float  # amplitude of normal vascular markings and parenchymal mottle (clutter)
    label_noise: float  # probability that a finding -> disease rule does not fire
    spurious_rate: float  # probability of a disease label without a causing finding


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty("easy", contrast=(1.5, 2.2), size=(1.1, 1.4), noise_sigma=0.008,
                       anatomy_variability=0.5, texture=0.6, label_noise=0.05, spurious_rate=0.01),
    "default": Difficulty("default", contrast=(0.6, 1.1), size=(0.8, 1.15), noise_sigma=0.02,
                          anatomy_variability=1.0, texture=1.0, label_noise=0.12,
                          spurious_rate=0.02),
    "hard": Difficulty("hard", contrast=(0.4, 0.75), size=(0.65, 1.0), noise_sigma=0.032,
                       anatomy_variability=1.4, texture=1.3, label_noise=0.2, spurious_rate=0.04),
}


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


@dataclass(frozen=True)
class PixelEncoding:
    """How the density image is stored: see :func:`choose_encoding` / :func:`encode_pixels`."""

    transfer_syntax: str
    photometric: str  # MONOCHROME1 or MONOCHROME2
    bits_stored: int  # 8, 12 or 16
    signed: bool  # PixelRepresentation 1
    slope: float
    intercept: float
    windowed: bool  # write WindowCenter/WindowWidth

    @property
    def bits_allocated(self) -> int:
        return 8 if self.bits_stored <= 8 else 16


def resolve_difficulty(difficulty: str | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    try:
        return DIFFICULTIES[difficulty]
    except KeyError:
        raise ValueError(
            f"unknown difficulty {difficulty!r}; one of {sorted(DIFFICULTIES)}") from None


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _step(d: np.ndarray, width: float) -> np.ndarray:
    """Smooth 0->1 step of `width` centred on d = 0 (d > 0 is inside)."""
    t = np.clip(d * (1.0 / width) + 0.5, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class _Geometry:
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


def _sample_geometry(rng: np.random.Generator, h: int, w: int, aspect: float, var: float,
                     age_months: int) -> _Geometry:
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
    g = _Geometry(h=h, w=w, aspect=aspect, cx=0.5 + jit(0.025), cyc=y_apex + 0.5 * sy, sx=sx,
                  sy=sy, theta=jit(0.035))
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


# --------------------------------------------------------------------------------------------
# Anatomy rendering (coarse grid, "attenuation" units)
# --------------------------------------------------------------------------------------------


@dataclass
class _Canvas:
    g: _Geometry
    rng: np.random.Generator
    difficulty: Difficulty
    px: np.ndarray
    py: np.ndarray
    att: np.ndarray  # attenuation image being built
    lung: dict  # side -> soft mask
    air: dict  # side -> air attenuation subtracted for that lung (already includes profile)
    heart: np.ndarray
    boxes: list = field(default_factory=list)  # (label, row0, row1, col0, col1) coarse pixels


def _lung(g: _Geometry, px: np.ndarray, py: np.ndarray, side: int):
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
    mask = _step((1.0 - rho) * scale, 2.0 * e) * _step((q_dia - q) * g.sy, e)
    profile = (0.4 + 0.6 * np.sqrt(np.clip(1.0 - z * z, 0.0, 1.0)))
    profile *= 0.72 + 0.28 * np.clip((q_dia - q) * (1 / 0.22), 0.0, 1.0)
    profile *= 0.78 + 0.22 * np.clip(q * (1 / 0.3), 0.0, 1.0)
    return mask, profile, q_dia


def _heart_base(g: _Geometry) -> float:
    """py where the heart borders meet the diaphragm (just above the medial dome level)."""
    return min(g.base[s] + 0.02 - 0.5 * g.dome[s] for s in (-1, 1)) - 0.02


def _heart(g: _Geometry, px: np.ndarray, py: np.ndarray) -> np.ndarray:
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
    return _step((1.0 - rho) * a, 3.0 * g.edge)


def _line_band(px, py, g, p0, p1, half_width):
    """Soft band around the segment p0-p1 (patient frame), widths in width units."""
    x0, y0 = p0[0] * g.sx, p0[1] * g.sy
    x1, y1 = p1[0] * g.sx, p1[1] * g.sy
    X, Y = px * g.sx, py * g.sy
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * vx + (Y - y0) * vy) * (1.0 / (vx * vx + vy * vy)), 0.0, 1.0)
    d = np.sqrt((X - x0 - t * vx) ** 2 + (Y - y0 - t * vy) ** 2)
    return _step(half_width - d, 2 * g.edge)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Band-limited noise (~unit std, feature size ~`cell` px) by bicubic upsampling."""
    gh, gw = max(2, int(round(h / cell)) + 2), max(2, int(round(w / cell)) + 2)
    coarse = rng.standard_normal((gh, gw), dtype=np.float32)
    up = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return up * (1.0 / max(float(up.std()), 1e-6))


def _draw_tree(draw: ImageDraw.ImageDraw, rng, x, y, angle, length, width, depth, value):
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
                _draw_tree(draw, rng, x, y, a + sign * rng.uniform(0.25, 0.6),
                           length * rng.uniform(0.6, 0.8), width * 0.7, depth - 1, value * 0.8)


def _tone(att: np.ndarray, g: _Geometry) -> np.ndarray:
    """Film-like tone curve: attenuation -> displayed density in [0, 1] (compresses dense areas)."""
    lo = 1.0 / (1.0 + math.exp(g.tone_slope * g.tone_mid))
    hi = 1.0 / (1.0 + math.exp(-g.tone_slope * (1.6 - g.tone_mid)))
    sig = 1.0 / (1.0 + np.exp(-g.tone_slope * (att - g.tone_mid)))
    shown = g.tone_floor + (1.0 - g.tone_floor) * np.clip((sig - lo) / (hi - lo), 0.0, 1.0)
    return shown.astype(np.float32)


def _render_anatomy(cv: _Canvas) -> None:
    """Sum the normal anatomy into cv.att (attenuation: ~1 = full soft-tissue thickness)."""
    g, rng, px, py = cv.g, cv.rng, cv.px, cv.py
    var = cv.difficulty.anatomy_variability
    e = g.edge
    ax = np.abs(px)

    # Soft-tissue envelope: neck, shoulders, chest wall, abdomen; thinner at the edges.
    half = (0.36 + 0.9 * _step(py + 0.14, 0.24) - 0.16 * _step(py - 0.28, 0.45)).astype(np.float32)
    body = _step((half - ax) * g.sx, 3 * e)
    thick = np.sqrt(np.clip(1.0 - (px / (half + 0.04)) ** 2, 0.0, 1.0))
    att = body * (0.45 + 0.55 * thick)

    # Arms (up or down, a thin air gap from the chest wall), humeral heads, scapulae.
    for side in (-1, 1):
        shoulder = (side * 1.2, -0.05)
        hand = (side * 2.2, -2.5) if g.arms_up else (side * 1.5, 4.0)
        arm = _line_band(px, py, g, shoulder, hand, 0.11 * g.sx)
        att += 0.55 * arm * (1.0 - body)
        att += 0.22 * _line_band(px, py, g, shoulder, hand, 0.035 * g.sx)
        d = np.sqrt(((px - side * 1.2) * g.sx) ** 2 + ((py + 0.06) * g.sy) ** 2)
        att += 0.15 * _step(0.13 * g.sx - d, 3 * e)
        d = np.sqrt(((px - side * 0.98) * (1 / 0.2)) ** 2 + ((py - 0.2) * (1 / 0.32)) ** 2)
        att += 0.05 * _step((1.0 - d) * g.sx, 4 * e) * body

    # Lungs subtract air; the heart covers the medial lower lung (and sits on the diaphragm,
    # where it merges with the equally dense liver).
    heart = _heart(g, px, py)
    cv.heart = heart
    mottle = _smooth_noise(rng, g.h, g.w, g.h / 28.0)
    clutter = 1.0 + 0.05 * cv.difficulty.texture * mottle
    for side in (-1, 1):
        mask, profile, _ = _lung(g, px, py, side)
        cv.lung[side] = mask
        air = g.air * mask * profile * clutter
        cv.air[side] = air
        att -= air * (1.0 - 0.85 * heart)

    # Hila and the aortic knob.
    for side in (-1, 1):
        hx, hy = g.hilum[side]
        d2 = ((px - hx) * (1 / 0.08)) ** 2 + ((py - hy) * (1 / 0.06)) ** 2
        att += 0.12 * np.exp(-d2)
    d2 = ((px - 0.13) * (1 / 0.06)) ** 2 + ((py - 0.3) * (1 / 0.04)) ** 2
    att += 0.06 * np.exp(-d2)

    # Trachea and main bronchi (air).
    # Union (max) of the bands, so segment end caps do not overlap into dark blobs; the bronchi
    # fade where they enter the equally lucent lung.
    carina = (0.01, 0.42)
    taper = 0.45 + 0.55 * _step(carina[1] - 0.05 - py, 0.1)
    airway = 0.3 * taper * _line_band(px, py, g, (0.0, -0.8), carina, 0.02 * g.sx / 0.35)
    lungs_now = np.maximum(cv.lung[-1], cv.lung[1])
    for side in (-1, 1):
        bronchus = _line_band(px, py, g, (carina[0], carina[1] - 0.02), (side * 0.13, 0.48),
                              0.013 * g.sx / 0.35)
        airway = np.maximum(airway, 0.13 * bronchus * (1.0 - 0.8 * lungs_now))
    att -= airway

    # Spine: vertebral bodies, disc spaces, pedicles.
    period = 0.082
    phase = (py * (1.0 / period)) % 1.0
    column = _step((0.11 - ax) * g.sx, 2 * e) * body
    body_v = 0.75 + 0.25 * _step(0.36 - np.abs(phase - 0.5), 0.12)
    pedicle = np.exp(-((ax - 0.08) * (1 / 0.02)) ** 2 - ((phase - 0.5) * (1 / 0.2)) ** 2)
    att += (0.09 * body_v + 0.05 * pedicle) * column

    # Posterior ribs: one closed-form family of arched bands; spacing grows downwards.
    # They show best over the lungs and fade over the dense mediastinum / abdomen.
    lungs = np.maximum(cv.lung[-1], cv.lung[1])
    t = ax * (1.0 / 1.0)
    s = py + g.rib_a * t - g.rib_b * t ** 2.6
    disc = g.rib_d ** 2 + 4 * g.rib_e * np.maximum(s - g.rib_y0, -g.rib_d ** 2 / (4 * g.rib_e))
    r = (np.sqrt(np.maximum(disc, 0.0)) - g.rib_d) * (1.0 / (2 * g.rib_e))
    f = r - np.floor(r)
    dist = np.abs(f - 0.5 * g.rib_w)
    spacing = (g.rib_d + 2 * g.rib_e * r) * g.sy  # width units per rib index
    band = _step((0.5 * g.rib_w - dist) * spacing, 1.2 * e)
    cortex = 0.65 + 0.35 * (dist * (2.0 / g.rib_w)) ** 2
    region = _step(1.08 - t, 0.06) * _step(t - 0.05, 0.08) * _step(r, 0.2) * _step(10.3 - r, 0.4)
    att += 0.09 * band * cortex * region * (0.3 + 0.7 * lungs * (1.0 - 0.6 * heart))
    # Anterior ribs: faint, descending medially; costal cartilage invisible near the sternum.
    s2 = py - 0.3 * (1.0 - t)
    r2 = (s2 - 0.02) * (1.0 / 0.115)
    f2 = r2 - np.floor(r2)
    band2 = _step(0.16 - np.abs(f2 - 0.17), 0.08)
    region2 = _step(t - 0.35, 0.15) * _step(1.0 - t, 0.06) * _step(r2, 0.2) * _step(6.0 - r2, 0.3)
    att += 0.04 * band2 * region2 * lungs

    # Clavicles: S-shaped bands from the sternum up towards the shoulders.
    tc = np.clip((ax - 0.1) * (1.0 / 1.1), 0.0, 1.0)
    yc = 0.0 - 0.1 * tc + 0.025 * np.sin(2 * math.pi * tc)
    clav = (_step((0.026 - np.abs(py - yc)) * g.sy, 1.5 * e)
            * _step(ax - 0.1, 0.05) * _step(1.2 - ax, 0.06))
    att += 0.2 * clav * (0.8 + 0.2 * np.abs(py - yc) * (1 / 0.026))

    abdomen = _step((py - g.base[1] - 0.12) * g.sy, 8 * e) * body * _step(1.0 - ax, 0.15)
    # Stomach bubble under the left hemidiaphragm, bowel gas lower down.
    if rng.random() < 0.7:
        d = np.sqrt(((px - 0.5 - 0.12 * rng.random()) * (1 / 0.13)) ** 2
                    + ((py - g.base[1] - 0.1) * (1 / 0.045)) ** 2)
        att -= 0.22 * _step((1.0 - d) * 0.05 * g.sy, 3 * e)
    gas = np.clip(_smooth_noise(rng, g.h, g.w, g.h / 30.0) - 1.5, 0.0, 0.6)
    att -= 0.2 * gas * abdomen * _step(py - g.base[1] - 0.3, 0.15)

    # Vascular markings: branching trees from each hilum, fading to the periphery.
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
            _draw_tree(draw, rng, col + math.cos(ang + g.theta) * start,
                       row + math.sin(ang + g.theta) * start, ang + g.theta,
                       lwp * rng.uniform(0.17, 0.25), lwp * 0.02, 3, 230)
    vessels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.1)), dtype=np.float32) * (1 / 255.0)
    att += 0.13 * cv.difficulty.texture * vessels * lungs

    # Smooth exposure gradient (heel effect, scatter).
    yy = np.linspace(-0.5, 0.5, g.h, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, g.w, dtype=np.float32)[None, :]
    att += float(rng.normal(0, 0.05 * var)) * xx + float(rng.normal(0, 0.05 * var)) * yy
    att += 0.02 * var * _smooth_noise(rng, g.h, g.w, g.h / 3.0)
    cv.att = att


# --------------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------------


def _window(g: _Geometry, row: float, col: float, radius: float):
    r0, r1 = max(0, int(row - radius)), min(g.h, int(row + radius) + 2)
    c0, c1 = max(0, int(col - radius)), min(g.w, int(col + radius) + 2)
    rows = np.arange(r0, r1, dtype=np.float32)[:, None]
    cols = np.arange(c0, c1, dtype=np.float32)[None, :]
    return (slice(r0, r1), slice(c0, c1)), rows, cols


def _add_box(cv: _Canvas, label: str, mask: np.ndarray, sl, frac: float = 0.25) -> None:
    peak = float(mask.max()) if mask.size else 0.0
    if peak <= 1e-6:
        return
    keep = mask > frac * peak
    rr = np.flatnonzero(keep.any(axis=1))
    cc = np.flatnonzero(keep.any(axis=0))
    r0 = (sl[0].start or 0) + int(rr[0])
    c0 = (sl[1].start or 0) + int(cc[0])
    cv.boxes.append((label, r0, r0 + int(rr[-1] - rr[0]) + 1, c0, c0 + int(cc[-1] - cc[0]) + 1))


def _lung_point(cv: _Canvas, side: int, q_range, u_range) -> tuple[float, float]:
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


def _plant_consolidation(cv: _Canvas, strength: float, size: float) -> None:
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
        patch += np.exp(-((rows - row - oy) / ry) ** 2 - ((cols - col - ox) / rb) ** 2)
    texture = _smooth_noise(rng, *patch.shape, max(2.0, radius / 4))
    patch *= 1.0 + 0.35 * texture
    patch *= np.exp(-(((rows - row) ** 2 + (cols - col) ** 2) / (2.2 * radius) ** 2) ** 2)
    dens = _step(patch - 0.6, 1.1) * cv.lung[side][sl]
    if rng.random() < 0.5:  # air bronchograms
        img = Image.new("L", (patch.shape[1], patch.shape[0]), 0)
        draw = ImageDraw.Draw(img)
        hx, hy = g.hilum[side]
        hc, hr = g.to_pix(hx, hy)
        base_angle = math.atan2(row - hr, col - hc)
        for _ in range(int(rng.integers(1, 3))):
            _draw_tree(draw, rng, col - sl[1].start - math.cos(base_angle) * radius,
                       row - sl[0].start - math.sin(base_angle) * radius,
                       base_angle + rng.normal(0, 0.3), 1.5 * radius, max(1.0, radius / 14), 2, 255)
        bronch = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), np.float32) * (1 / 255.0)
        dens = dens * (1.0 - 0.4 * bronch)
    cv.att[sl] += 0.2 * strength * dens
    _add_box(cv, CONSOLIDATION, dens, sl)


def _plant_other_opacity(cv: _Canvas, strength: float, size: float) -> None:
    """Roundish / irregular nodule-like opacity, 3-8% of the image width."""
    rng, g = cv.rng, cv.g
    side = int(rng.choice((-1, 1)))
    row, col = _lung_point(cv, side, (0.2, 0.85), (-0.6, 0.7))
    radius = 0.5 * rng.uniform(0.03, 0.08) * size * g.w
    sl, rows, cols = _window(g, row, col, 1.6 * radius + 2)
    dy, dx = rows - row, cols - col
    ang = np.arctan2(dy, dx)
    rr = radius * (1.0 + rng.uniform(0.03, 0.15) * np.cos(2 * ang + rng.uniform(0, 6.3))
                   + rng.uniform(0.0, 0.12) * np.cos(3 * ang + rng.uniform(0, 6.3)))
    rho = np.sqrt(dx * dx + dy * dy) / rr
    dens = np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0)) * 0.7 + 0.3 * _step(1.0 - rho, 0.3)
    dens = dens * np.clip(cv.lung[side][sl] * 1.5, 0.0, 1.0)
    cv.att[sl] += 0.2 * strength * dens
    _add_box(cv, OTHER_OPACITY, dens, sl, frac=0.2)


def _plant_pio(cv: _Canvas, strength: float, size: float) -> None:
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
        _add_box(cv, PIO, dens, (slice(0, g.h), slice(0, g.w)), frac=0.2)


def _plant_reticulonodular(cv: _Canvas, strength: float, size: float) -> None:
    """Fine net + dot texture over a mid/lower lung zone; one box per textured area."""
    rng, g = cv.rng, cv.g
    lwp = g.lung_width_px()
    for side in _sides(rng, 0.4):
        row, col = _lung_point(cv, side, (0.5, 0.8), (-0.2, 0.5))
        rx = 0.5 * rng.uniform(0.35, 0.6) * size * lwp
        ry = rx * rng.uniform(0.8, 1.3)
        sl, rows, cols = _window(g, row, col, 1.3 * max(rx, ry))
        region = _step(1.0 - np.sqrt(((rows - row) / ry) ** 2 + ((cols - col) / rx) ** 2), 0.35)
        shape = region.shape
        cell = max(2.5, lwp * 0.045)
        n1 = _smooth_noise(rng, *shape, cell)
        net = np.exp(-(n1 * (1 / 0.3)) ** 2)
        n2 = _smooth_noise(rng, *shape, cell * 0.8)
        dots = np.clip((n2 - 1.5) * 1.5, 0.0, 1.0)
        dens = (0.7 * net + 0.8 * dots + 0.15) * region * cv.lung[side][sl]
        cv.att[sl] += 0.09 * strength * dens
        _add_box(cv, RETICULONODULAR, region * cv.lung[side][sl], sl, frac=0.3)


def _plant_bronchial_thickening(cv: _Canvas, strength: float, size: float) -> None:
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
                draw.line([(x0, y0), (x0 + math.cos(ang) * length, y0 + math.sin(ang) * length)],
                          fill=220, width=max(1, int(round(sep * 0.5))))
        dens = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)), np.float32) * (1 / 255.0)
        dens *= np.clip(cv.lung[side] * 1.3, 0.0, 1.0)
        cv.att += 0.13 * strength * dens
        _add_box(cv, BRONCHIAL_THICKENING, dens, (slice(0, g.h), slice(0, g.w)), frac=0.2)


def _plant_effusion(cv: _Canvas, strength: float, size: float) -> None:
    """Homogeneous fluid density at one lung base with a meniscus (higher laterally)."""
    rng, g = cv.rng, cv.g
    side = int(rng.choice((-1, 1)))
    u = (cv.px * side - g.lc) * (1.0 / g.lw)
    level = g.base[side] - rng.uniform(0.1, 0.28) * size
    meniscus = level + 0.14 * np.clip((1.0 - u) * 0.5, 0.0, 1.5) ** 1.5
    # fluid thins towards the meniscus, so the density fades upwards over a few pixels
    fluid = _step((cv.py - meniscus) * g.sy - 3 * g.edge, 7 * g.edge) * cv.lung[side]
    gradient = 0.75 + 0.25 * np.clip((cv.py - meniscus) * 6.0, 0.0, 1.0)
    fill = min(0.9, 0.45 + 0.3 * strength)
    cv.att += fill * cv.air[side] * fluid * gradient
    _add_box(cv, EFFUSION, fluid, (slice(0, g.h), slice(0, g.w)), frac=0.3)


_PLANTERS = {
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


def _draw_findings(rng: np.random.Generator) -> list[str]:
    if rng.random() < 0.45:
        return []
    k = int(rng.choice((1, 2, 3), p=(0.55, 0.3, 0.15)))
    idx = rng.choice(len(SYNTHETIC_LOCAL), size=k, replace=False, p=_finding_weights())
    chosen = [SYNTHETIC_LOCAL[i] for i in sorted(idx)]
    if HYPERINFLATION in chosen and PIO not in chosen and rng.random() < 0.4:
        chosen.insert(0, PIO)  # bronchiolitis: hyperinflation with peribronchial opacities
    return chosen


def _disease_labels(rng: np.random.Generator, local: set[str], d: Difficulty) -> dict[str, int]:
    causes = {
        "Pneumonia": CONSOLIDATION in local,
        "Brocho-pneumonia": RETICULONODULAR in local or (PIO in local and OTHER_OPACITY in local),
        "Bronchitis": (BRONCHIAL_THICKENING in local
                       or (PIO in local and CONSOLIDATION not in local)),
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


# --------------------------------------------------------------------------------------------
# Public rendering API
# --------------------------------------------------------------------------------------------


def render_case(rng: np.random.Generator, rows: int, cols: int, difficulty: Difficulty,
                findings: Sequence[str] | None = None) -> PhantomCase:
    """Render one phantom. `findings=None` draws them at random; a sequence plants exactly those."""
    difficulty = resolve_difficulty(difficulty)
    if findings is None:
        wanted = _draw_findings(rng)
    else:
        unknown = [f for f in findings if f not in SYNTHETIC_LOCAL]
        if unknown:
            raise ValueError(f"cannot plant {unknown}; plantable: {list(SYNTHETIC_LOCAL)}")
        wanted = list(dict.fromkeys(findings))
    age = int(np.clip(round(rng.lognormal(math.log(20.0), 0.8)), 1, 119))
    sex = "M" if rng.random() < 0.58 else "F"

    scale = max(rows, cols) / _WORK_SIDE
    if scale < 1.0:
        scale = 1.0
    h, w = max(32, int(round(rows / scale))), max(32, int(round(cols / scale)))
    g = _sample_geometry(rng, h, w, rows / cols, difficulty.anatomy_variability, age)

    def strength() -> float:
        return float(rng.uniform(*difficulty.contrast))

    def size() -> float:
        return float(rng.uniform(*difficulty.size))

    if CARDIOMEGALY in wanted:
        g.ctr = float(np.clip(0.6 + 0.055 * strength() + rng.uniform(0.0, 0.03), 0.61, 0.78))
    if HYPERINFLATION in wanted:
        s = strength()
        for side in (-1, 1):
            g.base[side] += 0.07 + 0.06 * s
            g.dome[side] *= max(0.15, 0.55 - 0.2 * s)
        g.air *= 1.0 + 0.15 * s
        g.lw *= 1.02
        g.heart_top += 0.04 * s  # the heart hangs lower and looks narrow
        g.ctr *= 0.93

    px, py = g.grid()
    cv = _Canvas(g=g, rng=rng, difficulty=difficulty, px=px, py=py,
                 att=np.zeros((h, w), np.float32), lung={}, air={}, heart=np.zeros(1))
    _render_anatomy(cv)

    for label in wanted:
        if label in _PLANTERS:
            _PLANTERS[label](cv, strength(), size())
        elif label == CARDIOMEGALY:
            dia = min(g.base[-1] - 0.5 * g.dome[-1], g.base[1] - 0.5 * g.dome[1]) + 0.02
            visible = cv.heart * _step((dia - py) * g.sy, 2 * g.edge)
            _add_box(cv, CARDIOMEGALY, visible, (slice(0, h), slice(0, w)), frac=0.5)
        elif label == HYPERINFLATION:
            _add_box(cv, HYPERINFLATION, np.maximum(cv.lung[-1], cv.lung[1]),
                     (slice(0, h), slice(0, w)), frac=0.5)

    low = _tone(cv.att, g)
    density = np.array(Image.fromarray(low.astype(np.float32)).resize((cols, rows), Image.BICUBIC),
                         dtype=np.float32)
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    noise *= difficulty.noise_sigma * (0.6 + 0.8 * np.clip(density, 0.0, 1.0))
    density += noise
    np.clip(density, 0.0, 1.0, out=density)

    fy, fx = rows / h, cols / w
    boxes: list[Finding] = []
    for label, r0, r1, c0, c1 in cv.boxes:
        x0, x1 = max(0.0, c0 * fx), min(float(cols), c1 * fx)
        y0, y1 = max(0.0, r0 * fy), min(float(rows), r1 * fy)
        if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
            boxes.append(Finding(label, round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)))
    present = {b.label for b in boxes}
    labels = _disease_labels(rng, present, difficulty)
    return PhantomCase(density=density, findings=boxes, image_labels=labels, age_months=age,
                       sex=sex)


# --------------------------------------------------------------------------------------------
# DICOM encoding
# --------------------------------------------------------------------------------------------


def _resolve_ts(transfer_syntax: str) -> str:
    if transfer_syntax in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[transfer_syntax]
    if transfer_syntax in TRANSFER_SYNTAXES.values():
        return pydicom.uid.UID(transfer_syntax)
    raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}; one of "
                     f"{sorted(TRANSFER_SYNTAXES)} or their UIDs")


def codec_for(transfer_syntax: str) -> tuple[str, Codec]:
    """(name, Codec) for a transfer syntax given by name or UID."""
    uid = _resolve_ts(transfer_syntax)
    return next((name, codec) for name, codec in CODECS.items() if codec.uid == uid)


def can_encode(transfer_syntax: str) -> bool:
    """Whether this installation has the encoder the generator needs for `transfer_syntax`."""
    _, codec = codec_for(transfer_syntax)
    kind, _, what = codec.encoder.partition(":")
    if kind == "native":
        return True
    if kind == "pydicom":
        return get_encoder(codec.uid).is_available
    try:
        import imagecodecs
    except ImportError:
        return False
    module = {"jpeg8_encode": "JPEG8", "htj2k_encode": "HTJ2K"}[what]
    return bool(getattr(getattr(imagecodecs, module, None), "available", False))


def choose_encoding(rng: np.random.Generator, transfer_syntax: str | None = None,
                    photometric: str | None = None, bits_stored: int | None = None,
                    signed: bool | None = None, windowed: bool | None = None) -> PixelEncoding:
    """Draw how one image is stored; any argument given forces that choice.

    A drawn bit depth or sign the forced transfer syntax cannot carry is replaced by the nearest
    one it can (JPEG baseline: 8-bit unsigned); a forced one it cannot carry is an error. The
    random draws are the same whatever is forced, so the default mix is unaffected.
    """
    names = list(_TS_WEIGHTS)
    ts_draw = names[int(rng.choice(len(names), p=list(_TS_WEIGHTS.values())))]
    photo_draw = "MONOCHROME1" if rng.random() < 0.25 else "MONOCHROME2"
    bits_draw = int(rng.choice((8, 12, 16), p=(0.15, 0.45, 0.4)))
    signed_draw = bool(rng.random() < 0.15)
    rescale = [(1.0, 0.0), (1.0, -1024.0), (0.5, 0.0), (2.0, -100.0)][
        int(rng.choice(4, p=(0.7, 0.15, 0.1, 0.05)))]
    windowed_draw = bool(rng.random() < 0.8)
    photometric = photometric or photo_draw
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    bits = bits_stored or bits_draw
    if bits not in (8, 12, 16):
        raise ValueError(f"bits_stored must be 8, 12 or 16, not {bits}")
    name, codec = codec_for(transfer_syntax or ts_draw)
    if bits not in codec.bits:
        if bits_stored:
            raise ValueError(f"{name} cannot store {bits}-bit pixels (it takes {codec.bits})")
        bits = min(codec.bits, key=lambda b: (abs(b - bits), b))
    is_signed = signed_draw if signed is None else signed
    if is_signed and not codec.signed:
        if signed:
            raise ValueError(f"{name} cannot store signed pixels exactly")
        is_signed = False
    return PixelEncoding(
        transfer_syntax=codec.uid,
        photometric=photometric,
        bits_stored=bits,
        signed=is_signed,
        slope=rescale[0],
        intercept=rescale[1],
        windowed=windowed_draw if windowed is None else windowed,
    )


def encode_pixels(density: np.ndarray, enc: PixelEncoding, rng: np.random.Generator):
    """Quantise density to stored values; returns (array, window center, window width).

    Density 0..1 maps linearly onto a random sub-range [sv0, sv1] of the stored range (inverted
    for MONOCHROME1). The window spans exactly the modality values of sv0..sv1, so
    display = window(slope * SV + intercept) (then 1 - display for MONOCHROME1) == density.
    """
    bits = enc.bits_stored
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if enc.signed else (0, (1 << bits) - 1)
    span = hi - lo
    margin = 0.03 if bits == 8 else 0.15
    sv0 = lo + int(rng.uniform(0.0, margin) * span)
    sv1 = hi - int(rng.uniform(0.0, margin) * span)
    scaled = density * np.float32(sv1 - sv0)
    if enc.photometric == "MONOCHROME1":
        stored = np.float32(sv1) - scaled
    else:
        stored = scaled + np.float32(sv0)
    dtypes = {(8, False): np.uint8, (8, True): np.int8,
              (16, False): np.uint16, (16, True): np.int16}
    dtype = dtypes[(enc.bits_allocated, enc.signed)]
    arr = np.clip(np.rint(stored), lo, hi).astype(dtype)
    m0 = enc.slope * sv0 + enc.intercept
    m1 = enc.slope * sv1 + enc.intercept
    return arr, (m0 + m1) / 2.0 + 0.5, (m1 - m0) + 1.0


def _age_string(months: int) -> str:
    return f"{months:03d}M" if months < 24 else f"{months // 12:03d}Y"


def synthesize_instance(seed: int, rows: int = 1643, cols: int = 1349, *,
                        difficulty: str | Difficulty = "default",
                        findings: Sequence[str] | None = None,
                        transfer_syntax: str | None = None, photometric: str | None = None,
                        bits_stored: int | None = None, signed: bool | None = None,
                        windowed: bool | None = None) -> tuple[Dataset, PhantomCase]:
    """One phantom as a DICOM dataset (with file meta) plus its ground truth."""
    difficulty = resolve_difficulty(difficulty)
    img_ss, enc_ss, meta_ss = np.random.SeedSequence(seed).spawn(3)
    case = render_case(np.random.default_rng(img_ss), rows, cols, difficulty, findings)
    enc_rng = np.random.default_rng(enc_ss)
    enc = choose_encoding(enc_rng, transfer_syntax, photometric, bits_stored, signed, windowed)
    arr, center, width = encode_pixels(case.density, enc, enc_rng)

    rng = np.random.default_rng(meta_ss)
    key = ["vindr-pcxr-phantom", str(seed), f"{rows}x{cols}", repr(difficulty),
           repr(None if findings is None else list(findings)), repr(enc)]
    study_uid = generate_uid(entropy_srcs=key + ["study"])
    series_uid = generate_uid(entropy_srcs=key + ["series"])
    sop_uid = generate_uid(entropy_srcs=key + ["instance"])
    is_dx = bool(rng.random() < 0.6)
    sop_class = DX_SOP_CLASS if is_dx else CR_SOP_CLASS

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta

    day = np.datetime64("2020-01-01") + int(rng.integers(0, 731))
    date = str(day).replace("-", "")
    clock = "".join(f"{int(v):02d}" for v in (rng.integers(7, 19), *rng.integers(0, 60, 2)))
    spacing = round(float(rng.uniform(0.1, 0.2)), 3)
    years = case.age_months / 12.0
    number = int(rng.integers(0, 10000))

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = clock
    ds.AccessionNumber = ""
    ds.Modality = "DX" if is_dx else "CR"
    if is_dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "PCXR synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST PA (phantom)"
    ds.SeriesDescription = DISCLAIMER
    ds.PatientName = f"PHANTOM^{number:04d}"
    ds.PatientID = f"PHANTOM-{number:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = case.sex
    ds.PatientAge = _age_string(case.age_months)
    ds.PatientSize = f"{(50.0 + 25.0 * years ** 0.6) / 100.0:.2f}"
    ds.PatientWeight = f"{3.5 + 2.3 * years ** 0.9:.1f}"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom: no patient data"  # required when PatientIdentityRemoved is YES
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA" if rng.random() < 0.7 else "AP"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = DISCLAIMER
    ds.PixelSpacing = [spacing, spacing]
    if is_dx:
        ds.ImagerPixelSpacing = [spacing, spacing]
    ds.LossyImageCompression = "00"
    ds.set_pixel_data(arr, enc.photometric, enc.bits_stored, generate_instance_uid=False)
    ds.SmallestImagePixelValue = int(arr.min())
    ds.LargestImagePixelValue = int(arr.max())
    ds.RescaleIntercept = f"{enc.intercept:g}"
    ds.RescaleSlope = f"{enc.slope:g}"
    ds.RescaleType = "US"
    if enc.windowed:
        ds.WindowCenter = f"{center:.2f}"
        ds.WindowWidth = f"{width:.2f}"
        ds.VOILUTFunction = "LINEAR"
    encode_dataset(ds, enc.transfer_syntax)
    return ds, case


def encode_dataset(ds: Dataset, transfer_syntax: str) -> None:
    """Put the (uncompressed, little endian) pixel data of `ds` into `transfer_syntax`, in place.

    The one place that knows about transfer syntaxes (:data:`CODECS`). pydicom's own encoders
    (``ds.compress``) write RLE, JPEG-LS and JPEG 2000; imagecodecs writes the JPEG processes
    (libjpeg-turbo) and HTJ2K (OpenJPH), encapsulated here. The SOP Instance UID never changes
    (image_id = md5 of it). Lossy syntaxes set LossyImageCompression "01" with the ratio and
    method, and drop Smallest/LargestImagePixelValue, which the decoded values may overshoot.
    """
    name, codec = codec_for(transfer_syntax)
    uid = codec.uid
    bits, is_signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    if bits not in codec.bits or (is_signed and not codec.signed):
        raise ValueError(f"{name} cannot store {bits}-bit {'signed' if is_signed else 'unsigned'} "
                         f"pixels; use choose_encoding() to pick a compatible encoding")
    if uid in _UNCOMPRESSED:  # Deflated is written by pydicom's dcmwrite (dataset-level zlib)
        ds.file_meta.TransferSyntaxUID = uid
        return
    if uid == ExplicitVRBigEndian:
        if ds.BitsAllocated > 8:  # OW is byte-swapped in big endian; OB (8-bit) is not
            arr = ds.pixel_array
            ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = uid
        return
    if codec.encoder.startswith("pydicom:"):
        if uid == JPEGLSNearLossless:
            near = jpeg_ls_near(bits)
            arr = ds.pixel_array
            if is_signed:
                # JPEG-LS has no sign: keep the error from crossing the two's complement wrap
                # (pydicom refuses otherwise) by pulling the extremes in by NEAR.
                lo, hi = -(1 << (bits - 1)) + near, (1 << (bits - 1)) - 1 - near
                arr = np.clip(arr, lo, hi).astype(arr.dtype)
            ds.compress(uid, arr, jls_error=near, generate_instance_uid=False)
        elif uid == JPEG2000:
            ds.compress(uid, j2k_cr=[J2K_COMPRESSION_RATIO], generate_instance_uid=False)
        else:
            ds.compress(uid, generate_instance_uid=False)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    else:
        frame = _imagecodecs_frame(uid, ds.pixel_array, bits, is_signed)
        ds.PixelData = encapsulate([frame])
        element = ds["PixelData"]
        element.VR = "OB"  # PS3.5 A.4: encapsulated pixel data is OB, undefined length
        element.is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = uid
    if codec.lossy:
        raw = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{raw / len(frame):.2f}"
        ds.LossyImageCompressionMethod = codec.method
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
    else:
        ds.LossyImageCompression = "00"


def _imagecodecs_frame(uid: str, arr: np.ndarray, bits: int, is_signed: bool) -> bytes:
    """One codestream for the syntaxes pydicom cannot write itself (JPEG processes, HTJ2K)."""
    try:
        import imagecodecs
    except ImportError:
        raise RuntimeError(f"writing {pydicom.uid.UID(uid).name} needs imagecodecs "
                           "(pip install imagecodecs)") from None
    if uid in (JPEGLossless, JPEGLosslessSV1):
        if is_signed:  # JPEG has no sign: store the BitsStored-bit two's complement pattern
            unsigned = np.uint8 if arr.dtype.itemsize == 1 else np.uint16
            arr = arr.view(unsigned) & unsigned((1 << bits) - 1)
        predictor = 1 if uid == JPEGLosslessSV1 else 6
        return bytes(imagecodecs.jpeg8_encode(arr, lossless=True, predictor=predictor,
                                              bitspersample=bits))
    if uid in (JPEGBaseline8Bit, JPEGExtended12Bit):  # unsigned only (see CODECS)
        return bytes(imagecodecs.jpeg8_encode(arr, level=JPEG_QUALITY, bitspersample=bits))
    if uid in (HTJ2KLossless, HTJ2KLosslessRPCL):
        # OpenJPH's progression order is RPCL; for the RPCL syntax add TLM markers and one
        # tile-part per resolution, so a viewer can fetch a low resolution first.
        rpcl = uid == HTJ2KLosslessRPCL
        tileparts = imagecodecs.HTJ2K.TILEPART.RESOLUTIONS if rpcl else None
        return bytes(imagecodecs.htj2k_encode(arr, reversible=True, tlm=rpcl or None,
                                              tilepart=tileparts))
    if uid == HTJ2K:
        container = 8 * arr.dtype.itemsize  # the codestream's precision; the step is relative to it
        qstep = HTJ2K_QSTEP / (1 << (container - bits))
        return bytes(imagecodecs.htj2k_encode(arr, level=qstep, reversible=False))
    raise ValueError(f"no imagecodecs encoder for {uid}")


def dicom_bytes(ds: Dataset) -> bytes:
    """Part 10 bytes (128-byte preamble, DICM, file meta) of `ds`."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def image_id_for(sop_instance_uid: str) -> str:
    """The VinDr image_id: md5 hex digest of the SOP Instance UID."""
    return hashlib.md5(str(sop_instance_uid).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------


def _image_seed(seed: int, split: str, index: int) -> int:
    ss = np.random.SeedSequence([seed, 0 if split == "train" else 1, index])
    return int(ss.generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def _random_size(image_seed: int) -> tuple[int, int]:
    rng = np.random.default_rng([image_seed, 7])
    rows = int(np.clip(round(rng.normal(1643, 110)), 1400, 1900))
    cols = int(np.clip(round(rows * rng.uniform(0.76, 0.88)), 1150, 1600))
    return rows, cols


def _make_image(job: tuple) -> tuple:
    out, split, index, image_seed, difficulty, size, transfer_syntax = job
    rows, cols = size if size is not None else _random_size(image_seed)
    ds, case = synthesize_instance(image_seed, rows, cols, difficulty=difficulty,
                                   transfer_syntax=transfer_syntax)
    image_id = image_id_for(ds.SOPInstanceUID)
    (Path(out) / split / f"{image_id}.dicom").write_bytes(dicom_bytes(ds))
    rad_id = f"R{int(np.random.default_rng([image_seed, 11]).integers(1, 4))}"
    return split, image_id, rad_id, case.findings, case.image_labels


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def generate_dataset(out: Path, n_train: int, n_test: int, seed: int, *,
                     difficulty: str = "default", size: tuple[int, int] | None = None,
                     transfer_syntax: str | None = None, workers: int = 1) -> None:
    """Write a VinDr-PCXR-layout phantom dataset under `out` (see the module docstring)."""
    out = Path(out)
    resolve_difficulty(difficulty)
    if transfer_syntax is not None:
        _resolve_ts(transfer_syntax)
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), split, i, _image_seed(seed, split, i), difficulty, size, transfer_syntax)
            for split, n in (("train", n_train), ("test", n_test)) for i in range(n)]
    start = time.perf_counter()
    results: list[tuple] = []
    with tqdm(total=len(jobs), desc="phantoms", unit="img", disable=None) as bar:
        if workers > 1:
            with multiprocessing.Pool(workers) as pool:
                for res in pool.imap(_make_image, jobs, chunksize=2):
                    results.append(res)
                    bar.update()
        else:
            for job in jobs:
                results.append(_make_image(job))
                bar.update()

    per_label: Counter[str] = Counter()
    for split in ("train", "test"):
        with open(out / f"annotations_{split}.csv", "w", newline="") as fa, \
                open(out / f"image_labels_{split}.csv", "w", newline="") as fl:
            ann, lab = csv.writer(fa), csv.writer(fl)
            ann.writerow(ANNOTATION_HEADER)
            lab.writerow(IMAGE_LABEL_HEADER)
            for res_split, image_id, rad_id, findings, labels in results:
                if res_split != split:
                    continue
                for f in findings:
                    ann.writerow([image_id, rad_id, f.label, _fmt(f.x_min), _fmt(f.y_min),
                                  _fmt(f.x_max), _fmt(f.y_max), VINDR_PCXR.by_name(f.label).id])
                if not findings:
                    ann.writerow([image_id, rad_id, NO_FINDING, "", "", "", "",
                                  VINDR_PCXR.by_name(NO_FINDING).id])
                lab.writerow([image_id, rad_id] + [labels[name] for name in IMAGE_LABEL_HEADER[2:]])
                per_label.update({f.label for f in findings})
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{name}={per_label[name]}" for name in SYNTHETIC_LOCAL)
    rate = len(results) / max(elapsed, 1e-9)
    print(f"synthetic: wrote {len(results)} images (train {n_train}, test {n_test}) to {out} in "
          f"{elapsed:.1f} s ({rate:.1f} img/s); images per finding: {counts}")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like ROWSxCOLS, not {text!r}") from None
    if rows < 64 or cols < 64:
        raise argparse.ArgumentTypeError("size must be at least 64x64")
    return rows, cols


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a synthetic VinDr-PCXR-layout phantom dataset "
                                            f"({DISCLAIMER}).")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="default")
    p.add_argument("--size", type=_parse_size, default=None,
                   help="force ROWSxCOLS (default: drawn around the paper's median 1643x1349)")
    p.add_argument("--transfer-syntax", default=None,
                   help=f"force one of {sorted(TRANSFER_SYNTAXES)} (or its UID); default: a mix of "
                        "explicit, implicit and rle")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    generate_dataset(args.out, args.n_train, args.n_test, args.seed, difficulty=args.difficulty,
                     size=args.size, transfer_syntax=args.transfer_syntax, workers=args.workers)


if __name__ == "__main__":
    main(sys.argv[1:])
