"""Response schemas of the API (README "Try it", "Endpoints"); they drive the OpenAPI document and its examples."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# A real 8 x 8 heatmap for the OpenAPI example: the demo pack 0.2.0 with its heatmaps output added
# (python -m training.heatmaps), Pneumonia on a 1633 x 1402 (rows x columns) default-difficulty phantom.
HEATMAP_EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAQklEQVR4nGNkCNf9sv0iAwMTgwkfEzcrAwMLg7Tv9f+/TzOwMDRckvjHxMDAwMAw"
    "/f8hKQYGBgYGBgddBigQZEACAGESDL5ven2EAAAAAElFTkSuQmCC"
)


class Box(BaseModel):
    """Pixel coordinates in the original image: x = column, y = row (the VinDr CSV convention)."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


class Code(BaseModel):
    """A coded concept: the code the DICOM SR gives the same finding or disease (one table for JSON and SR)."""

    scheme: str = Field(
        description="coding scheme designator: SCT (SNOMED CT), DCM (DICOM) or 99PCXR (this service's private "
        "scheme, for labels without a standard code)"
    )
    value: str = Field(description="code value in that scheme")
    meaning: str = Field(description="code meaning, the scheme's own term")


class Finding(BaseModel):
    label: str
    score: float = Field(
        ge=0,
        le=1,
        description="the detector's confidence score for this box (not a calibrated probability): "
        "higher means more confident; compare it with the label's reporting threshold, not with 0.5",
    )
    box: Box
    code: Code


class Heatmap(BaseModel):
    """Where the classifier saw the disease: its class activation map (`?include=heatmaps`).

    Draw `png` stretched over the rectangle (bilinear), clipped to the image: the rectangle is in the original
    image's pixels and may reach past the image (half a map cell above and left of it, and over the model's
    padding on the image's short side)."""

    png: str = Field(
        description="base64 8-bit grayscale PNG at feature resolution (e.g. 8 x 8 for a 256-pixel input), relative "
        "to this image: 255 at the cell where the evidence for the disease is strongest, 0 wherever it is at or below "
        "the map's mean (which is the disease's logit), linear between; how likely the disease is, is `probability`"
    )
    x_min: float = Field(description="original-pixel column of the map's left edge")
    y_min: float = Field(description="original-pixel row of the map's top edge")
    x_max: float = Field(description="original-pixel column of the map's right edge")
    y_max: float = Field(description="original-pixel row of the map's bottom edge")


class Disease(BaseModel):
    label: str
    probability: float = Field(
        ge=0,
        le=1,
        description="calibrated probability that the image shows the disease (the classifier's output mapped "
        "by the pack's calibrator, fitted on a validation split)",
    )
    threshold: float = Field(description="operating point on the calibrated probability, chosen on validation data")
    positive: bool
    code: Code
    heatmap: Heatmap | None = Field(None, description="only with ?include=heatmaps")


class Triage(BaseModel):
    """One number a worklist can sort by, and the priority the pack's validated operating point gives it."""

    abnormality: float = Field(
        ge=0, le=1, description='probability that the image is not "No finding": 1 - the "No finding" probability'
    )
    priority: Literal["routine", "expedite"] = Field(
        description="expedite when abnormality is at or above the pack's triage operating point (chosen on "
        "validation data at a target sensitivity; GET /v1/models shows how)"
    )
    threshold: float = Field(description="that operating point: the abnormality at or above which it is expedite")


class Instance(BaseModel):
    sop_instance_uid: str | None
    image_id: str | None = Field(description="hash of the SOP Instance UID (the VinDr image_id scheme)")
    study_instance_uid: str | None
    rows: int
    columns: int
    pixel_spacing_mm: list[float] | None


class ModelInfo(BaseModel):
    pack: str
    version: str
    detector_sha256: str
    classifier_sha256: str


