"""ONNX Runtime configuration: provider plans, provider options, precision variants, IO binding, /v1/models.

The GPU path's decisions are pure functions and are checked here on any machine; the CPU path runs for real.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from service.inference import runtime
from service.inference.modelpack import ModelPack, OnnxModels
from service.inference.runtime import CPU, CUDA, MIB, TENSORRT, Machine
from service.settings import Settings
from training.data import read_split
from training.dataset import stacked_inputs
from training.export import FP16_TOLERANCES, compare_outputs

ALL = (TENSORRT, CUDA, CPU)
GPU_WITH_TENSORRT = Machine(available=ALL, nvidia_driver=True, tensorrt=True)
GPU_WITHOUT_TENSORRT = Machine(available=ALL, nvidia_driver=True, tensorrt=False)
NO_GPU = Machine(available=ALL, nvidia_driver=False, tensorrt=False)
CPU_BUILD = Machine(available=(CPU,), nvidia_driver=True, tensorrt=True)


@pytest.fixture(scope="module")
def real_images(tiny_pack, tiny_dataset) -> np.ndarray:
    """Four test DICOMs prepared as the service prepares them (the tiny pack's models share one input)."""
    (images,) = stacked_inputs(read_split(tiny_dataset, "test")[:4], ModelPack.load(tiny_pack).input_specs)
    return images


def test_cuda_options_default_to_exhaustive_search_and_no_tf32():
    """The CUDA provider gets every option explicitly: device, EXHAUSTIVE cuDNN search, arena growth as requested,
    copies on the compute stream, max workspace, TF32 off, and no memory cap unless one is set."""
    assert runtime.cuda_provider_options(Settings()) == {
        "device_id": "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "cudnn_conv_use_max_workspace": "1",
        "use_tf32": "0",
    }
    options = runtime.cuda_provider_options(
        Settings(cuda_device_id=1, cuda_gpu_mem_limit_mb=4096, cuda_use_tf32=True, cudnn_conv_algo_search="HEURISTIC")
    )
    assert options["device_id"] == "1" and options["gpu_mem_limit"] == str(4096 * MIB)
    assert options["use_tf32"] == "1" and options["cudnn_conv_algo_search"] == "HEURISTIC"


def test_settings_read_runtime_options_from_cxr_environment(monkeypatch):
    """Every runtime option has a CXR_* environment variable."""
    monkeypatch.setenv("CXR_PRECISION", "fp16")
    monkeypatch.setenv("CXR_CUDA_GPU_MEM_LIMIT_MB", "2048")
    monkeypatch.setenv("CXR_CUDNN_CONV_ALGO_SEARCH", "DEFAULT")
    monkeypatch.setenv("CXR_TRT_ENGINE_CACHE_DIR", "/cache/trt")
    monkeypatch.setenv("CXR_IO_BINDING", "false")
    monkeypatch.setenv("CXR_INTER_OP_THREADS", "2")
    settings = Settings()
    assert (settings.precision, settings.cuda_gpu_mem_limit_mb, settings.cudnn_conv_algo_search) == (
        "fp16",
        2048,
        "DEFAULT",
    )
    assert (
        settings.trt_engine_cache_dir == Path("/cache/trt")
        and not settings.io_binding
        and settings.inter_op_threads == 2
    )
    assert Settings.model_fields["providers"].default == [TENSORRT, CUDA, CPU]


def test_tensorrt_options_cover_every_batch_and_cache_per_model():
    """TensorRT gets one optimisation profile from batch 1 to the max batch, fp16 only for the fp16 variant, and
    an engine cache folder named by the model file's sha256."""
    settings = Settings(max_batch_size=8, trt_engine_cache_dir=Path("/cache"), trt_max_workspace_mb=1024)
    options = runtime.tensorrt_provider_options(settings, "fp16", "images", 256, "ab" * 32)
    assert options["trt_profile_min_shapes"] == "images:1x1x256x256"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == "images:8x1x256x256"
    assert options["trt_fp16_enable"] == "1" and options["trt_max_workspace_size"] == str(1024 * MIB)
    assert options["trt_engine_cache_enable"] == "1" and options["trt_engine_cache_path"] == "/cache/" + "ab" * 8
    assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]
    fp32 = runtime.tensorrt_provider_options(
        settings.model_copy(update={"trt_engine_cache": False}), "fp32", "images", 256, "cd" * 32
    )
    assert (
        fp32["trt_fp16_enable"] == "0"
        and fp32["trt_engine_cache_enable"] == "0"
        and "trt_engine_cache_path" not in fp32
    )


