"""Peer (b): Ray Serve with adaptive batching (`@serve.batch`), composed like the service.

    benchmarks/.venv-peers/bin/python -m benchmarks.peers.ray_serve --port 8002 --models models/demo-synthetic \
        --decode-replicas 2 --max-batch-size 16 --batch-wait-timeout-s 0.005 --max-ongoing-requests 256

Runs in its own virtual environment (benchmarks/.venv-peers, made by benchmarks.peer_env), never in
the project's. Three deployments mirror the service's parts one for one, each given the service's
setting (the defaults below are read from the service's Settings, CXR_* variables included):
- `Ingress` (1 replica, FastAPI, max_ongoing_requests = CXR_MAX_QUEUE_SIZE): reads the body, asks a
  decoder, asks the model, builds the JSON (the service's one uvicorn process);
- `Decoder` (replicas = CXR_DECODE_WORKERS, the service's decode processes; at most 2 requests each:
  one decoding, one waiting): runs `service.dicom.pipeline.prepare` with the service's arguments;
- `Model` (1 replica, max_ongoing_requests = CXR_MAX_QUEUE_SIZE): `@serve.batch` with max_batch_size =
  CXR_MAX_BATCH_SIZE and batch_wait_timeout_s = CXR_MAX_QUEUE_DELAY_MS / 1000, one batch at a time
  (max_concurrent_batches=1, as the service's batcher), run in a thread so the next batch gathers
  meanwhile; sessions loaded and every batch shape warmed up by the service's own loader.
Every replica reserves 0 logical CPUs: Ray's default of 1 per replica would not fit four replicas on
a 2-core machine, and the OS shares the cores among processes either way. The Model reserves the
GPU when there is one (Ray hides GPUs from actors that reserve none). Ray runs on 127.0.0.1 only,
without its dashboard and usage reporting.
"""

# No `from __future__ import annotations`: Ray's ingress wrapper hands FastAPI the methods' raw
# annotations, and string annotations such as 'Request' then fail to resolve (422 on every call).
import argparse
import asyncio
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from benchmarks.peers.common import load_models, prediction_json, prepare_body, response_body, settings_for
from service.inference.modelpack import ModelPack

api = FastAPI(title="ray serve peer")
DECODER_ONGOING_REQUESTS = 2


class Decoder:
    def __init__(self, models: str | None) -> None:
        self.settings = settings_for(Path(models) if models else None)
        self.pack = ModelPack.load(self.settings.models)

    def prepare(self, body: bytes):
        return prepare_body(body, self.pack, self.settings)


class Model:
    def __init__(self, models: str | None, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        # Loaded (and every batch shape up to max_batch_size warmed up) by the service's own loader.
        settings = settings_for(Path(models) if models else None).model_copy(update={"max_batch_size": max_batch_size})
        self.pack, self.sessions = load_models(settings)
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def providers(self) -> list[str]:
        return list(self.sessions.providers)

    # The decorator's values are replaced in __init__ by the ones passed on the command line.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=1)
    async def infer(self, images: list[tuple[np.ndarray, ...]]) -> list[tuple[tuple[np.ndarray, ...], float, int]]:
        started = time.perf_counter()
        # In a thread, like the service's batcher: the replica's event loop keeps gathering the next batch.
        outputs = await asyncio.to_thread(self.sessions.run, *(np.stack(position) for position in zip(*images)))
        inference_ms = (time.perf_counter() - started) * 1e3
        return [(tuple(output[index] for output in outputs), inference_ms, len(images)) for index in range(len(images))]


@serve.ingress(api)
class Ingress:
    def __init__(self, decoder, model, models: str | None) -> None:
        self.decoder, self.model = decoder, model
        self.settings = settings_for(Path(models) if models else None)
        self.pack = ModelPack.load(self.settings.models)

    @api.get("/readyz")
    async def readyz(self) -> dict:
        # serve.run returns only when every replica is up and warmed; the providers say where the models run.
        return {"status": "ready", "providers": await self.model.providers.remote()}

    @api.post("/v1/predict")
    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        body = await request.body()
        prepared = await self.decoder.prepare.remote(body)
        queued = time.perf_counter()
        outputs, inference_ms, _ = await self.model.infer.remote(prepared.inputs)
        timing = {"queue": (time.perf_counter() - queued) * 1e3 - inference_ms, "inference": inference_ms}
        prediction = prediction_json(prepared, outputs, self.pack, self.settings, uuid.uuid4().hex, timing)
        prediction["timing_ms"]["total"] = round((time.perf_counter() - started) * 1e3, 2)
        return JSONResponse(response_body(prediction))


def build_app(
    models: str | None,
    decode_replicas: int,
    max_batch_size: int,
    batch_wait_timeout_s: float,
    max_ongoing_requests: int,
    gpus: int,
):
    """The three deployments bound into one application (settings documented in the module docstring)."""
    no_reservation = {"num_cpus": 0}
    # Ray hides every GPU from an actor that reserves none (CUDA_VISIBLE_DEVICES=""): the model gets one when
    # the machine has one, so it runs where the service's models run.
    model_resources = {"num_cpus": 0, "num_gpus": 1 if gpus else 0}
    # A decoder works on one image at a time on one core; one more waiting keeps it from idling between two.
    decoder = serve.deployment(
        Decoder,
        num_replicas=decode_replicas,
        ray_actor_options=no_reservation,
        max_ongoing_requests=DECODER_ONGOING_REQUESTS,
    ).bind(models)
    model = serve.deployment(
        Model, num_replicas=1, ray_actor_options=model_resources, max_ongoing_requests=max_ongoing_requests
    ).bind(models, max_batch_size, batch_wait_timeout_s)
    return serve.deployment(
        Ingress, num_replicas=1, ray_actor_options=no_reservation, max_ongoing_requests=max_ongoing_requests
    ).bind(decoder, model, models)


def main(argv: list[str] | None = None) -> None:
    defaults = settings_for(None)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.ray_serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--decode-replicas", type=int, default=defaults.decode_workers)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=defaults.max_queue_delay_ms / 1e3)
    parser.add_argument("--max-ongoing-requests", type=int, default=defaults.max_queue_size)
    args = parser.parse_args(argv)
    models = str(args.models.resolve()) if args.models else None
    # Local only: loopback addresses, no dashboard, no usage report (nothing leaves the machine).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    gpus = int(ray.cluster_resources().get("GPU", 0))
    serve.run(
        build_app(
            models,
            args.decode_replicas,
            args.max_batch_size,
            args.batch_wait_timeout_s,
            args.max_ongoing_requests,
            gpus,
        ),
        route_prefix="/",
    )
    print(f"ray serve peer ready on http://{args.host}:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
