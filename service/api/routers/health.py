"""Liveness, readiness and model description."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.dependencies import ReadyStateDep, SettingsDep, StateDep
from service.api.schemas import ErrorResponse, HeatmapsInfo, InferenceInfo, ModelsResponse, TriageInfo
from service.inference.client import RemoteModels
from service.inference.heatmaps import HeatmapGrid
from service.inference.kserve import KServeModels
from service.inference.modelpack import MODELS, ModelPack, OnnxModels
from service.inference.state import NOT_READY_REASONS, ServingState

router = APIRouter()


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict:
    return {"status": "ok"}


READINESS = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not ready"]},
        "reason": {
            "type": "string",
            "enum": list(NOT_READY_REASONS),
            "description": "why not (the detail is in the service's log): "
            + "; ".join(f"{code}: {meaning}" for code, meaning in NOT_READY_REASONS.items()),
        },
    },
    "required": ["status"],
}


@router.get(
    "/readyz",
    summary="Readiness: the model pack is verified, loaded and warmed up",
    responses={
        200: {"content": {"application/json": {"schema": READINESS}}},
        503: {
            "description": "not ready, with a reason code (Retry-After)",
            "content": {"application/json": {"schema": READINESS}},
        },
    },
)
async def readyz(state: StateDep) -> JSONResponse:
    if state.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        {"status": "not ready", "reason": state.not_ready_reason}, status_code=503, headers={"Retry-After": "5"}
    )


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    summary="The model pack being served",
    responses={503: {"model": ErrorResponse, "description": "model not ready (Retry-After)"}},
)
async def models(state: ReadyStateDep, settings: SettingsDep) -> ModelsResponse:
    pack = state.pack
    # In-process sessions describe themselves; a shared inference server's stand-in only knows its providers.
    runtime = asdict(state.models.runtime) if isinstance(state.models, OnnxModels) else None
    return ModelsResponse(
        pack=pack.name,
        version=pack.version,
        intended_use=pack.manifest["intended_use"],
        input_sizes={model: pack.model_inputs.spec(model).size for model in MODELS},
        detector_labels=pack.local_labels,
        detector_thresholds=dict(
            zip(pack.local_labels, map(float, pack.finding_thresholds(settings.finding_score_floor)))
        ),
        classifier_labels=pack.global_labels,
        thresholds=pack.thresholds,
        calibration=pack.calibration.methods(),
        providers=state.models.providers,
        max_batch_size=settings.max_batch_size,
        precisions=list(pack.precisions),
        heatmaps=heatmaps_info(pack),
        triage=triage_info(pack),
        runtime=runtime,
        inference=inference_info(state),
    )


def heatmaps_info(pack: ModelPack) -> HeatmapsInfo | None:
    entry = pack.heatmaps
    if entry is None:
        return None
    grid = HeatmapGrid.from_manifest(entry, pack.model_inputs.classifier.size, entry["shape"][-1])
    return HeatmapsInfo(shape=entry["shape"], grid=asdict(grid), values=entry.get("values", ""))


def triage_info(pack: ModelPack) -> TriageInfo | None:
    rule = pack.triage
    if rule is None:
        return None
    return TriageInfo(label=rule.label, threshold=rule.threshold, rule=rule.rule, validation=dict(rule.validation))


def inference_info(state: ServingState) -> InferenceInfo:
    if isinstance(state.models, KServeModels):
        return InferenceInfo(**state.models.description())
    if isinstance(state.models, RemoteModels):
        return InferenceInfo(where="inference-server", socket=str(state.models.socket))
    return InferenceInfo(where="in-process")