class Prediction(BaseModel):
    request_id: str
    instance: Instance
    findings: list[Finding]
    diseases: list[Disease]
    triage: Triage | None = Field(
        description='null only for a pack without a "No finding" label or without a triage operating point'
    )
    warnings: list[str]
    model: ModelInfo
    timing_ms: dict[str, float]

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "request_id": "5f0c8e1a2b7d4c49a1f3e9d2c6b8a7e4",
                    "instance": {
                        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
                        "image_id": "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
                        "study_instance_uid": "1.2.826.0.1.3680043.8.498.2",
                        "rows": 1643,
                        "columns": 1349,
                        "pixel_spacing_mm": [0.14, 0.14],
                    },
                    "findings": [
                        {
                            "label": "Consolidation",
                            "score": 0.83,
                            "box": {"x_min": 512.0, "y_min": 300.5, "x_max": 700.2, "y_max": 488.0},
                            "code": {"scheme": "SCT", "value": "95436008", "meaning": "Lung consolidation"},
                        }
                    ],
                    "diseases": [
                        {
                            "label": "Pneumonia",
                            "probability": 0.71,
                            "threshold": 0.42,
                            "positive": True,
                            "code": {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"},
                            "heatmap": {
                                "png": HEATMAP_EXAMPLE_PNG,
                                "x_min": -98.78,
                                "y_min": -98.87,
                                "x_max": 1532.64,
                                "y_max": 1534.13,
                            },
                        }
                    ],
                    "triage": {"abnormality": 0.86, "priority": "expedite", "threshold": 0.31},
                    "warnings": [],
                    "model": {
                        "pack": "demo-synthetic",
                        "version": "0.1.0",
                        "detector_sha256": "…",
                        "classifier_sha256": "…",
                    },
                    "timing_ms": {
                        "decode": 3.1,
                        "preprocess": 2.0,
                        "queue": 4.2,
                        "inference": 12.9,
                        "postprocess": 0.3,
                        "total": 23.5,
                    },
                }
            ]
        }
    }


def prediction_json(prediction: dict) -> dict:
    """A prediction validated against `Prediction`, as JSON; a disease carries `heatmap` only when asked for."""
    body = Prediction.model_validate(prediction).model_dump(mode="json")
    for disease in body["diseases"]:
        if disease["heatmap"] is None:
            del disease["heatmap"]
    return body


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class RuntimeInfo(BaseModel):
    """How ONNX Runtime runs the models in this process (service/inference/runtime.py)."""

    provider: str = Field(description="execution provider running the models")
    providers: list[str] = Field(description="the sessions' providers in order (CPU takes what the first cannot)")
    requested_providers: list[str] = Field(description="CXR_PROVIDERS")
    precision: Literal["fp32", "fp16"] = Field(description="variant of the pack loaded (CXR_PRECISION)")
    files: dict[str, str] = Field(description="model -> ONNX file loaded")
    io_binding: bool = Field(description="each batch is copied to the GPU once for both models")
    provider_options: dict[str, dict[str, str]] = Field(
        description="provider options in effect, as ONNX Runtime reports them"
    )
    session_options: dict[str, Any] = Field(description="threads, execution mode, graph optimisation level")
    fallback: str | None = Field(description="why the preferred provider is not the one in use")
    warnings: list[str]


