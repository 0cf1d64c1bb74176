"""GET /metrics: Prometheus exposition of this instance's metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

router = APIRouter()


@router.get(
    "/metrics",
    summary="Prometheus metrics: per-stage latency, batch sizes, queue depth, errors by code",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(request: Request) -> Response:
    service_metrics = request.app.state.metrics
    state = request.app.state.serving
    service_metrics.ready.set(1 if state.ready else 0)
    if state.batcher is not None:
        service_metrics.queue_depth.set(state.batcher.queue_depth)
    if state.decoder is not None:
        service_metrics.decode_waiting.set(state.decoder.waiting)
    node = request.app.state.dicom_node
    if node is not None:
        await run_in_threadpool(node.refresh_gauges)
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