def test_provider_options_follow_the_provider_order():
    """ONNX Runtime's provider_options list lines up with the providers: TensorRT's, CUDA's, none for CPU."""
    built = runtime.provider_options([TENSORRT, CUDA, CPU], Settings(), "fp16", "images", 128, "0" * 64)
    assert built[0]["trt_fp16_enable"] == "1" and built[1]["cudnn_conv_algo_search"] == "EXHAUSTIVE" and built[2] == {}


def test_session_options_are_explicit():
    """Sessions run nodes sequentially with every graph optimisation and the configured thread counts."""
    import onnxruntime as ort

    options = runtime.session_options(Settings(intra_op_threads=3, inter_op_threads=1))
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = runtime.session_options(Settings(intra_op_spinning=True))
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"


@pytest.mark.parametrize(
    "wanted, machine, attempt, expected, skipped",
    [
        # The default order on a GPU machine with TensorRT installed: TensorRT first, CUDA for what it cannot take.
        ([TENSORRT, CUDA, CPU], GPU_WITH_TENSORRT, (TENSORRT, CUDA, CPU), TENSORRT, ()),
        # TensorRT missing is no fallback when CUDA follows it: CUDA is what was meant to run.
        ([TENSORRT, CUDA, CPU], GPU_WITHOUT_TENSORRT, (CUDA, CPU), CUDA, (TENSORRT,)),
        # No GPU at all: only CPU is tried, and CUDA is the provider that is missed.
        ([TENSORRT, CUDA, CPU], NO_GPU, (CPU,), CUDA, (TENSORRT, CUDA)),
        # A CPU-only onnxruntime build, whatever the hardware.
        ([CUDA, CPU], CPU_BUILD, (CPU,), CUDA, (CUDA,)),
        # TensorRT asked for alone is required, not opportunistic.
        ([TENSORRT, CPU], GPU_WITHOUT_TENSORRT, (CPU,), TENSORRT, (TENSORRT,)),
        # A provider absent from every build; CPU is always the last resort even when not listed.
        (["MIGraphXExecutionProvider"], NO_GPU, (CPU,), "MIGraphXExecutionProvider", ("MIGraphXExecutionProvider",)),
        ([CPU], NO_GPU, (CPU,), CPU, ()),
    ],
)
def test_provider_plan(wanted, machine, attempt, expected, skipped):
    """Which providers are handed to ONNX Runtime, which one must run the models, and which are left out."""
    plan = runtime.plan_providers(wanted, machine)
    assert (plan.attempt, plan.expected, tuple(plan.skipped)) == (attempt, expected, skipped)


def test_fallback_reason_names_the_missing_provider_and_why():
    """Running on anything but the expected provider is a fallback, reported with the reason it was left out."""
    plan = runtime.plan_providers([TENSORRT, CUDA, CPU], NO_GPU)
    reason = runtime.fallback_reason(plan, CPU)
    assert reason.startswith("execution provider CUDAExecutionProvider is not usable") and "libcuda.so.1" in reason
    assert runtime.fallback_reason(runtime.plan_providers([CUDA, CPU], GPU_WITHOUT_TENSORRT), CUDA) is None
    # Tried but not created by ONNX Runtime (e.g. a CUDA library missing): the log has the details.
    assert "could not create it" in runtime.fallback_reason(
        runtime.plan_providers([CUDA, CPU], GPU_WITHOUT_TENSORRT), CPU
    )


