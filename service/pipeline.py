"""DICOM bytes -> model input: the CPU half of a prediction, shared with training's evaluation."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from service.decode import DecodeLimits, check_image_header, decode_pixels, read_dataset
from service.preprocess import Letterbox, Normalization, PixelParams, model_input


@dataclass(frozen=True)
class InputSpec:
    """What a model pack expects: square input size and intensity normalisation."""

    size: int
    normalization: Normalization


@dataclass
class PreparedImage:
    input: np.ndarray  # 1 x size x size float32
    geometry: Letterbox
    instance: dict
    timing_ms: dict[str, float] = field(default_factory=dict)


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


def prepare(body: bytes, spec: InputSpec, limits: DecodeLimits = DecodeLimits(), id_algorithm: str = "md5") -> PreparedImage:
    """Parse, check, decode and preprocess one DICOM instance."""
    started = time.perf_counter()
    ds = read_dataset(body)
    check_image_header(ds, limits)
    pixels = decode_pixels(ds)
    decoded = time.perf_counter()
    tensor, geometry = model_input(pixels, PixelParams.from_dataset(ds), spec.size, spec.normalization)
    done = time.perf_counter()
    return PreparedImage(
        input=tensor,
        geometry=geometry,
        instance=instance_summary(ds, pixels.shape[0], pixels.shape[1], id_algorithm),
        timing_ms={"decode": (decoded - started) * 1e3, "preprocess": (done - decoded) * 1e3},
    )
