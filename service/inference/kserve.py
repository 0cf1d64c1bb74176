"""Inference on a KServe v2 server (Triton, KServe, MLServer) instead of ONNX Runtime in this process.

With CXR_INFERENCE_URL=grpc://host:8001 (or http://host:8000) the service still verifies its model pack,
decodes, preprocesses, batches across requests and postprocesses exactly as in-process; only the models' run
moves: `KServeModels.run(*inputs)` sends each batch the local `Batcher` forms to the server's detector and
classifier (tritonclient's asyncio gRPC or HTTP client) and returns the same arrays `OnnxModels.run` would.

Readiness follows the remote models: a watcher checks that both are ready there and that they are this pack's
(the sha256 of the ONNX file in each model's config parameters, written by `python -m service.triton_repository`;
tensor names, types and shapes from the model metadata), and keeps /readyz at 503 with the reason otherwise.
A batch that fails on a connection error is retried (bounded) and then answered 503 with Retry-After, as is
every request while the server is away; the gRPC channel reconnects with a short backoff, so service resumes
within about a second of the server's return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from service.errors import InferenceUnavailable
from service.inference.batcher import Batcher, cancel_and_wait
from service.inference.modelpack import INPUT_NAME, MODELS, ModelPack, model_batches
from service.inference.state import ServingState, new_decode_pool, state_with_verified_pack
from service.inference.triton.repository import PACK_PARAMETER, SHA256_PARAMETER
from service.metrics import ServiceMetrics
from service.settings import InferenceUrl, Settings

log = logging.getLogger(__name__)

CHECK_INTERVAL_READY_S = 2.0
CHECK_INTERVAL_UNREADY_S = 0.5
RETRY_BACKOFF_S = 0.1
RETRY_AFTER_S = "2"
# gRPC reconnects after a lost connection with exponential backoff, by default from 1 s up to 120 s: a server
# back after a restart would wait for the channel's next attempt for tens of seconds. Capped at 1 s here.
GRPC_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class RemoteError(RuntimeError):
    """A call to the server failed; `retryable` when trying again may succeed (the connection, not the request)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# ---------------------------------------------------------------------------------------------------
# The two protocols, behind one small interface that raises only RemoteError.


