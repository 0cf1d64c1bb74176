"""CXR_INFERENCE_URL without a server: URL parsing, what the remote models must show, the batcher's async path."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from service.inference.batcher import Batcher
from service.inference.kserve import config_problem, metadata_problem
from service.inference.modelpack import ModelPack
from service.inference.triton.repository import SHA256_PARAMETER
from service.settings import DEFAULT_PACK, InferenceUrl, Settings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("grpc://triton:8001", ("grpc", "triton", 8001, "triton:8001")),
        ("http://10.0.0.5", ("http", "10.0.0.5", 8000, "10.0.0.5:8000")),
        ("grpc://[::1]:9001/", ("grpc", "::1", 9001, "[::1]:9001")),
    ],
)
def test_inference_urls_parse_to_what_tritonclient_takes(url, expected):
    """Scheme picks the protocol, the port defaults to Triton's, and the address carries no scheme."""
    parsed = InferenceUrl.parse(url)
    assert (parsed.protocol, parsed.host, parsed.port, parsed.address) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("triton:8001", "must start with grpc:// or http://"),
        ("https://triton", "must start with grpc:// or http://"),
        ("grpc://", "names no host"),
        ("http://triton:8000/v2", "no path"),
        ("grpc://triton:port", "invalid port"),
    ],
)
def test_wrong_inference_urls_are_refused_at_startup(url, problem):
    """A wrong CXR_INFERENCE_URL fails Settings (so startup), naming what is wrong."""
    with pytest.raises(ValidationError, match=problem):
        Settings(inference_url=url)


def test_command_line_reports_wrong_settings_without_a_traceback():
    """python -m service with a bad CXR_INFERENCE_URL, or with both places for the models, exits 2 with one line."""
    for env in ({"CXR_INFERENCE_URL": "ftp://x"}, {"CXR_INFERENCE_URL": "grpc://x", "CXR_INFERENCE_SOCKET": "/s"}):
        done = subprocess.run([sys.executable, "-m", "service"], env=env, capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert ("CXR_INFERENCE_URL" in done.stderr.splitlines()[-1]) and "error:" in done.stderr


def triton_config(sha256: str | None, max_batch_size: int = 16) -> dict:
    parameters = {SHA256_PARAMETER: {"string_value": sha256}} if sha256 else {}
    return {"max_batch_size": max_batch_size, "parameters": parameters, "backend": "python"}


def test_config_check_accepts_only_this_packs_files():
    """The served model's sha256 must be one of the pack's files (fp32 or fp16), and take our batch size."""
    pack = ModelPack.load(DEFAULT_PACK)
    for precision in pack.precisions:
        assert config_problem("detector", triton_config(pack.model_sha256("detector", precision)), pack, 16) is None
    assert "names no cxr_onnx_sha256" in config_problem("detector", triton_config(None), pack, 16)
    other = config_problem("detector", triton_config("ab" * 32), pack, 16)
    assert "abababababab" in other and "not one of pack demo-synthetic" in other
    small = config_problem("classifier", triton_config(pack.model_sha256("classifier"), 8), pack, 16)
    assert small == "its classifier takes batches of at most 8, but CXR_MAX_BATCH_SIZE is 16"


def test_metadata_check_reads_grpc_and_http_shapes():
    """Input name, FP32 and (-1, 1, S, S) must match, gRPC's string dims included; every output we read must exist."""
    grpc_style = {
        "inputs": [{"name": "images", "datatype": "FP32", "shape": ["-1", "1", "256", "256"]}],
        "outputs": [{"name": "boxes"}, {"name": "scores"}],
    }
    assert metadata_problem("detector", grpc_style, (1, 256, 256), ["boxes", "scores"]) is None
    http_style = {"inputs": [{"name": "images", "datatype": "FP16", "shape": [-1, 1, 256, 256]}], "outputs": []}
    assert "FP16 [-1, 1, 256, 256], not FP32 [-1, 1, 256, 256]" in metadata_problem(
        "detector", http_style, (1, 256, 256), ["boxes"]
    )
    assert "no output(s) ['heatmaps']" in metadata_problem("detector", grpc_style, (1, 256, 256), ["boxes", "heatmaps"])
    assert "no input 'images'" in metadata_problem("detector", {"inputs": []}, (1, 256, 256), [])


def test_batcher_awaits_an_async_infer_function():
    """Remote models' async run() batches like the in-process one: one call for queued images, slices back."""
    calls = []

    async def infer(images: np.ndarray) -> tuple[np.ndarray, ...]:
        calls.append(len(images))
        await asyncio.sleep(0.01)
        return images.sum(axis=(1, 2, 3)), images[:, 0, 0, :2]

    async def scenario():
        batcher = Batcher(infer, max_batch_size=4, max_delay_s=0.05, max_queue_size=16)
        batcher.start()
        images = [np.full((1, 2, 2), value, np.float32) for value in range(4)]
        results = await asyncio.gather(*(batcher.submit(image) for image in images))
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert calls == [4]
    assert [float(result.outputs[0]) for result in results] == [0.0, 4.0, 8.0, 12.0]
    assert [result.outputs[1].tolist() for result in results] == [[v, v] for v in (0.0, 1.0, 2.0, 3.0)]


def test_remote_models_send_each_model_its_own_input_size():
    """With a detector and a classifier of different input sizes, each remote model gets the batch of its own size
    (and expects that shape in the server's metadata)."""
    from pathlib import Path

    from service.inference.kserve import KServeModels

    normalization = {"mean": 0.5, "std": 0.25}
    pack = ModelPack(
        path=Path("unused"),
        manifest={
            "name": "two-sizes",
            "version": "1",
            "detector": {"sha256": "d" * 64, "labels": ["a"], "input": {"size": 8, "normalization": normalization}},
            "classifier": {"sha256": "c" * 64, "labels": ["b"], "input": {"size": 6, "normalization": normalization}},
        },
    )
    sent = {}

    class RecordingTransport:
        async def infer(self, model, inputs, outputs):
            sent[model] = inputs["images"].shape
            return [np.zeros((len(inputs["images"]), 1), np.float32) for _ in outputs]

    models = KServeModels(InferenceUrl.parse("grpc://triton:8001"), pack, Settings(), on_status=lambda reason: None)
    models._transport, models._reason = RecordingTransport(), ""
    detector_batch, classifier_batch = np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 1, 6, 6), np.float32)
    outputs = asyncio.run(models.run(detector_batch, classifier_batch))
    assert sent == {"detector": (2, 1, 8, 8), "classifier": (2, 1, 6, 6)} and len(outputs) == 3
    assert models.input_shape("detector") == (1, 8, 8) and models.input_shape("classifier") == (1, 6, 6)
    with pytest.raises(ValueError, match="takes 2 input batch"):
        asyncio.run(models.run(detector_batch))
