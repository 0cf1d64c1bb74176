"""POST /v1/studies: DICOMweb STOW-RS style, several instances in one multipart/related body.

Each instance is predicted independently and concurrently (they share inference batches); one bad
instance never fails the others. Status follows STOW-RS: 200 all succeeded, 202 some failed,
409 none succeeded. The default answer is the DICOMweb store response (`application/dicom+json`,
ReferencedSOPSequence / FailedSOPSequence) that DICOMweb clients parse; `Accept: application/json`
gets the predictions themselves.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset

from service.api.dependencies import ReadyStateDep, SettingsDep
from service.api.routers.predict import ERRORS
from service.api.schemas import StudiesResponse
from service.api.upload import DICOM_MEDIA_TYPES, Part, check_declared_length, media_type, read_multipart
from service.dicom.deflate import inflated_body
from service.dicom.status import failure_status
from service.errors import ApiError, MalformedDicom, UnsupportedMediaType
from service.inference.predictor import predict_instance, request_time_limit
from service.inference.state import ServingState
from service.settings import DecodeLimits, Settings

router = APIRouter(prefix="/v1")


STOW_BODY = {
    "requestBody": {
        "content": {'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}},
        "required": True,
    }
}


def _failure(index: int, error: ApiError, sop_instance_uid: str | None) -> dict:
    return {"index": index, "sop_instance_uid": sop_instance_uid, "code": error.code, "message": error.message}


def _sop_uids(body: bytes, limits: DecodeLimits) -> tuple[str | None, str | None]:
    """(SOP Class UID, SOP Instance UID) from the header, for failure reports; None when unreadable."""
    from io import BytesIO

    import pydicom

    try:
        # A deflated dataset (perhaps the bomb that failed) is inflated no further than its header.
        header = inflated_body(body, limits, header_only=True)
        ds = pydicom.dcmread(
            BytesIO(header), stop_before_pixels=True, force=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
        )
        return str(ds.get("SOPClassUID", "") or "") or None, str(ds.get("SOPInstanceUID", "") or "") or None
    except Exception:  # unreadable instance: the failure reason already says so
        return None, None


def store_response(
    successes: list[tuple[str | None, str | None]], failures: list[tuple[str | None, str | None, int]]
) -> dict:
    """The STOW-RS response dataset as DICOM JSON."""
    response = Dataset()
    if successes:
        response.ReferencedSOPSequence = []
        for sop_class, sop_instance in successes:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class or ""
            item.ReferencedSOPInstanceUID = sop_instance or ""
            response.ReferencedSOPSequence.append(item)
    if failures:
        response.FailedSOPSequence = []
        for sop_class, sop_instance, reason in failures:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class or ""
            item.ReferencedSOPInstanceUID = sop_instance or ""
            item.FailureReason = reason
            response.FailedSOPSequence.append(item)
    return response.to_json_dict()


# Every outcome comes in both representations: the DICOMweb store response by default, the
# predictions themselves with `Accept: application/json`.
DICOM_JSON = {
    "application/dicom+json": {
        "schema": {
            "type": "object",
            "description": (
                "DICOM JSON store response: ReferencedSOPSequence (00081199) and FailedSOPSequence (00081198)"
            ),
        }
    }
}
OUTCOMES = {
    status: {"model": StudiesResponse, "description": text, "content": DICOM_JSON}
    for status, text in {
        200: "all instances processed",
        202: "some instances failed (listed)",
        409: "no instance could be processed (listed)",
    }.items()
}


@router.post(
    "/studies",
    responses=ERRORS | OUTCOMES,
    openapi_extra=STOW_BODY,
    summary="DICOMweb STOW-RS style: predictions for every instance of a multipart/related body",
)
async def store_instances(request: Request, state: ReadyStateDep, settings: SettingsDep) -> JSONResponse:
    kind, options = media_type(request.headers.get("content-type"))
    if kind != "multipart/related" or not options.get("boundary"):
        raise UnsupportedMediaType('Send multipart/related; type="application/dicom" with a boundary parameter.')
    if options.get("type", "application/dicom").lower() != "application/dicom":
        raise UnsupportedMediaType(
            f"multipart/related type {options['type']!r} is not supported; use application/dicom."
        )
    check_declared_length(request.headers.get("content-length"), settings.max_body_bytes)
    async with request_time_limit(settings.request_timeout_s):
        parts = await read_multipart(request.stream(), options["boundary"], settings.max_body_bytes)
        return await _store(parts, request, state, settings)


async def _store(parts: list[Part], request: Request, state: ServingState, settings: Settings) -> JSONResponse:
    """Predict every part concurrently and answer with STOW-RS status semantics."""
    if not parts:
        raise MalformedDicom("The multipart body holds no instance.")
    if len(parts) > settings.max_instances_per_request:
        raise MalformedDicom(
            f"{len(parts)} instances in one request; the limit is {settings.max_instances_per_request}."
        )
    request_id = request.state.request_id

    async def one(index: int, body: bytes) -> tuple[dict, str | None] | ApiError:
        if parts[index].content_type not in ("", *DICOM_MEDIA_TYPES):
            return UnsupportedMediaType(f"Part {index} is {parts[index].content_type}, not application/dicom.")
        try:
            prediction, prepared = await predict_instance(body, state, settings, f"{request_id}-{index}")
            return prediction, str(prepared.header.get("SOPClassUID", "") or "") or None
        except ApiError as error:
            if state.metrics is not None:
                state.metrics.observe_error(error.code, error.status_code)
            return error

    outcomes = await asyncio.gather(*(one(i, bytes(part.body)) for i, part in enumerate(parts)))
    results = [outcome[0] for outcome in outcomes if not isinstance(outcome, ApiError)]
    status = 200 if len(results) == len(parts) else (202 if results else 409)
    uids = [
        _sop_uids(bytes(part.body), settings.decode_limits) if isinstance(outcome, ApiError) else None
        for part, outcome in zip(parts, outcomes)
    ]
    accept = (request.headers.get("accept") or "").lower()
    if "application/json" in accept and "application/dicom+json" not in accept:
        failures = [
            _failure(i, outcome, uids[i][1]) for i, outcome in enumerate(outcomes) if isinstance(outcome, ApiError)
        ]
        return JSONResponse({"request_id": request_id, "results": results, "failures": failures}, status_code=status)
    successes = [
        (outcome[1], outcome[0]["instance"]["sop_instance_uid"])
        for outcome in outcomes
        if not isinstance(outcome, ApiError)
    ]
    failures = [
        (uids[i][0], uids[i][1], failure_status(outcome.code))
        for i, outcome in enumerate(outcomes)
        if isinstance(outcome, ApiError)
    ]
    return JSONResponse(store_response(successes, failures), status_code=status, media_type="application/dicom+json")
