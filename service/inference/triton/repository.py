"""A model pack as an NVIDIA Triton model repository (scale-out, docs/architecture.md), without torch.

    DIR/
      manifest.json                  the pack's manifest, beside the models (Triton skips files at the top)
      detector/config.pbtxt          max batch size, dynamic batching, instance groups, tensors, pack identity
      detector/1/model.onnx          the pack's ONNX file (version folder 1)
      detector/1/model.py            --backend python only: service/inference/triton/python_backend/model.py
      classifier/...                 the same for the classifier

Two flavours: `onnxruntime` (Triton's ONNX Runtime backend; on GPUs with TensorRT as execution accelerator,
fp16 by default) for production, and `python` (Triton's Python backend running ONNX Runtime on CPU on the same
ONNX files) for machines without a GPU or that Triton build, such as CI.

Every tensor name, data type and dimension comes from the ONNX graph and is checked against the manifest, so a
pack whose models differ (other input sizes per model, extra outputs) exports without a change here. Configs
are built as Triton's own `ModelConfig` protobuf (tritonclient ships it), so a misspelt field cannot be written.
Each config carries the pack's identity (name, version, sha256 of the ONNX file) as parameters: the service
compares it with its own copy of the pack before it sends a single image (service/inference/kserve.py).
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.inference.modelpack import CLASSIFIER_OUTPUTS, DETECTOR_OUTPUTS, INPUT_NAME, MODELS, ModelPack, sha256_of

Backend = Literal["onnxruntime", "python"]
BACKENDS: tuple[Backend, ...] = ("onnxruntime", "python")
MODEL_VERSION = "1"
MODEL_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"

# Config parameters naming what a model is; the service checks them against its pack (service/inference/kserve.py).
PACK_PARAMETER = "cxr_pack"
PACK_VERSION_PARAMETER = "cxr_pack_version"
SHA256_PARAMETER = "cxr_onnx_sha256"
PRECISION_PARAMETER = "cxr_precision"

# ONNX Runtime's tensor types -> Triton's.
ONNX_TO_TRITON = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
}
DEFAULT_OUTPUTS = {"detector": DETECTOR_OUTPUTS, "classifier": CLASSIFIER_OUTPUTS}


class RepositoryError(ValueError):
    """The pack cannot be exported as asked (models it cannot batch, names that disagree, a bad out dir)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton's name, e.g. TYPE_FP32
    dims: tuple[int, ...]  # without the batch axis; -1 where the graph leaves a dimension open


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


@dataclass(frozen=True)
class ServingOptions:
    """How Triton serves each model; the CLI's flags."""

    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (8, 16)
    max_queue_delay_us: int = 2000
    instances: int = 1
    instance_kind: Literal["gpu", "cpu"] = "gpu"  # onnxruntime flavour; the python flavour always runs on CPU
    precision: Literal["fp32", "fp16"] = "fp32"  # which of the pack's ONNX files to ship
    tensorrt: Literal["fp16", "fp32", "off"] = "fp16"  # onnxruntime flavour on GPU
    tensorrt_workspace_mb: int = 2048
    tensorrt_cache_dir: str = "/tmp/triton-tensorrt-cache"  # on the Triton host; one folder per ONNX file
    cpu_threads: int = 0  # ONNX Runtime intra-op threads per instance (0: ONNX Runtime's default, one per core)


