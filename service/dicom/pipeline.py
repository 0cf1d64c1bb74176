"""DICOM bytes -> model inputs: the CPU half of a prediction, shared with training and its evaluation.

A pack's detector and classifier may take different input sizes (say 1024 and 512): `prepare` decodes and
windows the image once, letterboxes it once per distinct size and normalises it once per input spec, so
each model gets exactly the tensor it was trained on.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from service.dicom.decode import check_image_header, decode_pixels, read_dataset
from service.dicom.preprocess import (
    Letterbox,
    Normalization,
    PixelParams,
    apply_modality_lut,
    display_image,
    letterbox,
    modality_range,
)
from service.errors import UnusableImage
from service.settings import DecodeLimits


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: square input size and intensity normalisation."""

    size: int
    normalization: Normalization


@dataclass(frozen=True)
class ModelInputs:
    """The input specs of a pack's two models. Equal specs are one input: prepared and shipped once per image."""

    detector: InputSpec
    classifier: InputSpec

    @property
    def specs(self) -> tuple[InputSpec, ...]:
        """The distinct specs, the detector's first: what `prepare` is asked for, in this order."""
        return tuple(dict.fromkeys((self.detector, self.classifier)))

    def spec(self, model: str) -> InputSpec:
        """The spec of "detector" or "classifier"."""
        if model not in ("detector", "classifier"):
            raise ValueError(f"no model {model!r}; expected 'detector' or 'classifier'")
        return getattr(self, model)

    def index(self, model: str) -> int:
        """Which of `specs` (and of a PreparedImage's inputs) the model reads."""
        return self.specs.index(self.spec(model))


@dataclass
class PreparedImage:
    inputs: tuple[np.ndarray, ...]  # one 1 x size x size float32 tensor per input spec asked for, in that order
    geometries: tuple[Letterbox, ...]  # the letterbox of each of those inputs (boxes travel back through it)
    instance: dict
    header: Dataset  # the source dataset without its pixel data (for the gate, SR and GSPS references)
    timing_ms: dict[str, float] = field(default_factory=dict)
    display: np.ndarray | None = None  # [0, 1] image at original size, kept only when asked (PNG output)
    # The modality values scaled to [0, 1] when the image has no VOI LUT or window of its own (the GSPS shows it so).
    display_range: tuple[float, float] | None = None

    @property
    def input(self) -> np.ndarray:
        """The first input (for a single spec, the only one)."""
        return self.inputs[0]

    @property
    def geometry(self) -> Letterbox:
        """The first input's letterbox (packs list the detector's input first)."""
        return self.geometries[0]


def as_specs(specs: InputSpec | Sequence[InputSpec]) -> tuple[InputSpec, ...]:
    return (specs,) if isinstance(specs, InputSpec) else tuple(specs)


def model_inputs(
    display: np.ndarray, specs: Sequence[InputSpec]
) -> tuple[tuple[np.ndarray, ...], tuple[Letterbox, ...]]:
    """Display image -> one normalised 1 x S x S tensor per spec: one letterbox per distinct size, shared."""
    canvases: dict[int, tuple[np.ndarray, Letterbox]] = {}
    inputs, geometries = [], []
    for spec in specs:
        if spec.size not in canvases:
            canvases[spec.size] = letterbox(display, spec.size)
        canvas, geometry = canvases[spec.size]
        inputs.append(spec.normalization.apply(canvas)[np.newaxis])
        geometries.append(geometry)
    return tuple(inputs), tuple(geometries)


def image_id(sop_instance_uid: str, algorithm: str = "md5") -> str:
    """The VinDr image id: a hashlib hex digest of the SOP Instance UID."""
    return hashlib.new(algorithm, sop_instance_uid.encode()).hexdigest()


def instance_summary(ds, rows: int, columns: int, id_algorithm: str) -> dict:
    sop = str(ds.get("SOPInstanceUID", "") or "")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        spacing_mm = [float(v) for v in spacing][:2] if spacing else None
    except (TypeError, ValueError):
        spacing_mm = None
    return {
        "sop_instance_uid": sop or None,
        "image_id": image_id(sop, id_algorithm) if sop else None,
        "study_instance_uid": str(ds.get("StudyInstanceUID", "") or "") or None,
        "rows": rows,
        "columns": columns,
        "pixel_spacing_mm": spacing_mm,
    }


def prepare(
    body: bytes,
    specs: InputSpec | Sequence[InputSpec],
    limits: DecodeLimits = DecodeLimits(),
    id_algorithm: str = "md5",
    keep_display: bool = False,
) -> PreparedImage:
    """Parse, check, decode and preprocess one DICOM instance into the input of each spec."""
    started = time.perf_counter()
    ds = read_dataset(body, limits)
    check_image_header(ds, limits)
    pixels = decode_pixels(ds)
    del ds.PixelData  # decoded; the header alone travels on
    decoded = time.perf_counter()
    params = PixelParams.from_dataset(ds)
    with np.errstate(over="ignore", invalid="ignore"):
        # The modality LUT is linear, so the stored extremes bound the physical values. Finite but
        # extreme rescale values overflow float32 (RescaleSlope 1e38 on 16-bit data) into inf, which
        # the window then clips into a binary image, or into NaN without a window.
        extremes = apply_modality_lut(
            np.array([pixels.min(), pixels.max()]), params.rescale_slope, params.rescale_intercept
        )
    if not np.isfinite(extremes).all():
        raise UnusableImage("RescaleSlope and RescaleIntercept take the pixel values out of the representable range.")
    display_range = None
    if params.voi_lut is None and params.window_center is None:
        display_range = modality_range(pixels, params, extremes)
    with np.errstate(over="ignore", invalid="ignore"):
        display = display_image(pixels, params)
    if not np.isfinite(display).all():
        # The same for window values beyond float32 (WindowCenter and WindowWidth 1e39): NaN pixels.
        raise UnusableImage("The VOI window values turn the pixels into non-finite numbers.")
    inputs, geometries = model_inputs(display, as_specs(specs))
    done = time.perf_counter()
    return PreparedImage(
        inputs=inputs,
        geometries=geometries,
        instance=instance_summary(ds, pixels.shape[0], pixels.shape[1], id_algorithm),
        header=ds,
        timing_ms={"decode": (decoded - started) * 1e3, "preprocess": (done - decoded) * 1e3},
        display=display if keep_display else None,
        display_range=display_range,
    )