class RemoteModel(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str | None = None
    backend: str | None = None
    sha256: str | None = Field(None, description="sha256 of the ONNX file the server says it runs (its config)")


class InferenceInfo(BaseModel):
    """Where the models run (CXR_INFERENCE_URL, CXR_INFERENCE_SOCKET, or neither)."""

    where: Literal["in-process", "inference-server", "remote"] = Field(
        description="in-process: ONNX Runtime in this process; inference-server: the shared server of "
        "`python -m service --workers N`; remote: a KServe v2 server such as Triton"
    )
    url: str | None = Field(None, description="the remote server (grpc://host:port or http://host:port)")
    socket: str | None = Field(None, description="the shared inference server's Unix socket")
    protocol: Literal["grpc", "http"] | None = None
    server: dict[str, Any] | None = Field(None, description="the remote server's name and version")
    models: dict[str, RemoteModel] | None = Field(None, description="model -> what the remote server runs")


class HeatmapsInfo(BaseModel):
    shape: list[int] = Field(description="labels x rows x columns of the maps")
    grid: dict[str, float] = Field(
        description="cell (i, j) covers model-input x from origin + stride * j to origin + stride * (j + 1), y alike"
    )
    values: str


class TriageInfo(BaseModel):
    label: str = Field(description='the classifier label whose complement is the abnormality ("No finding")')
    threshold: float = Field(description="abnormality at or above it: expedite")
    rule: str = Field(description="how the operating point was chosen, and on which data")
    validation: dict[str, Any] = Field(description="its sensitivity and specificity where it was chosen")


class ModelsResponse(BaseModel):
    pack: str
    version: str
    intended_use: str
    input_sizes: dict[str, int] = Field(
        description="model -> its square input size in pixels (the detector's and the classifier's may differ)",
        examples=[{"detector": 1024, "classifier": 512}],
    )
    detector_labels: list[str]
    detector_thresholds: dict[str, float] = Field(
        description="per-label score at which a finding is reported (the pack's operating points, chosen on "
        "validation data, or CXR_FINDING_SCORE_FLOOR for every label when set)"
    )
    classifier_labels: list[str]
    thresholds: dict[str, float] = Field(
        description="per-disease threshold of `positive`, on the calibrated probability"
    )
    calibration: dict[str, str] = Field(
        description="per classifier label, how its raw output is calibrated into the reported probability "
        "(identity, temperature, platt or isotonic; fitted on a validation split)"
    )
    providers: list[str] = Field(description="ONNX Runtime execution providers actually in use")
    max_batch_size: int
    precisions: list[str] = Field(description="precision variants the pack ships")
    heatmaps: HeatmapsInfo | None = Field(
        description="the classifier's class activation maps (?include=heatmaps, format=seg, overlay=heatmaps); "
        "null when the pack has none"
    )
    triage: TriageInfo | None = Field(description="how `triage` is computed; null when the pack has no triage")
    runtime: RuntimeInfo | None = Field(
        None, description="ONNX Runtime configuration in effect; null when the models run in another process"
    )
    inference: InferenceInfo = Field(description="where the models run")


class InstanceFailure(BaseModel):
    index: int = Field(description="position of the part in the multipart body")
    sop_instance_uid: str | None
    code: str
    message: str


class StudiesResponse(BaseModel):
    """`Accept: application/json` answer of /v1/studies (the default is the DICOMweb store response)."""

    request_id: str
    results: list[Prediction]
    failures: list[InstanceFailure]


JobState = Literal["queued", "processed", "delivered", "failed", "dead"]


class JobDelivery(BaseModel):
    destination: str = Field(description="the destination's name (CXR_DICOM_DESTINATIONS)")
    outputs: list[str]
    state: Literal["pending", "delivered", "dead"]
    attempts: int
    error: str | None = Field(description="error code of the last failed try")
    delivered_at: float | None = Field(description="Unix time")
    next_attempt_at: float | None = Field(description="Unix time of the next try, while pending")


class Job(BaseModel):
    """One instance received by the DICOM node; hashed ids, states and error codes only (no PHI)."""

    job_id: str = Field(description="random id of the job (names its spool files)")
    image_id: str = Field(description="hash of the SOP Instance UID (the VinDr image_id scheme)")
    state: JobState
    attempts: int = Field(description="tries through the pipeline")
    error: str | None = Field(description="error code when failed or retried")
    received_at: float = Field(description="Unix time of the C-STORE acknowledgement")
    updated_at: float
    finished_at: float | None
    spooled: bool = Field(description="whether the instance and results are still in the spool")
    deliveries: list[JobDelivery]


class NodeStatus(BaseModel):
    ae_title: str
    port: int
    spool_bytes_used: int
    spool_max_bytes: int
    jobs_by_state: dict[str, int]
    destinations: list[str]


class JobsResponse(BaseModel):
    node: NodeStatus
    jobs: list[Job] = Field(description="newest first")
