"""python -m service.triton_repository: a model pack as a Triton model repository; every config parsed with
Triton's own ModelConfig protobuf (tritonclient's model_config_pb2, through protobuf's text_format)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from service import triton_repository
from service.inference.modelpack import MODELS, ModelPack
from service.inference.triton.repository import (
    SHA256_PARAMETER,
    RepositoryError,
    ServingOptions,
    default_preferred_batch_sizes,
    onnx_signature,
    python_backend_source,
    write_repository,
)


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def export(pack: Path, out: Path, backend: str, *extra: str) -> int:
    args = triton_repository.get_args_parser().parse_args(
        ["--pack", str(pack), "--out", str(out), "--backend", backend, *extra]
    )
    return triton_repository.main(args)


@pytest.fixture(scope="module")
def repositories(tiny_pack, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton")
    written = {}
    for backend in ("onnxruntime", "python"):
        assert export(tiny_pack, root / backend, backend) == 0
        written[backend] = root / backend
    return written


def test_command_line_writes_a_repository(tiny_pack, tmp_path):
    """The exact command of the issue writes both models, the version folders and the manifest, and says so."""
    out = tmp_path / "repo"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.triton_repository",
            *("--pack", tiny_pack, "--out", out, "--backend", "python"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "detector/config.pbtxt" in done.stdout and "tritonserver --model-repository" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["classifier", "detector", "manifest.json"]
    assert (out / "manifest.json").read_bytes() == (tiny_pack / "manifest.json").read_bytes()
    for model in MODELS:
        assert sorted(p.name for p in (out / model / "1").iterdir()) == ["model.onnx", "model.py"]


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_every_config_parses_as_tritons_model_config(repositories, tiny_pack, backend):
    """Each config.pbtxt parses with Triton's protobuf and carries the pack's tensors, batching and identity."""
    pack = ModelPack.load(tiny_pack)
    for model in MODELS:
        config = parse(repositories[backend] / model / "config.pbtxt")
        onnx_file = repositories[backend] / model / "1" / "model.onnx"
        signature = onnx_signature(onnx_file)
        assert config.name == model
        assert config.max_batch_size == 16
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert [(t.name, list(t.dims)) for t in config.input] == [("images", [1, 128, 128])]
        assert [(t.name, list(t.dims)) for t in config.output] == [(t.name, list(t.dims)) for t in signature.outputs]
        assert [t.name for t in config.output] == pack.manifest[model]["outputs"]
        assert all(t.data_type == mc.TYPE_FP32 for t in [*config.input, *config.output])
        sha256 = config.parameters[SHA256_PARAMETER].string_value
        assert sha256 == pack.model_sha256(model) == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
        assert config.parameters["cxr_pack"].string_value == pack.name
        assert [(w.batch_size, w.inputs["images"].zero_data) for w in config.model_warmup] == [(1, True), (16, True)]
        (group,) = config.instance_group
        assert group.count == 1


def test_onnxruntime_flavour_runs_on_gpus_with_tensorrt_fp16(repositories):
    """The production flavour: ONNX Runtime backend, GPU instances, TensorRT fp16 with an engine cache per file."""
    config = parse(repositories["onnxruntime"] / "detector" / "config.pbtxt")
    assert (config.backend, config.platform, config.default_model_filename) == (
        "onnxruntime",
        "onnxruntime_onnx",
        "model.onnx",
    )
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert accelerator.parameters["trt_engine_cache_path"].endswith(
        config.parameters[SHA256_PARAMETER].string_value[:16]
    )


def test_python_flavour_ships_the_packaged_model(repositories):
    """--backend python: CPU instances of Triton's Python backend, model.py as shipped with the service."""
    config = parse(repositories["python"] / "classifier" / "config.pbtxt")
    assert config.backend == "python" and not config.platform
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.parameters["onnx_file"].string_value == "model.onnx"
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert (repositories["python"] / "classifier" / "1" / "model.py").read_text() == python_backend_source()