class GrpcTransport:
    def __init__(self, url: InferenceUrl, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as grpc_aio

        self._types = grpcclient
        keepalive = grpcclient.KeepAliveOptions()
        # channel_args replaces tritonclient's defaults, so they are restated around the reconnect backoff.
        channel_args = [
            ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            *GRPC_RECONNECT,
            # A name resolving to several servers (a headless Kubernetes Service) gets batches spread over all.
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self._client = grpc_aio.InferenceServerClient(url.address, channel_args=channel_args)
        self._timeout_s = timeout_s

    @contextlib.asynccontextmanager
    async def _errors(self, what: str):
        from tritonclient.utils import InferenceServerException

        try:
            yield
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            raise RemoteError(
                f"{what}: {status.removeprefix('StatusCode.') or 'error'}: {exc.message()}",
                retryable=status == "StatusCode.UNAVAILABLE",
            ) from None

    async def model_ready(self, model: str) -> bool:
        async with self._errors(f"readiness of {model}"):
            return await self._client.is_model_ready(model, client_timeout=self._timeout_s)

    async def server_metadata(self) -> dict:
        async with self._errors("server metadata"):
            return await self._client.get_server_metadata(as_json=True, client_timeout=self._timeout_s)

    async def model_metadata(self, model: str) -> dict:
        async with self._errors(f"metadata of {model}"):
            return await self._client.get_model_metadata(model, as_json=True, client_timeout=self._timeout_s)

    async def model_config(self, model: str) -> dict:
        async with self._errors(f"config of {model}"):
            answer = await self._client.get_model_config(model, as_json=True, client_timeout=self._timeout_s)
        return answer.get("config", {})

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        tensors = []
        for name, array in inputs.items():
            tensor = self._types.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [self._types.InferRequestedOutput(name) for name in outputs]
        async with self._errors(f"{model} inference"):
            result = await self._client.infer(model, tensors, outputs=requested, client_timeout=self._timeout_s)
        return [result.as_numpy(name) for name in outputs]

    async def close(self) -> None:
        await self._client.close()


class HttpTransport:
    def __init__(self, url: InferenceUrl, timeout_s: float) -> None:
        # Imported on use (here and in GrpcTransport): tritonclient.http loads gevent and aiohttp, which a
        # service running its models in-process, or over gRPC, never needs.
        import tritonclient.http as httpclient
        import tritonclient.http.aio as http_aio

        self._types = httpclient
        # conn_timeout is aiohttp's total time per request: the per-call deadline of this client.
        self._client = http_aio.InferenceServerClient(url.address, conn_timeout=timeout_s)

    @contextlib.asynccontextmanager
    async def _errors(self, what: str):
        import aiohttp
        from tritonclient.utils import InferenceServerException

        try:
            yield
        except InferenceServerException as exc:
            raise RemoteError(f"{what}: HTTP {exc.status() or 'error'}: {exc.message()}", retryable=False) from None
        except aiohttp.ClientConnectionError as exc:  # refused, reset, closed mid-answer
            raise RemoteError(f"{what}: {type(exc).__name__}: {exc}", retryable=True) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RemoteError(f"{what}: {type(exc).__name__}: {exc}".rstrip(": "), retryable=False) from None

    async def model_ready(self, model: str) -> bool:
        async with self._errors(f"readiness of {model}"):
            return await self._client.is_model_ready(model)

    async def server_metadata(self) -> dict:
        async with self._errors("server metadata"):
            return await self._client.get_server_metadata()

    async def model_metadata(self, model: str) -> dict:
        async with self._errors(f"metadata of {model}"):
            return await self._client.get_model_metadata(model)

    async def model_config(self, model: str) -> dict:
        async with self._errors(f"config of {model}"):
            return await self._client.get_model_config(model)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        tensors = []
        for name, array in inputs.items():
            tensor = self._types.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        requested = [self._types.InferRequestedOutput(name, binary_data=True) for name in outputs]
        async with self._errors(f"{model} inference"):
            result = await self._client.infer(model, tensors, outputs=requested)
        return [result.as_numpy(name) for name in outputs]

    async def close(self) -> None:
        await self._client.close()


TRANSPORTS = {"grpc": GrpcTransport, "http": HttpTransport}


# ---------------------------------------------------------------------------------------------------
# What the server must show before it gets an image (pure: unit-tested without a server)


def _parameter(config: dict, key: str) -> str | None:
    value = (config.get("parameters") or {}).get(key)
    return value.get("string_value") if isinstance(value, dict) else None


def config_problem(model: str, config: dict, pack: ModelPack, max_batch_size: int) -> str | None:
    """Why the served `model` (its Triton config) is not this pack's, or cannot take our batches; None if fine."""
    served = _parameter(config, SHA256_PARAMETER)
    if served is None:
        return (
            f"its {model} config names no {SHA256_PARAMETER} parameter, so it cannot be checked against pack "
            f"{pack.name} {pack.version} (export the repository with python -m service.triton_repository, or set "
            "CXR_INFERENCE_VERIFY_PACK=false to trust tensor names and shapes alone)"
        )
    ours = {pack.model_sha256(model, precision): precision for precision in pack.precisions}
    if served not in ours:
        return (
            f"it serves a {model} with sha256 {served[:12]}… (pack {_parameter(config, PACK_PARAMETER)}), "
            f"not one of pack {pack.name} {pack.version}'s files ({', '.join(sha[:12] + '…' for sha in ours)})"
        )
    remote_max = int(config.get("max_batch_size") or 0)
    if remote_max < max_batch_size:
        return f"its {model} takes batches of at most {remote_max}, but CXR_MAX_BATCH_SIZE is {max_batch_size}"
    return None


def _tensors(metadata: dict, kind: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    # gRPC's JSON gives int64 dimensions as strings, HTTP's as numbers.
    return {
        tensor["name"]: (tensor.get("datatype", ""), tuple(int(d) for d in tensor.get("shape", [])))
        for tensor in metadata.get(kind) or []
    }


def metadata_problem(model: str, metadata: dict, input_shape: tuple[int, ...], outputs: Sequence[str]) -> str | None:
    """Why the served `model` cannot take our (N, *input_shape) float32 batches or lacks an output we read."""
    inputs = _tensors(metadata, "inputs")
    if INPUT_NAME not in inputs:
        return f"its {model} has no input {INPUT_NAME!r} (it has {sorted(inputs)})"
    datatype, shape = inputs[INPUT_NAME]
    if datatype != "FP32" or len(shape) != len(input_shape) + 1 or shape[1:] != input_shape:
        return (
            f"its {model} takes {INPUT_NAME} as {datatype} {list(shape)}, "
            f"not FP32 [-1, {', '.join(map(str, input_shape))}]"
        )
    missing = [name for name in outputs if name not in _tensors(metadata, "outputs")]
    if missing:
        return f"its {model} has no output(s) {missing}"
    return None


# ---------------------------------------------------------------------------------------------------


@dataclass
class KServeModels:
    """Stands in for OnnxModels: both models of `pack`, run on the KServe v2 server at `url`.

    `run` is the Batcher's (async) infer function; `start`/`stop` run the readiness watcher, which reports
    through `on_status` ("" when ready, else the reason code of the serving state's not_ready_reason; the detail
    goes to the log).
    """

    url: InferenceUrl
    pack: ModelPack
    settings: Settings
    on_status: Callable[[str], None]
    providers: list[str] = field(default_factory=list)  # ONNX Runtime runs nothing here
    server: dict = field(default_factory=dict)  # the server's name and version, once seen
    served: dict = field(default_factory=dict)  # model -> what the server says it runs
    _transport: Any = None
    _watcher: asyncio.Task | None = None
    _recheck: asyncio.Event = field(default_factory=asyncio.Event)
    _reason: str = "inference_server_connecting"

    def input_shape(self, model: str) -> tuple[int, ...]:
        """One image of `model`'s batch: the model's own input size (the detector's and classifier's may differ)."""
        size = self.pack.model_inputs.spec(model).size
        return (1, size, size)

    @property
    def ready(self) -> bool:
        """Both models ready on the server and verified as this pack's (as of the watcher's last check)."""
        return self._reason == ""

    def description(self) -> dict:
        """/v1/models' "inference" object."""
        return {
            "where": "remote",
            "url": str(self.url),
            "protocol": self.url.protocol,
            "server": self.server or None,
            "models": self.served,
        }

    async def start(self) -> None:
        self._transport = TRANSPORTS[self.url.protocol](self.url, self.settings.inference_timeout_s)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="kserve-readiness")

    async def stop(self) -> None:
        await cancel_and_wait(self._watcher)
        if self._transport is not None:
            await self._transport.close()

    async def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """One (N, 1, S, S) float32 batch per pack input -> the outputs of OnnxModels.run, from the server (both
        models at once)."""
        if self._transport is None or self._reason:
            raise InferenceUnavailable(
                f"The inference server is not available ({self._reason}).", headers={"Retry-After": RETRY_AFTER_S}
            )
        batches = dict(zip(MODELS, model_batches(self.pack, inputs)))
        results = await asyncio.gather(
            *(self._infer(model, np.ascontiguousarray(batches[model], dtype=np.float32)) for model in MODELS)
        )
        return tuple(array for arrays in results for array in arrays)

    async def _infer(self, model: str, images: np.ndarray) -> list[np.ndarray]:
        attempts = 1 + self.settings.inference_retries
        for attempt in range(1, attempts + 1):
            try:
                return await self._transport.infer(model, {INPUT_NAME: images}, self.pack.outputs[model])
            except RemoteError as exc:
                if exc.retryable:
                    self._recheck.set()  # the watcher looks at the server now, not at its next interval
                if not exc.retryable or attempt == attempts:
                    log.warning("inference at %s failed (attempt %d of %d): %s", self.url, attempt, attempts, exc)
                    # The client learns that it failed; where and why (the server's URL and message) are logged above.
                    raise InferenceUnavailable(
                        "Inference on the inference server failed; retry shortly.",
                        headers={"Retry-After": RETRY_AFTER_S},
                    ) from None
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
        raise AssertionError("unreachable")

    async def check(self) -> tuple[str, str]:
        """("", "") when both models are ready on the server and are this pack's; otherwise why not: a reason code
        of the serving state (NOT_READY_REASONS) and the detail for the log."""
        try:
            for model in MODELS:
                if not await self._transport.model_ready(model):
                    return "inference_server_not_ready", f"the server at {self.url} has no ready {model} model"
            served = {}
            for model in MODELS:
                # The files first (the root cause when anything differs), then the tensors we send and read.
                config, problem = {}, None
                if self.settings.inference_verify_pack:
                    try:
                        config = await self._transport.model_config(model)
                    except RemoteError as exc:
                        if exc.retryable:
                            raise
                        return (
                            "inference_server_mismatch",
                            f"the server at {self.url} does not show which files its {model} runs ({exc}); for a "
                            "KServe v2 server without Triton's model config, set CXR_INFERENCE_VERIFY_PACK=false",
                        )
                    problem = config_problem(model, config, self.pack, self.settings.max_batch_size)
                metadata = await self._transport.model_metadata(model)
                problem = problem or metadata_problem(
                    model, metadata, self.input_shape(model), self.pack.outputs[model]
                )
                if problem is not None:
                    return "inference_server_mismatch", f"the server at {self.url} is not serving this pack: {problem}"
                served[model] = {
                    "name": metadata.get("name", model),
                    "versions": list(metadata.get("versions") or []),
                    "platform": metadata.get("platform") or None,
                    "backend": config.get("backend") or None,
                    "sha256": _parameter(config, SHA256_PARAMETER),
                }
            if not self.server:
                metadata = await self._transport.server_metadata()
                self.server = {"name": metadata.get("name"), "version": metadata.get("version")}
            self.served = served
        except RemoteError as exc:
            return "inference_server_unavailable", f"the server at {self.url} is unavailable ({exc})"
        return "", ""

    async def _watch(self) -> None:
        while True:
            self._set_status(*await self.check())
            interval = CHECK_INTERVAL_UNREADY_S if self._reason else CHECK_INTERVAL_READY_S
            self._recheck.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recheck.wait(), interval)

    def _set_status(self, reason: str, detail: str) -> None:
        if reason != self._reason:
            if reason:
                log.warning("not ready (%s): %s", reason, detail)
            else:
                log.info("models of pack %s %s ready at %s", self.pack.name, self.pack.version, self.url)
        self._reason = reason
        self.on_status(reason)


def load_kserve_serving_state(settings: Settings, metrics: ServiceMetrics | None = None) -> ServingState:
    """The serving state of a service whose models run on the KServe v2 server at settings.inference_url.

    The pack is verified here all the same: labels, thresholds and postprocessing come from it, and the remote
    models must be its files.
    """
    state = state_with_verified_pack(settings, metrics)
    if state.pack is None:
        return state
    url = settings.inference_endpoint
    state.models = KServeModels(url, state.pack, settings, on_status=partial(setattr, state, "not_ready_reason"))
    state.not_ready_reason = "inference_server_connecting"
    state.batcher = Batcher(
        state.models.run, settings.max_batch_size, settings.max_queue_delay_ms / 1e3, settings.max_queue_size
    )
    state.watcher = state.models
    state.decoder = new_decode_pool(settings, metrics)
    log.info("models of pack %s %s run on the KServe v2 server at %s", state.pack.name, state.pack.version, url)
    return state
