"""What every peer shares with the service: settings, the model pack and its sessions, and the JSON answer.

The peers must differ from the service only in how requests reach the model (per request, or a
framework's batching), never in decode, preprocessing, models or postprocessing, so all of that is
imported from `service` here, in one place.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from service.decode import DecodeLimits
from service.intended_use import out_of_distribution_reasons
from service.modelpack import ModelPack, OnnxModels
from service.pipeline import PreparedImage, prepare
from service.postprocess import at_operating_points, diseases_json, findings_json, select_detections, to_original_space
from service.schemas import Prediction
from service.settings import Settings
from service.state import load_serving_state

ModelOutputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # one image's boxes, scores, probabilities


def load_models(settings: Settings) -> tuple[ModelPack, OnnxModels]:
    """The verified pack and its warmed-up sessions, loaded by the service's own loader.

    Through service.state.load_serving_state rather than a copy of it, so whatever the service does to
    its sessions (providers, threads, precision, warm-up of every batch shape) the peers do as well.
    """
    state = load_serving_state(settings)
    if state.decoder is not None:
        state.decoder.close()  # the loader also makes the service's decode pool; the caller decodes its own way
    if not state.ready or state.pack is None or state.models is None:
        raise RuntimeError(f"the model pack did not load: {state.not_ready_reason}")
    return state.pack, state.models


def decode_limits(settings: Settings) -> DecodeLimits:
    """The limits the service's decode pool passes to `prepare` (service.predictor)."""
    return DecodeLimits(settings.max_pixels, max_pixel_bytes=settings.max_pixel_bytes)


def prepare_body(body: bytes, pack: ModelPack, settings: Settings) -> PreparedImage:
    """`service.pipeline.prepare` with the service's arguments: parse, check, decode, preprocess."""
    return prepare(body, pack.input_spec, decode_limits(settings), settings.image_id_hash)


def prediction_json(prepared: PreparedImage, outputs: ModelOutputs, pack: ModelPack, settings: Settings,
                    request_id: str, timing_ms: dict[str, float]) -> dict:
    """The service's JSON answer for one image (the steps of service.predictor.predict_instance).

    Kept step for step with predict_instance: the service builds this dict inline there, so there is
    no single function to import; tests/test_benchmarks.py checks the result validates as `Prediction`.
    """
    postprocess_started = time.perf_counter()
    boxes, scores, probabilities = outputs
    detections = at_operating_points(select_detections(boxes, scores, pack.detection_params),
                                     pack.finding_thresholds(settings.finding_score_floor))
    detections = to_original_space(detections, prepared.geometry)
    timing = prepared.timing_ms | timing_ms | {"postprocess": (time.perf_counter() - postprocess_started) * 1e3}
    return {
        "request_id": request_id,
        "instance": prepared.instance,
        "findings": findings_json(detections, pack.local_labels),
        "diseases": diseases_json(probabilities, pack.global_labels, pack.thresholds),
        "warnings": out_of_distribution_reasons(prepared.header, pack.intended_population),
        "model": {"pack": pack.name, "version": pack.version, "detector_sha256": pack.manifest["detector"]["sha256"],
                  "classifier_sha256": pack.manifest["classifier"]["sha256"]},
        "timing_ms": {name: round(value, 2) for name, value in timing.items()},
    }


def response_body(prediction: dict) -> dict:
    """Validated and serialised as the service's route does (Prediction.model_dump)."""
    return Prediction.model_validate(prediction).model_dump(mode="json")


def settings_for(models: Path | None) -> Settings:
    """The service's Settings (CXR_* environment included), with the pack folder when given."""
    return Settings(**({"models": models} if models else {}))
