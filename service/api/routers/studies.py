"""POST /v1/studies and /v1/studies/{study}: DICOMweb STOW-RS, several instances in one multipart/related body.

Each instance is predicted independently and concurrently (they share inference batches); one bad
instance never fails the others. Status follows STOW-RS: 200 all succeeded, 202 some failed,
409 none succeeded. The study-scoped form (the URL dicomweb-client uses when given a study) fails
every instance of another study, as PS3.18 10.5 asks, without predicting it.

What comes back depends on Accept and `format` (negotiate_answer):
  - the DICOMweb store response (`application/dicom+json`, ReferencedSOPSequence /
    FailedSOPSequence), which DICOMweb clients parse: the default;
  - the result objects themselves, `multipart/related; type="application/dicom"`, one part per
    instance and format (`format=sr` by default, or gsps, sc; repeat `format` for several): asked
    for with that Accept, or by giving `format`. Failed instances are named in `Warning` headers;
  - the predictions as JSON with `Accept: application/json`.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from io import BytesIO
from typing import Annotated, Literal

import pydicom
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from service.api.dependencies import ReadyStateDep, SettingsDep
from service.api.routers.predict import ERRORS
from service.api.schemas import StudiesResponse
from service.api.upload import DICOM_MEDIA_TYPES, Part, check_declared_length, media_type, read_multipart
from service.dicom.decode import check_referenceable
from service.dicom.deflate import inflated_body
from service.dicom.status import failure_status
from service.errors import ApiError, MalformedDicom, NotAcceptable, StudyMismatch, UnsupportedMediaType
from service.inference.predictor import predict_instance, request_time_limit
from service.inference.state import ServingState
from service.settings import DecodeLimits, Settings
from service.viewer_outputs.render import NEEDS_DISPLAY, render

router = APIRouter(prefix="/v1")

ResultFormat = Literal["sr", "gsps", "sc"]
Answer = Literal["store_response", "json", "objects"]

DICOM_PARTS = 'multipart/related; type="application/dicom"'
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"

STOW_BODY = {
    "requestBody": {
        "content": {DICOM_PARTS: {"schema": {"type": "string", "format": "binary"}}},
        "required": True,
    }
}

# Every outcome comes in the three representations; the DICOMweb store response is the default.
DICOM_JSON = {
    "application/dicom+json": {
        "schema": {
            "type": "object",
            "description": (
                "DICOM JSON store response: ReferencedSOPSequence (00081199) and FailedSOPSequence (00081198)"
            ),
        }
    },
    DICOM_PARTS: {
        "schema": {"type": "string", "format": "binary"},
        "description": "the result objects (format=sr, gsps, sc), one part per instance and format",
    },
}
OUTCOMES = {
    status: {"model": StudiesResponse, "description": text, "content": DICOM_JSON}
    for status, text in {
        200: "all instances processed",
        202: "some instances failed (listed; with result objects: in Warning headers)",
        409: "no instance could be processed, or all belong to another study than the URL's (listed)",
    }.items()
}
FORMAT_QUERY = Query(
    None,
    description=(
        "return the result objects (multipart/related): sr (default), gsps, sc; repeat for several "
        '(format=sr&format=gsps). Implied by Accept: multipart/related; type="application/dicom".'
    ),
)


@dataclass
class Stored:
    """One instance that went through: its prediction, SOP Class UID and the rendered result objects."""

    prediction: dict
    sop_class_uid: str | None
    objects: list[bytes] = field(default_factory=list)


@router.post(
    "/studies",
    responses=ERRORS | OUTCOMES,
    openapi_extra=STOW_BODY,
    summary="DICOMweb STOW-RS: predictions (or result objects) for every instance of a multipart/related body",
)
async def store_instances(
    request: Request,
    state: ReadyStateDep,
    settings: SettingsDep,
    format: list[ResultFormat] | None = FORMAT_QUERY,
) -> Response:
    return await _handle(request, state, settings, None, format)


@router.post(
    "/studies/{study}",
    responses=ERRORS | OUTCOMES,
    openapi_extra=STOW_BODY,
    summary="DICOMweb STOW-RS into one study: instances of another study fail with reason 0xA901",
)
async def store_study_instances(
    request: Request,
    state: ReadyStateDep,
    settings: SettingsDep,
    study: Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="Study Instance UID")],
    format: list[ResultFormat] | None = FORMAT_QUERY,
) -> Response:
    return await _handle(request, state, settings, study, format)


def negotiate_answer(accept: str | None, formats: list[str] | None) -> Answer:
    """Which representation to send: the Accept header wins; without one (or */*) a `format` asks for objects."""
    ranges = [media_type(part.strip()) for part in (accept or "").split(",") if part.strip()]
    for kind, options in ranges:
        if kind == "application/dicom+json":
            return "store_response"
        if kind == "application/json":
            return "json"
        if kind == "multipart/related" and options.get("type", "application/dicom").lower() == "application/dicom":
            return "objects"
        if kind in ("*/*", "application/*", "multipart/*"):
            return "objects" if formats or kind == "multipart/*" else "store_response"
    if not ranges:
        return "objects" if formats else "store_response"
    raise NotAcceptable(
        f"Cannot produce {accept!r}; ask for application/dicom+json (store response), application/json "
        f"(predictions) or {DICOM_PARTS} (result objects)."
    )


async def _handle(
    request: Request, state: ServingState, settings: Settings, study: str | None, formats: list[str] | None
) -> Response:
    kind, options = media_type(request.headers.get("content-type"))
    if kind != "multipart/related" or not options.get("boundary"):
        raise UnsupportedMediaType(f"Send {DICOM_PARTS} with a boundary parameter.")
    if options.get("type", "application/dicom").lower() != "application/dicom":
        raise UnsupportedMediaType(
            f"multipart/related type {options['type']!r} is not supported; use application/dicom."
        )
    answer = negotiate_answer(request.headers.get("accept"), formats)
    formats = list(dict.fromkeys(formats or ["sr"])) if answer == "objects" else []
    check_declared_length(request.headers.get("content-length"), settings.max_body_bytes)
    async with request_time_limit(settings.request_timeout_s):
        parts = await read_multipart(request.stream(), options["boundary"], settings.max_body_bytes)
        outcomes = await _process(parts, request.state.request_id, state, settings, study, formats)
    return _answer(answer, parts, outcomes, request.state.request_id, settings.decode_limits)


async def _process(
    parts: list[Part], request_id: str, state: ServingState, settings: Settings, study: str | None, formats: list[str]
) -> list[Stored | ApiError]:
    """Predict (and render) every part concurrently; each outcome is a result or the error that stopped it."""
    if not parts:
        raise MalformedDicom("The multipart body holds no instance.")
    if len(parts) > settings.max_instances_per_request:
        raise MalformedDicom(
            f"{len(parts)} instances in one request; the limit is {settings.max_instances_per_request}."
        )
    keep_display = any(output in NEEDS_DISPLAY for output in formats)

    async def one(index: int, body: bytes) -> Stored | ApiError:
        try:
            if parts[index].content_type not in ("", *DICOM_MEDIA_TYPES):
                raise UnsupportedMediaType(f"Part {index} is {parts[index].content_type}, not application/dicom.")
            if study is not None and _header_uids(body, settings.decode_limits)[2] not in (None, study):
                raise StudyMismatch(f"Part {index} belongs to another study than {study}; it was not processed.")
            prediction, prepared = await predict_instance(
                body, state, settings, f"{request_id}-{index}", keep_display=keep_display
            )
            stored = Stored(prediction, str(prepared.header.get("SOPClassUID", "") or "") or None)
            if formats:
                check_referenceable(prepared.header)
                for output in formats:
                    stored.objects.append((await run_in_threadpool(render, output, prepared, prediction))[0])
            return stored
        except ApiError as error:
            if state.metrics is not None:
                state.metrics.observe_error(error.code, error.status_code)
            return error

    return await asyncio.gather(*(one(i, bytes(part.body)) for i, part in enumerate(parts)))


def _answer(
    answer: Answer, parts: list[Part], outcomes: list[Stored | ApiError], request_id: str, limits: DecodeLimits
) -> Response:
    stored = [outcome for outcome in outcomes if isinstance(outcome, Stored)]
    status = 200 if len(stored) == len(parts) else (202 if stored else 409)
    failed = [(i, outcome) for i, outcome in enumerate(outcomes) if isinstance(outcome, ApiError)]
    uids = {i: _header_uids(bytes(parts[i].body), limits) for i, _ in failed}
    if answer == "json":
        failures = [_failure(i, error, uids[i][1]) for i, error in failed]
        body = {"request_id": request_id, "results": [s.prediction for s in stored], "failures": failures}
        return JSONResponse(body, status_code=status)
    failure_rows = [(uids[i][0], uids[i][1], failure_status(error.code)) for i, error in failed]
    if answer == "objects" and stored:
        return _multipart(
            [blob for s in stored for blob in s.objects],
            status,
            warnings=[f"part {i}: {error.code}: {error.message}" for i, error in failed],
        )
    successes = [(s.sop_class_uid, s.prediction["instance"]["sop_instance_uid"]) for s in stored]
    return JSONResponse(
        store_response(successes, failure_rows), status_code=status, media_type="application/dicom+json"
    )


def _multipart(objects: list[bytes], status: int, warnings: list[str]) -> Response:
    """The result objects as multipart/related; type="application/dicom" (PS3.18 8.7.3.3)."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), blob) for blob in objects
    )
    body += b"--%s--\r\n" % boundary.encode()
    headers = [("Warning", _warning(text)) for text in warnings]
    response = Response(body, status_code=status, media_type=f"{DICOM_PARTS}; boundary={boundary}")
    for name, value in headers:
        response.headers.append(name, value)
    return response


def _warning(text: str) -> str:
    """A Warning header value (RFC 7234 syntax, code 299 as PS3.18 uses): printable ASCII, quoted."""
    safe = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "?" for c in text)[:300]
    return f'299 pcxr "{safe}"'


def _failure(index: int, error: ApiError, sop_instance_uid: str | None) -> dict:
    return {"index": index, "sop_instance_uid": sop_instance_uid, "code": error.code, "message": error.message}


def _header_uids(body: bytes, limits: DecodeLimits) -> tuple[str | None, str | None, str | None]:
    """(SOP Class UID, SOP Instance UID, Study Instance UID) from the header; None where unreadable."""
    keywords = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"]
    try:
        # A deflated dataset (perhaps a bomb) is inflated no further than its header.
        header = inflated_body(body, limits, header_only=True)
        ds = pydicom.dcmread(BytesIO(header), stop_before_pixels=True, force=True, specific_tags=keywords)
    except Exception:  # unreadable instance: prediction reports why
        return None, None, None
    return tuple(str(ds.get(keyword, "") or "") or None for keyword in keywords)  # type: ignore[return-value]


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
