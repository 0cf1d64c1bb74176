"""What every peer shares with the service: settings, the model pack and its sessions, and the JSON answer.

The peers must differ from the service only in how requests reach the model (per request, or a
framework's batching), never in decode, preprocessing, models or postprocessing, so all of that is
imported from `service` here, in one place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.api.schemas import Prediction
from service.dicom.intended_use import out_of_distribution_reasons
from service.dicom.pipeline import PreparedImage, prepare
from service.inference.modelpack import ModelPack, OnnxModels
from service.inference.predictor import prediction_body
from service.inference.state import load_serving_state
from service.settings import Settings

ModelOutputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # one image's boxes, scores, probabilities


def load_models(settings: Settings) -> tuple[ModelPack, OnnxModels]:
    """The verified pack and its warmed-up sessions, loaded by the service's own loader.

    Through service.inference.state.load_serving_state rather than a copy of it, so whatever the service does to
    its sessions (providers, threads, precision, warm-up of every batch shape) the peers do as well.
    """
    state = load_serving_state(settings)
    if state.decoder is not None:
        state.decoder.close()  # the loader also makes the service's decode pool; the caller decodes its own way
    if not state.ready or state.pack is None or state.models is None:
        raise RuntimeError(f"the model pack did not load: {state.not_ready_reason}")
    return state.pack, state.models


def prepare_body(body: bytes, pack: ModelPack, settings: Settings) -> PreparedImage:
    """`service.dicom.pipeline.prepare` with the service's arguments: parse, check, decode, preprocess."""
    return prepare(body, pack.input_specs, settings.decode_limits, settings.image_id_hash)


def prediction_json(
    prepared: PreparedImage,
    outputs: ModelOutputs,
    pack: ModelPack,
    settings: Settings,
    request_id: str,
    timing_ms: dict[str, float],
) -> dict:
    """The service's JSON answer for one image, built by the service's own function."""
    warnings = out_of_distribution_reasons(prepared.header, pack.intended_population)
    return prediction_body(prepared, outputs, pack, settings, request_id, warnings, timing_ms)


def response_body(prediction: dict) -> dict:
    """Validated and serialised as the service's route does (Prediction.model_dump)."""
    return Prediction.model_validate(prediction).model_dump(mode="json")


def settings_for(models: Path | None) -> Settings:
    """The service's Settings (CXR_* environment included), with the pack folder when given."""
    return Settings(**({"models": models} if models else {}))
