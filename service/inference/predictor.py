"""One instance through the whole service: decode pool -> intended-use gate -> batcher -> postprocess."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import numpy as np

from service.dicom.intended_use import out_of_distribution_reasons
from service.dicom.pipeline import PreparedImage
from service.errors import OutOfDistribution, RequestTimeout
from service.inference.modelpack import ModelPack
from service.inference.postprocess import diseases_json, findings_json, select_detections, to_original_space
from service.inference.state import ServingState
from service.settings import Settings

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def request_time_limit(seconds: float) -> AsyncIterator[None]:
    """Bound a whole request; on expiry the work is cancelled and the client gets 503 request_timeout.

    Also stops slow uploads (a client trickling bytes) from holding a connection forever.
    """
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    except TimeoutError:
        if not deadline.expired():
            raise  # some other timeout inside: not ours to relabel
        raise RequestTimeout(
            f"The request took longer than {seconds:g} s and was stopped.", headers={"Retry-After": "1"}
        ) from None


async def predict_instance(
    body: bytes, state: ServingState, settings: Settings, request_id: str, keep_display: bool = False
) -> tuple[dict, PreparedImage]:
    """The JSON answer (api/schemas.Prediction) for one DICOM body, and the prepared image it came from."""
    started = time.perf_counter()
    pack = state.pack
    prepared = await state.decoder.prepare(
        body, pack.input_specs, settings.decode_limits, settings.image_id_hash, keep_display
    )
    # Only the hashed SOP Instance UID (the VinDr image_id) identifies the image in the log.
    log.info(
        "request_id=%s image_id=%s %dx%d",
        request_id,
        prepared.instance["image_id"],
        prepared.instance["rows"],
        prepared.instance["columns"],
    )
    warnings = out_of_distribution_reasons(prepared.header, pack.intended_population)
    if warnings and settings.strict_intended_use:
        raise OutOfDistribution("The image is outside the model's intended use: " + " ".join(warnings))
    result = await state.batcher.submit(prepared.inputs)
    prediction = prediction_body(
        prepared,
        result.outputs,
        pack,
        settings,
        request_id,
        warnings,
        {"queue": result.queue_ms, "inference": result.inference_ms},
    )
    prediction["timing_ms"]["total"] = round((time.perf_counter() - started) * 1e3, 2)
    if state.metrics is not None:
        state.metrics.observe_prediction(prediction["timing_ms"], result.batch_size)
    return prediction, prepared


def prediction_body(
    prepared: PreparedImage,
    outputs: tuple[np.ndarray, np.ndarray, np.ndarray],
    pack: ModelPack,
    settings: Settings,
    request_id: str,
    warnings: list[str],
    timing_ms: dict[str, float],
) -> dict:
    """The JSON answer for one prepared image and its model outputs (boxes, scores, probabilities).

    One function for the service and for anything that must answer exactly as it does (the benchmark peers).
    """
    postprocess_started = time.perf_counter()
    boxes, scores, probabilities = outputs
    # Reporting thresholds applied before NMS: the same findings as NMS-then-threshold, far less work.
    detections = select_detections(
        boxes, scores, pack.detection_params, pack.finding_thresholds(settings.finding_score_floor)
    )
    detections = to_original_space(detections, prepared.geometries[pack.input_index("detector")])
    timing = prepared.timing_ms | timing_ms | {"postprocess": (time.perf_counter() - postprocess_started) * 1e3}
    return {
        "request_id": request_id,
        "instance": prepared.instance,
        "findings": findings_json(detections, pack.local_labels),
        "diseases": diseases_json(probabilities, pack.global_labels, pack.thresholds),
        "warnings": warnings,
        "model": {
            "pack": pack.name,
            "version": pack.version,
            "detector_sha256": pack.manifest["detector"]["sha256"],
            "classifier_sha256": pack.manifest["classifier"]["sha256"],
        },
        "timing_ms": {name: round(value, 2) for name, value in timing.items()},
    }
