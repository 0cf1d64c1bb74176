"""GET /v1/jobs: what the DICOM node received and where its results went (hashed ids only, no PHI)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service.api.schemas import ErrorResponse, JobsResponse, JobState
from service.errors import NodeDisabled

router = APIRouter(prefix="/v1")


@router.get(
    "/jobs",
    response_model=JobsResponse,
    summary="Jobs of the DICOM node (received instances) and their deliveries, newest first",
    responses={404: {"model": ErrorResponse, "description": "the service runs no DICOM node (--dicom-port)"}},
)
async def list_jobs(
    request: Request,
    state: JobState | None = Query(None, description="only jobs in this state"),
    limit: int = Query(100, ge=1, le=1000, description="most jobs listed"),
) -> JobsResponse:
    node = getattr(request.app.state, "dicom_node", None)
    if node is None:
        raise NodeDisabled("This service runs no DICOM node; start it with --dicom-port to receive images by C-STORE.")
    jobs = await run_in_threadpool(node.store.list_jobs, state, limit)
    counts = await run_in_threadpool(node.store.counts)
    return JobsResponse(
        node={
            "ae_title": node.settings.dicom_ae_title,
            "port": node.port,
            "spool_bytes_used": node.spool.used_bytes,
            "spool_max_bytes": node.spool.max_bytes,
            "jobs_by_state": counts,
            "destinations": list(node.destinations),
        },
        jobs=jobs,
    )