def test_serving_options_reach_the_configs(tiny_pack, tmp_path):
    """Batch size, preferred sizes, queue delay, instances, CPU kind, fp16 files and TensorRT off are all honoured."""
    out = tmp_path / "repo"
    flags = ["--max-batch-size", "8", "--preferred-batch-sizes", "2", "8", "--max-queue-delay-us", "500"]
    flags += ["--instances", "3", "--instance-kind", "cpu", "--precision", "fp16", "--cpu-threads", "2"]
    assert export(tiny_pack, out, "onnxruntime", *flags) == 0
    config = parse(out / "detector" / "config.pbtxt")
    pack = ModelPack.load(tiny_pack)
    assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [2, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert (config.instance_group[0].count, config.instance_group[0].kind) == (3, mc.ModelInstanceGroup.KIND_CPU)
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator  # no TensorRT on CPU
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert config.parameters[SHA256_PARAMETER].string_value == pack.model_sha256("detector", "fp16")
    gpu = tmp_path / "gpu"
    assert export(tiny_pack, gpu, "onnxruntime", "--tensorrt", "off") == 0
    assert not parse(gpu / "detector" / "config.pbtxt").optimization.execution_accelerators.gpu_execution_accelerator
    assert default_preferred_batch_sizes(1) == (1,) and default_preferred_batch_sizes(16) == (8, 16)


def test_existing_folders_are_refused_unless_forced(tiny_pack, tmp_path, capsys):
    """A non-empty --out is refused; --force replaces only a repository this command wrote, never other files."""
    out = tmp_path / "repo"
    assert export(tiny_pack, out, "python") == 0
    assert export(tiny_pack, out, "onnxruntime") == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert parse(out / "detector" / "config.pbtxt").backend == "python"  # untouched
    assert export(tiny_pack, out, "onnxruntime", "--force") == 0
    assert parse(out / "detector" / "config.pbtxt").backend == "onnxruntime"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging or retired folders left behind

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert export(tiny_pack, foreign, "python", "--force") == 2
    assert "not replacing it, even with --force" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"

    assert export(tiny_pack, tiny_pack / "triton", "python") == 2
    assert "inside the pack" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(tiny_pack, empty, "python") == 0


def test_bad_packs_and_options_are_clear_errors(tiny_pack, tmp_path, capsys):
    """A missing or tampered pack and impossible options are one-line errors (exit 2), and nothing is written."""
    assert export(tmp_path / "nowhere", tmp_path / "a", "python") == 2
    assert "no manifest.json" in capsys.readouterr().err
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_pack, tampered)
    with (tampered / "classifier.onnx").open("ab") as handle:
        handle.write(b"\0")
    assert export(tampered, tmp_path / "b", "python") == 2
    assert "truncated or was replaced" in capsys.readouterr().err
    assert export(tiny_pack, tmp_path / "c", "python", "--max-batch-size", "4", "--preferred-batch-sizes", "8") == 2
    assert "outside 1..4" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
    with pytest.raises(SystemExit):
        triton_repository.get_args_parser().parse_args(["--pack", "p", "--out", "o", "--backend", "tensorflow"])


# A pack whose models differ from the demo's as other work may make them: the classifier at another input size
# than the detector, and with an extra output. Names and dimensions must follow the graph and the manifest.


def tiny_graph(model: str, size: int, outputs: dict[str, list[int]]) -> onnx.ModelProto:
    """images (batch, 1, size, size) -> each output broadcast from the image mean to (batch, *dims)."""
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=1),
    ]
    initializers = []
    graph_outputs = []
    for name, dims in outputs.items():
        initializers += [
            helper.make_tensor(f"{name}_reshape", TensorProto.INT64, [len(dims) + 1], [-1] + [1] * len(dims)),
            helper.make_tensor(f"{name}_shape", TensorProto.INT64, [len(dims) + 1], [1, *dims]),
        ]
        nodes += [
            helper.make_node("Reshape", ["mean", f"{name}_reshape"], [f"{name}_flat"]),
            helper.make_node("Expand", [f"{name}_flat", f"{name}_shape"], [name]),
        ]
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims]))
    graph = helper.make_graph(
        nodes,
        model,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, size, size])],
        graph_outputs,
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_names_and_dims_come_from_the_graph_and_manifest(tiny_pack, tmp_path):
    """Models with different input sizes and an extra output export as they are: nothing is hard-coded."""
    pack = tmp_path / "pack"
    pack.mkdir()
    manifest = json.loads((tiny_pack / "manifest.json").read_text())
    shapes = {
        "detector": (64, {"boxes": [10, 4], "scores": [10, 3]}),
        "classifier": (96, {"probabilities": [2], "heatmaps": [2, 12, 12]}),
    }
    for model, (size, outputs) in shapes.items():
        path = pack / f"{model}.onnx"
        onnx.save(tiny_graph(model, size, outputs), path)
        manifest[model] |= {
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "outputs": list(outputs),
            "input": {"name": "images", "size": size},
            "variants": {},
        }
    (pack / "manifest.json").write_text(json.dumps(manifest))
    session = ort.InferenceSession(str(pack / "classifier.onnx"), providers=["CPUExecutionProvider"])
    heatmaps = session.run(["heatmaps"], {"images": np.zeros((3, 1, 96, 96), np.float32)})[0]
    assert heatmaps.shape == (3, 2, 12, 12)  # the stand-in graph really has the shapes it declares

    out = tmp_path / "repo"
    assert export(pack, out, "onnxruntime") == 0
    detector = parse(out / "detector" / "config.pbtxt")
    classifier = parse(out / "classifier" / "config.pbtxt")
    assert list(detector.input[0].dims) == [1, 64, 64] and list(classifier.input[0].dims) == [1, 96, 96]
    assert [(t.name, list(t.dims)) for t in classifier.output] == [("probabilities", [2]), ("heatmaps", [2, 12, 12])]
    assert [(t.name, list(t.dims)) for t in detector.output] == [("boxes", [10, 4]), ("scores", [10, 3])]

    manifest["classifier"]["outputs"] = ["probabilities", "attention"]
    (pack / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match=r"no output\(s\) \['attention'\]"):
        write_repository(ModelPack.load(pack), tmp_path / "other", "python", ServingOptions())
