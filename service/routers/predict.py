"""POST /v1/predict: one DICOM in, findings and disease probabilities out."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.decode import DecodeLimits
from service.dependencies import ReadyStateDep, SettingsDep
from service.pipeline import prepare
from service.postprocess import diseases_json, findings_json, select_detections, to_original_space
from service.schemas import ErrorResponse, Prediction
from service.upload import check_declared_length, read_single_dicom

router = APIRouter(prefix="/v1")

ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "not DICOM, or malformed", 413: "body too large", 415: "unsupported media type or transfer syntax",
    422: "valid DICOM but not a usable radiograph", 429: "inference queue full (Retry-After)",
    503: "model not ready (Retry-After)"}.items()}

DICOM_BODY = {"requestBody": {"content": {
    "application/dicom": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                                       "required": ["file"]}},
}, "required": True}}


@router.post("/predict", response_model=Prediction, responses=ERRORS, openapi_extra=DICOM_BODY,
             summary="Findings (boxes in the image's pixel space) and disease probabilities for one DICOM")
async def predict(request: Request, state: ReadyStateDep, settings: SettingsDep) -> Prediction:
    started = time.perf_counter()
    check_declared_length(request.headers.get("content-length"), settings.max_body_bytes)
    body = await read_single_dicom(request.stream(), request.headers.get("content-type"), settings.max_body_bytes)
    pack = state.pack
    limits = DecodeLimits(max_pixels=settings.max_pixels)
    prepared = await run_in_threadpool(prepare, body, pack.input_spec, limits, settings.image_id_hash)
    del body  # the upload is not kept any longer than decoding needs it
    result = await state.batcher.submit(prepared.input)
    postprocess_started = time.perf_counter()
    boxes, scores, probabilities = result.outputs
    detections = to_original_space(select_detections(boxes, scores, pack.detection_params), prepared.geometry)
    timing = prepared.timing_ms | {
        "queue": result.queue_ms,
        "inference": result.inference_ms,
        "postprocess": (time.perf_counter() - postprocess_started) * 1e3,
    }
    timing["total"] = (time.perf_counter() - started) * 1e3
    return Prediction(
        request_id=request.state.request_id,
        instance=prepared.instance,
        findings=findings_json(detections, pack.local_labels),
        diseases=diseases_json(probabilities, pack.global_labels, pack.thresholds),
        warnings=[],
        model={"pack": pack.name, "version": pack.version,
               "detector_sha256": pack.manifest["detector"]["sha256"], "classifier_sha256": pack.manifest["classifier"]["sha256"]},
        timing_ms={name: round(value, 2) for name, value in timing.items()},
    )