@pytest.mark.parametrize(
    "requested, provider, pack, chosen, warns",
    [
        ("auto", CUDA, ("fp32", "fp16"), "fp16", False),
        ("auto", TENSORRT, ("fp32", "fp16"), "fp16", False),
        ("auto", CPU, ("fp32", "fp16"), "fp32", False),
        ("auto", CUDA, ("fp32",), "fp32", False),  # a pack exported with --no-fp16
        ("fp32", CUDA, ("fp32", "fp16"), "fp32", False),
        ("fp16", CUDA, ("fp32", "fp16"), "fp16", False),
        ("fp16", CPU, ("fp32", "fp16"), "fp16", True),  # works, but slower than fp32 on CPU
        ("fp16", CUDA, ("fp32",), "fp32", True),  # not in the pack
    ],
)
def test_precision_choice(requested, provider, pack, chosen, warns):
    """CXR_PRECISION x provider x pack variants -> the variant loaded, with a warning where the choice is poor."""
    precision, warning = runtime.choose_precision(requested, provider, pack)
    assert precision == chosen and (warning is not None) == warns


def test_io_binding_only_on_gpu_providers():
    """Batches are bound on the GPU under CUDA/TensorRT (unless turned off); CPU runs plain run()."""
    assert runtime.io_binding_device(CUDA, Settings(cuda_device_id=2)) == ("cuda", 2)
    assert runtime.io_binding_device(TENSORRT, Settings()) == ("cuda", 0)
    assert runtime.io_binding_device(CPU, Settings()) is None
    assert runtime.io_binding_device(CUDA, Settings(io_binding=False)) is None


def test_missing_gpu_falls_back_to_cpu_with_a_warning(tiny_pack, caplog):
    """Asking for CUDA on a machine without a GPU driver serves on CPU (fp32 under auto) and logs why."""
    pack = ModelPack.load(tiny_pack)
    with caplog.at_level(logging.WARNING, logger="service.inference.modelpack"):
        models = OnnxModels(pack, settings=Settings(providers=[CUDA, CPU], intra_op_threads=1), machine=NO_GPU)
    assert models.runtime.provider == CPU and models.runtime.precision == "fp32" and not models.runtime.io_binding
    assert "CUDAExecutionProvider is not usable" in models.runtime.fallback
    assert any("CUDAExecutionProvider is not usable" in record.getMessage() for record in caplog.records)


def test_variant_follows_the_provider_that_actually_runs(tiny_pack):
    """When ONNX Runtime itself cannot start the CUDA provider, auto reloads fp32 for the CPU that runs instead
    of leaving the fp16 variant on CPU (on a machine whose CUDA works, fp16 runs on CUDA)."""
    pack = ModelPack.load(tiny_pack)
    pretend_gpu = Machine(
        available=tuple(__import__("onnxruntime").get_available_providers()), nvidia_driver=True, tensorrt=False
    )
    if CUDA not in pretend_gpu.available:
        pytest.skip("this onnxruntime build has no CUDA provider")
    models = OnnxModels(pack, settings=Settings(providers=[CUDA, CPU], intra_op_threads=1), machine=pretend_gpu)
    if models.runtime.provider == CPU:
        assert models.runtime.precision == "fp32" and "could not create it" in models.runtime.fallback
        assert models.runtime.files == {"detector": "detector.onnx", "classifier": "classifier.onnx"}
    else:
        assert models.runtime.precision == "fp16" and models.runtime.io_binding


