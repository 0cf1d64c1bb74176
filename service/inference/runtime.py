"""ONNX Runtime configuration (README "ONNX Runtime and GPUs"): providers, options, precision variant, IO binding.

Every decision is a pure function of the settings and of what the machine offers (`Machine`, probed
once at load), so the GPU path's choices are unit-tested on CPU-only machines;
`service.inference.modelpack.OnnxModels` applies them and reports what is in effect (`RuntimeDescription`).

- Providers: TensorRT (when its libraries are installed) -> CUDA -> CPU by default. Providers this
  machine cannot run are left out with the reason; if the models end up anywhere but the expected
  provider, that is a fallback: a warning, or an unready service under CXR_STRICT_PROVIDERS.
- Precision: CXR_PRECISION=auto serves the pack's fp16 variant on CUDA/TensorRT and fp32 on CPU,
  where ONNX Runtime has few float16 kernels and casts most nodes back to float32 (slower, no gain).
- IO binding: on a GPU each batch is copied to the device once and both models read it there.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from service.settings import Settings

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
Precision = Literal["fp32", "fp16"]
MIB = 1024 * 1024

# Libraries whose absence means a provider cannot start: probing them costs one dlopen each, where
# letting ONNX Runtime find out prints a page of errors for every session it creates.
NVIDIA_DRIVER_LIBRARY = "libcuda.so.1"
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")  # what onnxruntime-gpu's TensorRT EP links


@dataclass(frozen=True)
class Machine:
    """What this process can run on."""

    available: tuple[str, ...]  # providers compiled into this onnxruntime build
    nvidia_driver: bool  # an NVIDIA driver (and so a GPU) is present
    tensorrt: bool  # TensorRT's libraries load


@dataclass(frozen=True)
class ProviderPlan:
    attempt: tuple[str, ...]  # handed to ONNX Runtime in this order; CPU always last
    expected: str  # the provider that should end up running the models
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it was left out


@dataclass(frozen=True)
class RuntimeDescription:
    """What the sessions actually run with: /v1/models and the startup log report it."""

    provider: str
    providers: list[str]
    requested_providers: list[str]
    precision: Precision
    files: dict[str, str]  # model -> file name of the variant loaded
    io_binding: bool
    provider_options: dict[str, dict[str, str]]  # as ONNX Runtime reports them for the providers in use
    session_options: dict[str, object]
    fallback: str | None = None  # why the expected provider is not the one in use
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        options = self.provider_options.get(self.provider) or {}
        return (
            f"{self.provider} ({', '.join(self.providers)}), {self.precision} "
            f"({', '.join(self.files.values())}), IO binding {'on' if self.io_binding else 'off'}, "
            f"session {self.session_options}" + (f", {self.provider} options {options}" if options else "")
        )


# ---------------------------------------------------------------------------------------------------
# Probing the machine (the only impure part besides OnnxModels itself)


def _loads(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


@cache
def preload_gpu_libraries() -> None:
    """Load CUDA, cuDNN and TensorRT from the nvidia-* / tensorrt pip packages, once per process.

    The service never imports torch, which is what usually puts these on the loader's path; without
    this, onnxruntime-gpu cannot find them and quietly runs on CPU. Libraries on LD_LIBRARY_PATH work too.
    """
    captured = io.StringIO()
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    with contextlib.redirect_stdout(captured):  # onnxruntime prints what it could not load; log it instead
        try:
            if preload is not None:
                preload(directory="")
        except Exception as exc:  # a missing optional library must not stop a CPU fallback
            print(f"onnxruntime.preload_dlls failed: {exc}")
    if captured.getvalue().strip():
        log.warning("loading the CUDA libraries: %s", " ".join(captured.getvalue().split()))
    spec = importlib.util.find_spec("tensorrt_libs")  # TensorRT's pip wheel keeps its libraries there
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        for library in TENSORRT_LIBRARIES:
            if (folder / library).is_file():
                _loads(str(folder / library))


def probe_machine(wanted: Sequence[str]) -> Machine:
    """The machine as it matters for `wanted`: GPU libraries are loaded only when a GPU provider is wanted."""
    available = tuple(ort.get_available_providers())
    driver = any(provider in GPU_PROVIDERS for provider in wanted) and _loads(NVIDIA_DRIVER_LIBRARY)
    if driver:
        preload_gpu_libraries()
    tensorrt = driver and TENSORRT in wanted and all(_loads(library) for library in TENSORRT_LIBRARIES)
    return Machine(available=available, nvidia_driver=driver, tensorrt=tensorrt)


# ---------------------------------------------------------------------------------------------------
# Decisions (pure)


def unusable_reason(provider: str, machine: Machine) -> str | None:
    """Why `provider` cannot run on `machine`, or None when it can be tried."""
    if provider not in machine.available:
        return f"not part of this onnxruntime build, which has {', '.join(machine.available)}"
    if provider in GPU_PROVIDERS and not machine.nvidia_driver:
        return f"no NVIDIA GPU driver: {NVIDIA_DRIVER_LIBRARY} does not load"
    if provider == TENSORRT and not machine.tensorrt:
        return f"TensorRT is not installed ({', '.join(TENSORRT_LIBRARIES)} do not load)"
    return None


def plan_providers(wanted: Sequence[str], machine: Machine) -> ProviderPlan:
    """Which providers to hand ONNX Runtime, and which one must end up running the models.

    TensorRT followed by CUDA is opportunistic: without TensorRT's libraries, CUDA is what runs and
    is expected, no fallback. Any other unusable provider stays expected, so running elsewhere is a
    fallback that is reported (and refused under CXR_STRICT_PROVIDERS).
    """
    wanted = list(dict.fromkeys(wanted)) or [CPU]
    attempt: list[str] = []
    skipped: dict[str, str] = {}
    expected: str | None = None
    for index, provider in enumerate(wanted):
        reason = unusable_reason(provider, machine)
        optional = provider == TENSORRT and CUDA in wanted[index + 1 :]
        if reason is None:
            attempt.append(provider)
        else:
            skipped[provider] = reason
        if expected is None and (reason is None or not optional):
            expected = provider
    if CPU not in attempt:
        attempt.append(CPU)  # ONNX Runtime's own last resort, made explicit
    return ProviderPlan(attempt=tuple(attempt), expected=expected or CPU, skipped=skipped)


def fallback_reason(plan: ProviderPlan, in_use: str) -> str | None:
    """None when the expected provider runs the models, else a sentence saying why it does not."""
    if in_use == plan.expected:
        return None
    why = plan.skipped.get(plan.expected) or "ONNX Runtime could not create it; its log above says why"
    return f"execution provider {plan.expected} is not usable on this machine ({why}); the models run on {in_use}"


def choose_precision(requested: str, provider: str, pack_precisions: Sequence[str]) -> tuple[Precision, str | None]:
    """(variant to load, warning or None) for CXR_PRECISION=`requested` on `provider`."""
    on_gpu = provider in GPU_PROVIDERS
    if requested == "auto":
        return ("fp16" if on_gpu and "fp16" in pack_precisions else "fp32"), None
    if requested not in pack_precisions:
        return "fp32", f"CXR_PRECISION={requested} but the pack has only {', '.join(pack_precisions)}: loading fp32"
    if requested == "fp16" and not on_gpu:
        return "fp16", (
            f"CXR_PRECISION=fp16 on {provider}: ONNX Runtime has few float16 CPU kernels and casts "
            "most nodes back to float32, so this is slower than fp32 and no more accurate"
        )
    return requested, None  # type: ignore[return-value]


def _flag(value: bool) -> str:
    return "1" if value else "0"


def cuda_provider_options(settings: Settings) -> dict[str, str]:
    """CUDA execution provider options (ONNX Runtime takes them as strings)."""
    options = {
        "device_id": str(settings.cuda_device_id),
        # EXHAUSTIVE benchmarks cuDNN's kernels once per input shape; warm-up runs every batch shape.
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "arena_extend_strategy": settings.cuda_arena_extend_strategy,
        "do_copy_in_default_stream": _flag(settings.cuda_copy_in_default_stream),
        "cudnn_conv_use_max_workspace": _flag(settings.cudnn_conv_use_max_workspace),
        # ONNX Runtime enables TF32 by default, which rounds float32 convolutions to a 10-bit mantissa.
        "use_tf32": _flag(settings.cuda_use_tf32),
    }
    if settings.cuda_gpu_mem_limit_mb is not None:
        options["gpu_mem_limit"] = str(settings.cuda_gpu_mem_limit_mb * MIB)
    return options


def tensorrt_cache_dir(root: Path, model_sha256: str) -> Path:
    """One engine cache folder per model file: an engine built for other weights is never picked up."""
    return root.expanduser() / model_sha256[:16]


def tensorrt_provider_options(
    settings: Settings, precision: Precision, input_name: str, input_size: int, model_sha256: str
) -> dict[str, str]:
    """TensorRT execution provider options for one model."""

    def shape(batch: int) -> str:
        return f"{input_name}:{batch}x1x{input_size}x{input_size}"

    options = {
        "device_id": str(settings.cuda_device_id),
        "trt_fp16_enable": _flag(precision == "fp16"),
        "trt_max_workspace_size": str(settings.trt_max_workspace_mb * MIB),
        # One optimisation profile covering every batch the batcher forms: a single engine build,
        # instead of a rebuild whenever a larger batch first arrives.
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(settings.max_batch_size),
        "trt_profile_max_shapes": shape(settings.max_batch_size),
        "trt_engine_cache_enable": _flag(settings.trt_engine_cache),
    }
    if settings.trt_engine_cache:
        folder = str(tensorrt_cache_dir(settings.trt_engine_cache_dir, model_sha256))
        options |= {"trt_engine_cache_path": folder, "trt_timing_cache_enable": "1", "trt_timing_cache_path": folder}
    return options


def provider_options(
    providers: Sequence[str],
    settings: Settings,
    precision: Precision,
    input_name: str,
    input_size: int,
    model_sha256: str,
) -> list[dict[str, str]]:
    """Options for each provider of `providers`, in the same order (ONNX Runtime's provider_options)."""
    built = {
        TENSORRT: lambda: tensorrt_provider_options(settings, precision, input_name, input_size, model_sha256),
        CUDA: lambda: cuda_provider_options(settings),
    }
    return [built[provider]() if provider in built else {} for provider in providers]


def session_settings(settings: Settings) -> dict[str, object]:
    return {
        "intra_op_threads": settings.intra_op_threads,
        "inter_op_threads": settings.inter_op_threads,
        "intra_op_spinning": settings.intra_op_spinning,
        # One batch at a time flows through each chain-like CNN: running nodes in parallel only adds
        # scheduling overhead, and the batcher already keeps one inference in flight.
        "execution_mode": "sequential",
        "graph_optimization_level": "all",
    }


def session_options(settings: Settings) -> ort.SessionOptions:
    described = session_settings(settings)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(described["intra_op_threads"])  # type: ignore[arg-type]
    options.inter_op_num_threads = int(described["inter_op_threads"])  # type: ignore[arg-type]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads burn the cores the decode pool needs between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if described["intra_op_spinning"] else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def io_binding_device(provider: str, settings: Settings) -> tuple[str, int] | None:
    """Where each batch is placed once for both models: the GPU under CUDA/TensorRT (one host-to-device
    copy instead of one per model); None on CPU, where run() reads the numpy array in place."""
    if settings.io_binding and provider in GPU_PROVIDERS:
        return "cuda", settings.cuda_device_id
    return None