def default_preferred_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Half the maximum and the maximum: batches Triton forms without waiting out the whole queue delay."""
    return tuple(sorted({max(1, max_batch_size // 2), max_batch_size}))


def onnx_signature(path: Path) -> Signature:
    """Input and output tensors of an ONNX file as Triton sees them (batch axis removed).

    Read through ONNX Runtime (the service's own dependency; the onnx package is a training extra), with graph
    optimisation off so that opening even a large model is quick.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def tensor(arg: ort.NodeArg) -> Tensor:
        if arg.type not in ONNX_TO_TRITON:
            raise RepositoryError(f"{path.name}: tensor {arg.name} has type {arg.type}, which Triton cannot serve")
        shape = list(arg.shape)
        if not shape or isinstance(shape[0], int):
            # Triton batches along the first axis; a fixed one (or none) cannot take batches of any size.
            raise RepositoryError(
                f"{path.name}: tensor {arg.name} has shape {shape}, without a dynamic batch axis first"
            )
        return Tensor(arg.name, ONNX_TO_TRITON[arg.type], tuple(d if isinstance(d, int) else -1 for d in shape[1:]))

    return Signature(
        inputs=tuple(tensor(arg) for arg in session.get_inputs()),
        outputs=tuple(tensor(arg) for arg in session.get_outputs()),
    )


def manifest_names(pack: ModelPack, model: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) the manifest gives `model`; a model's own "input" entry overrides the pack's."""
    entry = pack.manifest[model]
    model_input = entry.get("input") or pack.manifest.get("input") or {}
    outputs = entry.get("outputs") or DEFAULT_OUTPUTS.get(model, ())
    return (model_input.get("name", INPUT_NAME),), tuple(outputs)


def checked_signature(pack: ModelPack, model: str, precision: str) -> Signature:
    """The ONNX graph's signature, after checking that it has exactly the tensors the manifest names."""
    path = pack.model_file(model, precision)
    signature = onnx_signature(path)
    inputs, outputs = manifest_names(pack, model)
    graph_inputs = tuple(tensor.name for tensor in signature.inputs)
    graph_outputs = tuple(tensor.name for tensor in signature.outputs)
    if set(graph_inputs) != set(inputs):
        raise RepositoryError(f"{path.name} takes inputs {list(graph_inputs)}, the manifest says {list(inputs)}")
    missing = [name for name in outputs if name not in graph_outputs]
    if missing:
        raise RepositoryError(f"{path.name} has no output(s) {missing} (it has {list(graph_outputs)})")
    # Serve what the manifest lists, in its order (an ONNX file may carry more outputs than the service reads).
    by_name = {tensor.name: tensor for tensor in signature.outputs}
    return Signature(inputs=signature.inputs, outputs=tuple(by_name[name] for name in outputs))


def check_options(options: ServingOptions) -> None:
    if options.max_batch_size < 1:
        raise RepositoryError("--max-batch-size must be at least 1")
    wrong = [size for size in options.preferred_batch_sizes if not 1 <= size <= options.max_batch_size]
    if wrong:
        raise RepositoryError(f"preferred batch sizes {wrong} are outside 1..{options.max_batch_size}")
    if options.instances < 1:
        raise RepositoryError("--instances must be at least 1")
    if options.max_queue_delay_us < 0 or options.cpu_threads < 0:
        raise RepositoryError("--max-queue-delay-us and --cpu-threads cannot be negative")


def _tensor_config(tensor: Tensor, message_type: type) -> object:
    return message_type(name=tensor.name, data_type=mc.DataType.Value(tensor.data_type), dims=list(tensor.dims))


def _string_parameters(config: mc.ModelConfig, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def model_config(
    model: str,
    signature: Signature,
    backend: Backend,
    options: ServingOptions,
    identity: dict[str, str],
) -> mc.ModelConfig:
    """config.pbtxt of one model, as Triton's protobuf message."""
    config = mc.ModelConfig(
        name=model,
        max_batch_size=options.max_batch_size,
        input=[_tensor_config(tensor, mc.ModelInput) for tensor in signature.inputs],
        output=[_tensor_config(tensor, mc.ModelOutput) for tensor in signature.outputs],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=sorted(set(options.preferred_batch_sizes)),
            max_queue_delay_microseconds=options.max_queue_delay_us,
        ),
    )
    on_gpu = backend == "onnxruntime" and options.instance_kind == "gpu"
    kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.append(mc.ModelInstanceGroup(count=options.instances, kind=kind))
    if backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.backend = "onnxruntime"
        config.default_model_filename = MODEL_FILE
        if on_gpu and options.tensorrt != "off":
            accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            accelerator.parameters["precision_mode"] = options.tensorrt.upper()
            accelerator.parameters["max_workspace_size_bytes"] = str(options.tensorrt_workspace_mb * 1024 * 1024)
            # An engine build takes minutes; cached per ONNX file so other weights never pick up a stale one.
            accelerator.parameters["trt_engine_cache_enable"] = "1"
            accelerator.parameters["trt_engine_cache_path"] = (
                f"{options.tensorrt_cache_dir.rstrip('/')}/{model}-{identity[SHA256_PARAMETER][:16]}"
            )
        if options.cpu_threads:
            _string_parameters(config, {"intra_op_thread_count": str(options.cpu_threads)})
    else:
        config.backend = "python"
        _string_parameters(config, {"onnx_file": MODEL_FILE, "intra_op_num_threads": str(options.cpu_threads)})
    _string_parameters(config, identity)
    # Warm before ready, as in-process serving is: the smallest and the largest batch (a TensorRT engine, the
    # CPU arena) are built while the model loads, not by the first requests.
    if all(dim > 0 for tensor in signature.inputs for dim in tensor.dims):
        for batch in sorted({1, options.max_batch_size}):
            warmup = config.model_warmup.add(name=f"zeros-batch-{batch}", batch_size=batch)
            for tensor in signature.inputs:
                warmup.inputs[tensor.name].CopyFrom(
                    mc.ModelWarmup.Input(
                        data_type=mc.DataType.Value(tensor.data_type), dims=list(tensor.dims), zero_data=True
                    )
                )
    return config


def config_text(config: mc.ModelConfig, comment: str) -> str:
    """The protobuf text format Triton reads, after `#` comment lines."""
    header = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    return header + text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    """A config.pbtxt read back as Triton reads it (unknown or misspelt fields raise text_format.ParseError)."""
    return text_format.Parse(text, mc.ModelConfig())


def pack_identity(pack: ModelPack, model: str, precision: str) -> dict[str, str]:
    return {
        PACK_PARAMETER: pack.name,
        PACK_VERSION_PARAMETER: pack.version,
        SHA256_PARAMETER: pack.model_sha256(model, precision),
        PRECISION_PARAMETER: precision,
    }


def python_backend_source() -> str:
    """The Python-backend model shipped with the service (package data)."""
    return (importlib.resources.files("service.inference.triton") / "python_backend" / PYTHON_MODEL_FILE).read_text()


def _comment(pack: ModelPack, model: str, backend: Backend, options: ServingOptions) -> str:
    where = {
        "onnxruntime": "Triton's ONNX Runtime backend"
        + (
            f", TensorRT {options.tensorrt} on GPU"
            if options.instance_kind == "gpu" and options.tensorrt != "off"
            else ""
        )
        + f", {options.instance_kind.upper()} instances",
        "python": "Triton's Python backend running ONNX Runtime on CPU (model.py beside the ONNX file)",
    }[backend]
    return (
        f"{model.capitalize()} of model pack {pack.name} {pack.version} ({options.precision} ONNX file),\n"
        f"served by {where}.\nWritten by `python -m service.triton_repository`; regenerate rather than edit."
    )


def is_previous_export(folder: Path) -> bool:
    """A folder this module wrote: a pack manifest at its top (what --force may replace)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("cxr-model-pack/")


def check_out_dir(out: Path, pack: ModelPack, force: bool) -> None:
    """Refuse to write where something else lives: a non-empty folder is replaced only with --force, and only
    when it is a repository this command wrote before."""
    out = out.resolve()
    if out == pack.path.resolve() or pack.path.resolve() in out.parents:
        raise RepositoryError(f"--out {out} is inside the pack {pack.path}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise RepositoryError(f"--out {out} is not empty; pass --force to replace a repository written before")
        if not is_previous_export(out):
            raise RepositoryError(
                f"--out {out} is not empty and is not a model repository written by this command "
                "(no pack manifest.json at its top): not replacing it, even with --force"
            )


def write_model(folder: Path, pack: ModelPack, model: str, backend: Backend, options: ServingOptions) -> Path:
    """detector/ or classifier/: config.pbtxt and the version folder; returns the config's path."""
    signature = checked_signature(pack, model, options.precision)
    identity = pack_identity(pack, model, options.precision)
    config = model_config(model, signature, backend, options, identity)
    version = folder / model / MODEL_VERSION
    version.mkdir(parents=True)
    source = pack.model_file(model, options.precision)
    shutil.copyfile(source, version / MODEL_FILE)
    if sha256_of(version / MODEL_FILE) != identity[SHA256_PARAMETER]:
        raise RepositoryError(f"copying {source} to {version} changed it (disk full?)")
    if backend == "python":
        (version / PYTHON_MODEL_FILE).write_text(python_backend_source())
    config_path = folder / model / "config.pbtxt"
    text = config_text(config, _comment(pack, model, backend, options))
    parse_config(text)  # what Triton will read must parse back
    config_path.write_text(text)
    return config_path


def write_repository(
    pack: ModelPack, out: Path, backend: Backend, options: ServingOptions, force: bool = False
) -> list[Path]:
    """Write the repository at `out` (built beside it, then moved into place: never half-written); the configs."""
    if backend not in BACKENDS:
        raise RepositoryError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_options(options)
    if options.precision not in pack.precisions:
        raise RepositoryError(
            f"pack {pack.name} has no {options.precision} files (it has {', '.join(pack.precisions)})"
        )
    check_out_dir(out, pack, force)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        configs = [write_model(staging, pack, model, backend, options) for model in MODELS]
        shutil.copyfile(pack.path / "manifest.json", staging / "manifest.json")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the repository from a Triton running as another user
        _replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / path.relative_to(staging) for path in configs]


def _replace(out: Path, staging: Path) -> None:
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(retired / out.name)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)