def test_fp16_variant_runs_on_cpu_close_to_fp32(tiny_pack, real_images, caplog):
    """CXR_PRECISION=fp16 on CPU loads the fp16 files (with a warning) and agrees with fp32 on real images
    within the export's fp16 tolerances."""
    pack = ModelPack.load(tiny_pack)
    fp32 = OnnxModels(pack, settings=Settings(providers=[CPU], intra_op_threads=1))
    with caplog.at_level(logging.WARNING, logger="service.inference.modelpack"):
        fp16 = OnnxModels(pack, settings=Settings(providers=[CPU], intra_op_threads=1, precision="fp16"))
    assert fp16.runtime.files == {"detector": "detector.fp16.onnx", "classifier": "classifier.fp16.onnx"}
    assert any("CXR_PRECISION=fp16 on CPUExecutionProvider" in record.getMessage() for record in caplog.records)
    reference, candidate = fp32.run(real_images)[:3], fp16.run(real_images)[:3]  # (heatmaps, if any, follow)
    assert all(output.dtype == np.float32 for output in candidate)
    measured = compare_outputs(reference, candidate, FP16_TOLERANCES)
    assert measured["score"] <= FP16_TOLERANCES.score and measured["probability"] <= FP16_TOLERANCES.probability
    assert measured["box_pixels"] <= FP16_TOLERANCES.box_pixels and measured["top_detections_missed"] == 0


def test_io_bound_run_equals_plain_run(tiny_pack, real_images):
    """The IO-binding path used on GPUs (one input OrtValue for both models, outputs bound to host memory) gives
    exactly what plain run() gives; exercised here with the value on the CPU device."""
    models = OnnxModels(ModelPack.load(tiny_pack), settings=Settings(providers=[CPU], intra_op_threads=1))
    for plain, bound in zip(models.run(real_images), models.run_bound(real_images, real_images, "cpu", 0)):
        np.testing.assert_array_equal(plain, bound)


def test_models_endpoint_reports_the_runtime_in_effect(client):
    """/v1/models states the provider in use, the variant loaded, IO binding, and the options in effect."""
    body = client.get("/v1/models").json()
    assert body["precisions"] == ["fp32", "fp16"]
    described = body["runtime"]
    assert (
        described["provider"] == CPU and described["providers"] == [CPU] and described["requested_providers"] == [CPU]
    )
    assert described["precision"] == "fp32" and described["files"] == {
        "detector": "detector.onnx",
        "classifier": "classifier.onnx",
    }
    assert described["io_binding"] is False and described["provider_options"] == {CPU: {}}
    assert described["session_options"] == {
        "intra_op_threads": 0,
        "inter_op_threads": 1,
        "intra_op_spinning": False,
        "execution_mode": "sequential",
        "graph_optimization_level": "all",
    }
    assert described["fallback"] is None and described["warnings"] == []


def _nvidia_gpu_present() -> bool:
    return runtime.probe_machine([CUDA]).nvidia_driver


@pytest.mark.gpu
@pytest.mark.skipif(not _nvidia_gpu_present(), reason="needs an NVIDIA GPU")
def test_cuda_serves_fp16_with_io_binding_close_to_cpu(tiny_pack, real_images):
    """On a GPU, auto serves the fp16 variant on CUDA through IO binding, within the fp16 tolerances of CPU fp32;
    CUDA fp32 (TF32 off) stays within the fp32 export tolerances."""
    from training.export import FP32_TOLERANCES

    pack = ModelPack.load(tiny_pack)
    cpu = OnnxModels(pack, settings=Settings(providers=[CPU])).run(real_images)[:3]
    fp16 = OnnxModels(pack, settings=Settings(providers=[CUDA, CPU]))
    assert (fp16.runtime.provider, fp16.runtime.precision, fp16.runtime.io_binding) == (CUDA, "fp16", True), (
        fp16.runtime
    )
    assert fp16.runtime.provider_options[CUDA]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    measured = compare_outputs(cpu, fp16.run(real_images)[:3], FP16_TOLERANCES)
    assert measured["probability"] <= FP16_TOLERANCES.probability and measured["top_detections_missed"] == 0
    fp32 = OnnxModels(pack, settings=Settings(providers=[CUDA, CPU], precision="fp32"))
    assert fp32.runtime.provider_options[CUDA]["use_tf32"] == "0"
    measured = compare_outputs(cpu, fp32.run(real_images), FP32_TOLERANCES)
    assert (
        measured["probability"] <= FP32_TOLERANCES.probability and measured["box_pixels"] <= FP32_TOLERANCES.box_pixels
    )
