"""Service configuration: one pydantic-settings object, read from CXR_* environment variables."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_PACK = Path(__file__).resolve().parent.parent / "models" / "demo-synthetic"


@dataclass(frozen=True)
class DecodeLimits:
    """Size caps checked on the DICOM header before any pixel is decoded (service.dicom.decode).

    The one place their defaults live: the service takes them from `Settings` (CXR_MAX_PIXELS,
    CXR_MAX_PIXEL_BYTES, which default to these), training and evaluation use these defaults directly.
    """

    max_pixels: int = 60_000_000  # rows x columns x frames
    max_pixel_bytes: int = 256 * 1024 * 1024  # the decoded array: rows x columns x frames x samples x bytes
    max_rows_or_columns: int = 16_384
    min_rows_or_columns: int = 32
    # Room for everything but the pixels (service.dicom.deflate): a deflated dataset inflates to at most this
    # before its Pixel Data, and this again after it. Real headers take kilobytes; overlays and private
    # blocks can take a megabyte.
    max_header_bytes: int = 4 * 1024 * 1024


KSERVE_DEFAULT_PORTS = {"grpc": 8001, "http": 8000}  # Triton's


@dataclass(frozen=True)
class InferenceUrl:
    """CXR_INFERENCE_URL: the KServe v2 server (Triton) that runs the models."""

    protocol: Literal["grpc", "http"]
    host: str
    port: int

    @property
    def address(self) -> str:
        """host:port, as tritonclient takes it (with no scheme)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.protocol}://{self.address}"

    @classmethod
    def parse(cls, url: str) -> InferenceUrl:
        """grpc://host[:port] or http://host[:port]; ValueError with what is wrong otherwise."""
        parts = urlsplit(url)
        if parts.scheme not in KSERVE_DEFAULT_PORTS:
            raise ValueError(f"{url!r} must start with grpc:// or http://")
        if not parts.hostname:
            raise ValueError(f"{url!r} names no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"{url!r} must be just scheme://host:port (no path, query or user)")
        try:
            port = parts.port or KSERVE_DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
        return cls(parts.scheme, parts.hostname, port)  # type: ignore[arg-type]


# Result objects a DICOM node destination can receive (service.viewer_outputs renders them).
ResultKind = Literal["sr", "gsps", "sc", "seg"]
AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # PS3.5 AE VR: 16 characters, no backslash or control


class DimseDestination(BaseModel):
    """A PACS AE that receives the results by C-STORE (the node is the SCU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dimse"]
    ae_title: str = Field(pattern=AE_TITLE_PATTERN, description="called AE title of the PACS")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    outputs: tuple[ResultKind, ...] = Field(("sr",), min_length=1)
    name: str | None = Field(None, description="label in logs, metrics and /v1/jobs (default: AE@host:port)")

    @property
    def label(self) -> str:
        return self.name or f"{self.ae_title}@{self.host}:{self.port}"


class StowDestination(BaseModel):
    """A DICOMweb server that receives the results by STOW-RS (POST {url}/studies, multipart/related)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["stow"]
    url: str = Field(pattern=r"^https?://", description="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    outputs: tuple[ResultKind, ...] = Field(("sr",), min_length=1)
    headers: dict[str, str] = Field(
        {}, description="extra HTTP headers (e.g. Authorization); never logged, never listed by /v1/jobs"
    )
    ca_bundle: Path | None = Field(None, description="CA certificates for an https URL (default: the system's)")
    name: str | None = Field(None, description="label in logs, metrics and /v1/jobs (default: the URL)")

    @property
    def label(self) -> str:
        return self.name or self.url


Destination = Annotated[DimseDestination | StowDestination, Field(discriminator="kind")]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=None)

    models: Path = Field(DEFAULT_PACK, description="model pack folder (manifest.json + ONNX files)")
    providers: list[str] = Field(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference; unusable ones are skipped (TensorRT "
        "before CUDA only when its libraries are installed) and running on any but the first usable one "
        "is a fallback: a warning, or unready with CXR_STRICT_PROVIDERS",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per session (0: one per core)")
    inter_op_threads: int = Field(
        1,
        ge=0,
        description="ONNX Runtime threads running graph nodes side by side (0: one per core); the sessions "
        "run nodes sequentially, so more than 1 only idles",
    )
    intra_op_spinning: bool = Field(
        False,
        description="let ONNX Runtime's threads busy-wait between batches (lower CPU latency when the cores "
        "are otherwise idle; off, because the decode processes need those cores)",
    )
    precision: Literal["auto", "fp32", "fp16"] = Field(
        "auto",
        description="model variant to serve: auto = the pack's fp16 variant on CUDA/TensorRT, fp32 on CPU "
        "(fp16 on CPU works but is slower; a pack without fp16 serves fp32)",
    )
    io_binding: bool = Field(
        True,
        description="on CUDA/TensorRT, copy each batch to the GPU once for both models and bind the outputs to "
        "host memory; no effect on CPU",
    )
    cuda_device_id: int = Field(0, ge=0, description="GPU the CUDA and TensorRT providers run on")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE",
        description="how cuDNN picks convolution kernels; EXHAUSTIVE benchmarks them once per batch "
        "shape, during warm-up",
    )
    cuda_gpu_mem_limit_mb: int | None = Field(
        None,
        ge=1,
        description="cap of each session's CUDA memory arena in MiB (two sessions: detector, classifier); "
        "unset: no cap",
    )
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kSameAsRequested",
        description="how the CUDA arena grows; kSameAsRequested fits the fixed batch shapes without doubling",
    )
    cuda_copy_in_default_stream: bool = Field(
        True, description="CUDA copies on the compute stream (ONNX Runtime's default; separate streams can race)"
    )
    cudnn_conv_use_max_workspace: bool = Field(
        True, description="let cuDNN use its largest workspace when searching for the fastest convolution kernels"
    )
    cuda_use_tf32: bool = Field(
        False,
        description="let float32 convolutions use TF32 tensor cores (10-bit mantissa); off so that fp32 "
        "means float32 (the fp16 variant is the fast path)",
    )
    trt_engine_cache: bool = Field(True, description="keep built TensorRT engines on disk (a build takes minutes)")
    trt_engine_cache_dir: Path = Field(
        Path("~/.cache/pediatric-cxr/tensorrt"),
        description="TensorRT engine and timing caches, one folder per model file",
    )
    trt_max_workspace_mb: int = Field(2048, ge=1, description="TensorRT builder workspace in MiB")
    max_batch_size: int = Field(16, ge=1, le=1024, description="images per inference batch")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill up")
    max_queue_size: int = Field(256, ge=1, description="images waiting for inference before 429")
    decode_workers: int = Field(max(1, os.cpu_count() or 1), ge=1, description="processes decoding DICOMs")
    decode_in_processes: bool = Field(
        True, description="decode in worker processes (False: threads, no hard time bound)"
    )
    decode_native_in_threads: bool = Field(
        True,
        description="decode uncompressed pixel data in threads (numpy releases the GIL; no body copy to a worker "
        "process); compressed syntaxes stay in the process pool",
    )
    malloc_keep_mb: int = Field(
        256,
        ge=0,
        le=2047,
        description="MiB of freed memory each process keeps for reuse instead of returning it to "
        "the kernel (glibc mallopt; 0: glibc's defaults); see service/allocator.py",
    )
    decode_timeout_s: float = Field(30.0, gt=0, description="longest one image may take to decode and preprocess")
    inference_socket: Path | None = Field(
        None,
        description="Unix socket of a shared inference server (service/inference/server.py) to run the models; "
        "unset: ONNX Runtime in this process. `python -m service --workers N` sets it for its workers",
    )
    inference_url: str | None = Field(
        None,
        description="run the models on a KServe v2 server (Triton) at grpc://host:8001 or http://host:8000 "
        "instead of ONNX Runtime in this process; decoding, batching and postprocessing stay here",
    )
    inference_timeout_s: float = Field(10.0, gt=0, description="longest one call to the CXR_INFERENCE_URL server")
    inference_retries: int = Field(
        2, ge=0, le=10, description="retries of a batch whose call to CXR_INFERENCE_URL failed on the connection"
    )
    inference_verify_pack: bool = Field(
        True,
        description="require the CXR_INFERENCE_URL server's models to name this pack's ONNX files (sha256 in their "
        "config, as python -m service.triton_repository writes it); false: check tensor names and shapes only",
    )
    finding_score_floor: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "report findings scoring at least this, for every label, instead of the pack's per-label operating points"
        ),
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="longest a request may take, upload included (503 request_timeout)"
    )
    strict_providers: bool = Field(
        False, description="stay unready instead of falling back when the first provider is unusable"
    )
    strict_intended_use: bool = Field(
        False, description="reject (422) images outside the pack's intended population instead of warning"
    )
    max_instances_per_request: int = Field(64, ge=1, description="instances accepted in one STOW-RS request")
    max_body_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="largest accepted upload (bytes)")
    max_pixels: int = Field(DecodeLimits.max_pixels, ge=1024, description="largest accepted Rows x Columns")
    max_pixel_bytes: int = Field(
        DecodeLimits.max_pixel_bytes, ge=1024, description="largest decoded pixel array (bytes)"
    )
    max_header_bytes: int = Field(
        DecodeLimits.max_header_bytes,
        ge=64 * 1024,
        description="largest inflated header of a deflated dataset: the elements before Pixel Data, and again "
        "those after it (bytes); with CXR_MAX_PIXEL_BYTES it bounds what a deflated upload may inflate to",
    )
    image_id_hash: str = Field("md5", description="hashlib algorithm turning SOP Instance UIDs into image ids")

    # Access (README "Deploying safely"). Off by default so the local demo needs no key.
    auth_enabled: bool = Field(False, description="require an API key (Authorization: Bearer or X-API-Key)")
    api_key_sha256s: list[str] = Field(
        [], description="accepted keys as sha256 hex digests, each optionally `name:digest`; never the keys themselves"
    )
    api_keys_file: Path | None = Field(
        None, description="file of `name:sha256hex` lines, re-read when it changes (rotation without restart)"
    )
    auth_protect_health: bool = Field(False, description="require a key for /healthz and /readyz (orchestrator probes)")
    auth_protect_metrics: bool = Field(True, description="require a key for /metrics")
    auth_protect_docs: bool = Field(
        False, description="require a key for /docs, /redoc, their assets (/docs-assets/) and /openapi.json"
    )
    hsts: bool = Field(False, description="send Strict-Transport-Security (only when TLS terminates in front)")
    cors_allow_origins: list[str] = Field(
        [], description="browser origins allowed to call the API (CORS); empty: CORS off"
    )

    @field_validator("inference_url")
    @classmethod
    def _kserve_url(cls, url: str | None) -> str | None:
        if not url:
            return None
        InferenceUrl.parse(url)  # a wrong URL stops startup with what is wrong, not the first request
        return url

    @model_validator(mode="after")
    def _one_inference_place(self) -> Settings:
        if self.inference_url and self.inference_socket:
            raise ValueError("CXR_INFERENCE_URL and CXR_INFERENCE_SOCKET are both set; the models run in one place")
        return self

    @property
    def inference_endpoint(self) -> InferenceUrl | None:
        """CXR_INFERENCE_URL, parsed; None when the models run in this process (or the shared server)."""
        return InferenceUrl.parse(self.inference_url) if self.inference_url else None

    # DICOM node (service/dicom_node, README "Receive from a PACS"). Off unless a DICOM port is given.
    dicom_port: int | None = Field(
        None, ge=0, le=65535, description="port of the DICOM node (C-ECHO, C-STORE SCP); unset: no node"
    )
    dicom_host: str | None = Field(None, description="address the DICOM node listens on (default: the API's --host)")
    dicom_ae_title: str = Field("PCXR-AI", pattern=AE_TITLE_PATTERN, description="the node's own (called) AE title")
    dicom_allowed_calling_ae: Annotated[list[str], NoDecode] = Field(
        [],
        description="calling AE titles allowed to associate, comma-separated (or a JSON list); empty: any. "
        "Others are rejected at association (calling AE title not recognised)",
    )
    dicom_spool_dir: Path = Field(
        Path("dicom-spool"),
        description="folder of the node's spool: received instances, rendered results and the job database "
        "(jobs.sqlite3); holds PHI until delivery, so put it on an encrypted volume the service alone can read",
    )
    dicom_spool_max_bytes: int = Field(
        10 * 1024**3,
        ge=65536,
        description="most bytes the spool may hold (instances + results); a C-STORE that would exceed it is "
        "refused with 0xA700 'out of resources'",
    )
    dicom_destinations: list[Destination] = Field(
        [],
        description='where results go, a JSON list: {"kind": "dimse", "ae_title", "host", "port", "outputs"} and/or '
        '{"kind": "stow", "url", "outputs"}; outputs among "sr", "gsps", "sc", "seg"',
    )
    dicom_max_pdu: int = Field(
        262_144,
        ge=0,
        description="largest PDU the node accepts (bytes; 0: unlimited); larger PDUs mean fewer round trips",
    )
    dicom_max_associations: int = Field(16, ge=1, description="associations the node serves at once")
    dicom_tls_cert: Path | None = Field(None, description="PEM certificate of the node; with the key: DICOM over TLS")
    dicom_tls_key: Path | None = Field(None, description="PEM private key of dicom_tls_cert")
    dicom_tls_ca: Path | None = Field(
        None, description="CA certificates that calling nodes' certificates must chain to (mutual TLS); unset: none"
    )
    dicom_workers: int = Field(
        4, ge=1, le=256, description="received instances predicted at once (they share the inference batches)"
    )
    dicom_max_attempts: int = Field(
        8, ge=1, description="tries per job and destination before the job is dead-lettered (replay command)"
    )
    dicom_backoff_base_s: float = Field(2.0, gt=0, description="delay before the first retry; doubles per attempt")
    dicom_backoff_max_s: float = Field(300.0, gt=0, description="longest delay between two retries")
    dicom_network_timeout_s: float = Field(
        30.0, gt=0, description="connection and answer timeout of a delivery (C-STORE SCU, STOW-RS)"
    )
    dicom_retention_s: float = Field(
        0.0,
        ge=0,
        description="seconds a delivered job's instance and results stay in the spool (0: purged at once); job "
        "rows (no PHI) stay for dicom_job_history_s",
    )
    dicom_job_history_s: float = Field(
        7 * 86400.0, ge=0, description="seconds finished job rows (hashed ids and states only) stay listed"
    )

    @field_validator("dicom_allowed_calling_ae", mode="before")
    @classmethod
    def _calling_ae_list(cls, value):
        """Accept `A,B` (what an operator types) as well as a JSON list; blank entries dropped."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        return [str(title).strip() for title in value if str(title).strip()]

    @property
    def decode_limits(self) -> DecodeLimits:
        """The size caps every image of this service is decoded under."""
        return DecodeLimits(
            max_pixels=self.max_pixels, max_pixel_bytes=self.max_pixel_bytes, max_header_bytes=self.max_header_bytes
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
