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
from service.inference.heatmaps import HeatmapGrid, heatmaps_json
from service.inference.modelpack import ModelPack
from service.inference.postprocess import diseases_json, findings_json, select_detections, to_original_space
from service.inference.state import ServingState
from service.settings import Settings
from service.viewer_outputs.codes import json_code

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
    body: bytes,
    state: ServingState,
    settings: Settings,
    request_id: str,
    keep_display: bool = False,
    include_heatmaps: bool = False,
) -> tuple[dict, PreparedImage]:
    """The JSON answer (api/schemas.Prediction) for one DICOM body, and the prepared image it came from.

    `include_heatmaps` adds each disease's `heatmap` (the pack must have them: `pack.has_heatmaps`)."""
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
        include_heatmaps,
    )
    prediction["timing_ms"]["total"] = round((time.perf_counter() - started) * 1e3, 2)
    if state.metrics is not None:
        state.metrics.observe_prediction(prediction["timing_ms"], result.batch_size)
    return prediction, prepared


def prediction_body(
    prepared: PreparedImage,
    outputs: tuple[np.ndarray, ...],
    pack: ModelPack,
    settings: Settings,
    request_id: str,
    warnings: list[str],
    timing_ms: dict[str, float],
    include_heatmaps: bool = False,
) -> dict:
    """The JSON answer for one prepared image and its model outputs (boxes, scores, probabilities[, heatmaps]).

    One function for the service and for anything that must answer exactly as it does (the benchmark peers).
    """
    postprocess_started = time.perf_counter()
    boxes, scores, probabilities = outputs[:3]
    # Reporting thresholds applied before NMS: the same findings as NMS-then-threshold, far less work.
    detections = select_detections(
        boxes, scores, pack.detection_params, pack.finding_thresholds(settings.finding_score_floor)
    )
    detections = to_original_space(detections, prepared.geometries[pack.input_index("detector")])
    findings = findings_json(detections, pack.local_labels)
    # Calibrated here, once, so JSON, SR, GSPS, PNG and triage all report the same calibrated probability.
    probabilities = pack.calibrated_probabilities(probabilities)
    diseases = diseases_json(probabilities, pack.global_labels, pack.thresholds)
    for item in (*findings, *diseases):
        item["code"] = json_code(item["label"])  # the concept the SR codes it with (one table: viewer_outputs/codes)
    if include_heatmaps:
        add_heatmaps(diseases, outputs[3], prepared, pack)
    timing = prepared.timing_ms | timing_ms | {"postprocess": (time.perf_counter() - postprocess_started) * 1e3}
    return {
        "request_id": request_id,
        "instance": prepared.instance,
        "findings": findings,
        "diseases": diseases,
        "triage": pack.triage.json(probabilities) if pack.triage is not None else None,
        "warnings": warnings,
        "model": {
            "pack": pack.name,
            "version": pack.version,
            "detector_sha256": pack.manifest["detector"]["sha256"],
            "classifier_sha256": pack.manifest["classifier"]["sha256"],
        },
        "timing_ms": {name: round(value, 2) for name, value in timing.items()},
    }


def add_heatmaps(diseases: list[dict], maps: np.ndarray, prepared: PreparedImage, pack: ModelPack) -> None:
    """Give each disease its `heatmap` from the classifier's (K, h, w) maps of this image."""
    # The maps lie on the classifier's input, whose letterbox may differ from the detector's.
    grid = HeatmapGrid.from_manifest(pack.heatmaps, pack.model_inputs.classifier.size, maps.shape[-1])
    geometry = prepared.geometries[pack.input_index("classifier")]
    for disease, heatmap in zip(diseases, heatmaps_json(maps, geometry, grid)):
        disease["heatmap"] = heatmap
