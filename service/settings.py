"""Service configuration: one pydantic-settings object, read from CXR_* environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PACK = Path(__file__).resolve().parent.parent / "models" / "demo-synthetic"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=None)

    models: Path = Field(DEFAULT_PACK, description="model pack folder (manifest.json + ONNX files)")
    providers: list[str] = Field(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference; unavailable ones are skipped",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per session (0: one per core)")
    max_batch_size: int = Field(16, ge=1, le=1024, description="images per inference batch")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill up")
    max_queue_size: int = Field(256, ge=1, description="images waiting for inference before 429")
    decode_workers: int = Field(max(1, os.cpu_count() or 1), ge=1, description="processes decoding DICOMs")
    decode_in_processes: bool = Field(True, description="decode in worker processes (False: threads, no hard time bound)")
    decode_timeout_s: float = Field(30.0, gt=0, description="longest one image may take to decode and preprocess")
    finding_score_floor: float | None = Field(
        None, ge=0, le=1,
        description="report findings scoring at least this, for every label, instead of the pack's per-label operating points")
    request_timeout_s: float = Field(120.0, gt=0, description="longest a request may take, upload included (503 request_timeout)")
    strict_providers: bool = Field(False, description="stay unready instead of falling back when the first provider is unusable")
    strict_intended_use: bool = Field(False, description="reject (422) images outside the pack's intended population instead of warning")
    max_instances_per_request: int = Field(64, ge=1, description="instances accepted in one STOW-RS request")
    max_body_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="largest accepted upload (bytes)")
    max_pixels: int = Field(60_000_000, ge=1024, description="largest accepted Rows x Columns")
    max_pixel_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="largest decoded pixel array (bytes)")
    image_id_hash: str = Field("md5", description="hashlib algorithm turning SOP Instance UIDs into image ids")

    # Access (README "Deploying safely"). Off by default so the local demo needs no key.
    auth_enabled: bool = Field(False, description="require an API key (Authorization: Bearer or X-API-Key)")
    api_key_sha256s: list[str] = Field(
        [], description="accepted keys as sha256 hex digests, each optionally `name:digest`; never the keys themselves")
    api_keys_file: Path | None = Field(
        None, description="file of `name:sha256hex` lines, re-read when it changes (rotation without restart)")
    auth_protect_health: bool = Field(False, description="require a key for /healthz and /readyz (orchestrator probes)")
    auth_protect_metrics: bool = Field(True, description="require a key for /metrics")
    auth_protect_docs: bool = Field(False, description="require a key for /docs, /redoc and /openapi.json")
    hsts: bool = Field(False, description="send Strict-Transport-Security (only when TLS terminates in front)")
    cors_allow_origins: list[str] = Field(
        [], description="browser origins allowed to call the API (CORS); empty: CORS off")


@lru_cache
def get_settings() -> Settings:
    return Settings()
