"""POST /v1/predict: one DICOM in; JSON, DICOM SR, DICOM GSPS, DICOM Segmentation (heatmaps) or PNG out."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.dependencies import ReadyStateDep, SettingsDep
from service.api.schemas import ErrorResponse, Prediction, prediction_json
from service.api.upload import check_declared_length, read_single_dicom
from service.dicom.decode import check_referenceable
from service.errors import HeatmapsUnavailable, InvalidRequest, NotAcceptable
from service.inference.modelpack import ModelPack
from service.inference.predictor import predict_instance, request_time_limit
from service.viewer_outputs.render import DICOM_OUTPUTS, NEEDS_DISPLAY, NEEDS_HEATMAPS, render

router = APIRouter(prefix="/v1")

OutputFormat = Literal["json", "sr", "gsps", "sc", "seg", "png"]
Include = Literal["heatmaps"]
Overlay = Literal["heatmaps"]

ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "not DICOM, or malformed",
        406: "the Accept header asks for a representation not offered",
        413: "body too large",
        415: "unsupported media type or transfer syntax",
        422: "valid DICOM but not a usable radiograph, outside the intended use (strict mode), or too slow to decode; "
        "parameters that do not go together (overlay without format=png), or heatmaps asked of a pack without them",
        429: "queue full (Retry-After)",
        503: "model not ready, or the request outlasted CXR_REQUEST_TIMEOUT_S (Retry-After)",
    }.items()
}

DICOM_BODY = {
    "requestBody": {
        "content": {
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
        "required": True,
    }
}

OUTPUTS = {
    200: {
        "content": {
            "application/json": {},
            "application/dicom": {
                "schema": {"type": "string", "format": "binary"},
                "description": (
                    "format=sr: Comprehensive SR (TID 1500); format=gsps: Grayscale Softcopy Presentation State; "
                    "format=sc: Secondary Capture with the boxes burned in; "
                    "format=seg: Segmentation (FRACTIONAL, PROBABILITY) with one segment per disease heatmap"
                ),
            },
            "image/png": {
                "schema": {"type": "string", "format": "binary"},
                "description": "the image with boxes and labels drawn; with overlay=heatmaps, a mosaic of that "
                "image and one panel per disease with its heatmap in colour",
            },
        }
    }
}


def negotiate_format(requested: str | None, accept: str | None) -> OutputFormat:
    """The `format` query wins; otherwise the Accept header; JSON when either is absent or generic."""
    if requested:
        return requested  # type: ignore[return-value]  # validated by the Query enum
    offered = {
        "application/json": "json",
        "application/dicom": "sr",
        "image/png": "png",
        "*/*": "json",
        "application/*": "json",
        "image/*": "png",
    }
    ranges = [part.split(";")[0].strip().lower() for part in (accept or "").split(",") if part.strip()]
    if not ranges:
        return "json"
    for media_range in ranges:
        if media_range in offered:
            return offered[media_range]  # type: ignore[return-value]
    raise NotAcceptable(
        f"Cannot produce {accept!r}; ask for application/json, application/dicom (format=sr, gsps or sc) or image/png."
    )


@router.post(
    "/predict",
    response_model=Prediction,
    responses=ERRORS | OUTPUTS,
    openapi_extra=DICOM_BODY,
    summary="Findings (boxes in the image's pixel space) and disease probabilities for one DICOM",
)
async def predict(
    request: Request,
    state: ReadyStateDep,
    settings: SettingsDep,
    format: OutputFormat | None = Query(
        None,
        description="json (default), sr, gsps, sc, seg (the heatmaps as a DICOM Segmentation) or png; wins over Accept",
    ),
    include: list[Include] = Query(
        [],
        description="heatmaps: each disease in the JSON gets `heatmap` (an 8-bit PNG of its class activation map and "
        "the original-pixel rectangle it covers)",
    ),
    overlay: Overlay | None = Query(None, description="with format=png: heatmaps draws each disease's heatmap"),
):
    output = negotiate_format(format, request.headers.get("accept"))
    heatmaps = wants_heatmaps(output, include, overlay, state.pack)
    check_declared_length(request.headers.get("content-length"), settings.max_body_bytes)
    async with request_time_limit(settings.request_timeout_s):
        body = await read_single_dicom(request.stream(), request.headers.get("content-type"), settings.max_body_bytes)
        prediction, prepared = await predict_instance(
            body,
            state,
            settings,
            request.state.request_id,
            keep_display=output in NEEDS_DISPLAY,
            include_heatmaps=heatmaps,
        )
    del body  # nothing uploaded is kept
    if output == "json":
        return JSONResponse(prediction_json(prediction))
    if output in DICOM_OUTPUTS:
        check_referenceable(prepared.header)
    content, media_type = await run_in_threadpool(render, output, prepared, prediction, overlay)
    return Response(content, media_type=media_type, headers={"X-Request-ID": request.state.request_id})


def wants_heatmaps(output: OutputFormat, include: list[str], overlay: str | None, pack: ModelPack) -> bool:
    """Whether the prediction needs the diseases' heatmaps; checked before the upload is read."""
    if overlay is not None and output != "png":
        raise InvalidRequest(f"overlay={overlay} draws on the PNG; ask for format=png (this request gets {output})")
    heatmaps = "heatmaps" in include or overlay == "heatmaps" or output in NEEDS_HEATMAPS
    if heatmaps and not pack.has_heatmaps:
        raise HeatmapsUnavailable(
            f"The classifier of pack {pack.name} {pack.version} has no heatmaps output, so there are no heatmaps "
            "to return (GET /v1/models shows `heatmaps`)."
        )
    return heatmaps
