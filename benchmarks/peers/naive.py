"""Peer (a): the FastAPI service a user writes first. One request = one decode + one batch-1 inference.

    python -m benchmarks.peers.naive --port 8001 --models models/demo-synthetic

A plain `def` endpoint (FastAPI runs it in its thread pool), the sessions loaded at startup, one
uvicorn worker, no batcher, no decode processes, no warm-up. Decode, preprocessing, models and
postprocessing are the service's own (benchmarks.peers.common), so only the serving strategy differs.
"""

from __future__ import annotations

import argparse
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import Body, FastAPI

from benchmarks.peers.common import load_models, prediction_json, prepare_body, response_body, settings_for
from service.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    models: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models["pack"], models["sessions"] = load_models(settings)
        yield

    app = FastAPI(title="naive peer", lifespan=lifespan)

    @app.get("/readyz")
    def readyz() -> dict:
        # uvicorn accepts connections only after lifespan startup, so answering at all means loaded.
        return {"status": "ready", "providers": list(models["sessions"].providers)}

    @app.post("/v1/predict")
    def predict(body: bytes = Body(..., media_type="application/dicom")) -> dict:
        started = time.perf_counter()
        pack = models["pack"]
        prepared = prepare_body(body, pack, settings)
        inference_started = time.perf_counter()
        outputs = models["sessions"].run(*(tensor[None] for tensor in prepared.inputs))
        boxes, scores, probabilities = outputs[:3]  # a pack with heatmaps returns them fourth; not asked for here
        timing = {"inference": (time.perf_counter() - inference_started) * 1e3}
        prediction = prediction_json(
            prepared, (boxes[0], scores[0], probabilities[0]), pack, settings, uuid.uuid4().hex, timing
        )
        prediction["timing_ms"]["total"] = round((time.perf_counter() - started) * 1e3, 2)
        return response_body(prediction)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.naive", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--models", type=Path, default=None)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(settings_for(args.models)),
        host=args.host,
        port=args.port,
        workers=1,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
