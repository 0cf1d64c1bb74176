"""Errors the API reports to clients, each with a stable code and HTTP status (README "Errors").

Shared by every stage (decoding raises UnusableImage, the batcher Overloaded), so none of them imports the HTTP
layer to report one (docs/architecture.md, "Import direction").
"""

from __future__ import annotations


class ApiError(Exception):
    """An expected failure caused by the request, reported as JSON with `code` and `message`."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class NotDicom(ApiError):
    status_code, code = 400, "not_dicom"


class MalformedDicom(ApiError):
    status_code, code = 400, "malformed_dicom"


class InvalidRequest(ApiError):
    """The request itself is wrong (a form without its `file` field), whatever the DICOM it carries."""

    status_code, code = 422, "invalid_request"


class PayloadTooLarge(ApiError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status_code, code = 415, "unsupported_media_type"


class UnsupportedTransferSyntax(ApiError):
    status_code, code = 415, "unsupported_transfer_syntax"


class UnusableImage(ApiError):
    """Valid DICOM, but not an image this service can read as a chest radiograph."""

    status_code, code = 422, "unusable_image"


class Overloaded(ApiError):
    status_code, code = 429, "overloaded"


class NotReady(ApiError):
    status_code, code = 503, "not_ready"


class InferenceUnavailable(ApiError):
    """The models run on a remote server (CXR_INFERENCE_URL) that failed, timed out or cannot be reached."""

    status_code, code = 503, "inference_unavailable"


class NotAcceptable(ApiError):
    status_code, code = 406, "not_acceptable"


class OutOfDistribution(ApiError):
    """The image is outside the pack's intended population and the gate is strict."""

    status_code, code = 422, "out_of_intended_use"


class Unauthorized(ApiError):
    """Authentication is on and no API key was sent; `WWW-Authenticate` names the scheme to use."""

    status_code, code = 401, "unauthorized"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer", **(headers or {})})


class Forbidden(ApiError):
    """An API key was sent but matches no configured digest."""

    status_code, code = 403, "forbidden"


class StudyMismatch(ApiError):
    """A STOW-RS instance posted to /v1/studies/{study} belongs to another study (PS3.18 10.5)."""

    status_code, code = 409, "study_instance_uid_mismatch"


class RequestTimeout(ApiError):
    """The whole request (upload, decoding, queueing, inference) outlasted the configured limit."""

    status_code, code = 503, "request_timeout"


class NodeDisabled(ApiError):
    """A DICOM node route was called on a service started without one."""

    status_code, code = 404, "dicom_node_disabled"


class HeatmapsUnavailable(ApiError):
    """Heatmaps were asked for, but the served pack's classifier has no heatmaps output (/v1/models says so)."""

    status_code, code = 422, "heatmaps_unavailable"
