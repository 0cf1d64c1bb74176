"""Per-disease heatmaps: class activation maps (CAM, Zhou et al. 2016) as an extra output of the classifier graph.

Every classifier of `training.models` ends in global average pooling and one linear layer, so the logit of
label k is

    z_k = b_k + sum_c W_kc * mean_ij F_cij  =  mean_ij (b_k + sum_c W_kc * F_cij)  =  mean_ij M_kij

where F (C x h x w) is the last feature map. The map M_k = W_k . F + b_k is therefore exact: no gradients, no
approximation, and its mean over the map *is* the logit the label's probability comes from
(sigmoid(mean(M_k)) = p_k). In the graph it is a 1 x 1 convolution of F with the head's weights and bias,
a few thousand multiply-adds per location beside the backbone's millions, and it leaves the `probabilities`
output untouched: the nodes that compute it are not changed, only read from.

`add_heatmap_output` finds that structure in an exported ONNX classifier (Sigmoid <- Gemm or MatMul + Add <-
reshape-like nodes <- GlobalAveragePool or ReduceMean over the two spatial axes <- F) and adds the output
`heatmaps` (N, K, h, w): float32 logit maps at feature resolution (the input size / the backbone's stride).
A graph without that structure raises `HeatmapsUnsupported` saying what it found instead, which is how an
architecture that cannot have exact CAMs says so at export time.

The same function serves `training.export` (every new pack) and this module's command, which adds the output to
a pack exported before heatmaps existed, without retraining:

    python -m training.heatmaps --pack models/demo-synthetic --data DIR [--split test] [--version 0.2.1]

It rewrites the classifier's float32 file (and its float16 variant, converted from it as `training.export`
converts), checks on real images that `probabilities` did not change and that every map's mean reproduces its
logit, and updates the manifest (files, sha256, outputs, the `heatmaps` entry, `export_parity.heatmaps`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.inference.modelpack import CLASSIFIER_OUTPUTS, HEATMAP_OUTPUT, INPUT_NAME, ModelPack, sha256_of

PROBABILITY_OUTPUT = CLASSIFIER_OUTPUTS[0]
# Nodes between the pooled features and the linear layer that only drop the 1 x 1 spatial axes (or, at
# inference, do nothing at all: dropout).
_SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Identity", "Dropout")
# How far the sigmoid of a map's mean may be from the served probability: float32 summation order only.
FP32_MEAN_TOLERANCE = 1e-5
# Largest float16-vs-float32 difference of a map value (logit units): float16 keeps 11 significant bits and the
# maps sum C products of activations (O(1)) and weights, like the logits the fp16 tolerance already allows 2e-2
# in probability for (a quarter of the logit's drift); maps are not averaged, so they drift a little more.
FP16_MAP_TOLERANCE = 0.15


class HeatmapsUnsupported(ValueError):
    """The classifier graph does not end in global average pooling + one linear layer (no exact CAM)."""


@dataclass(frozen=True)
class CamHead:
    """Where the CAM comes from in a classifier graph: the feature map and the linear head applied to its mean."""

    feature: str  # name of the (N, C, h, w) tensor that is pooled
    weight: np.ndarray  # (K, C) float32, alpha of a Gemm folded in
    bias: np.ndarray  # (K,) float32, beta of a Gemm folded in; zeros when the head has none
    map_shape: tuple[int | str, ...]  # (N, K, h, w) as the graph states it (N symbolic)


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


class _Graph:
    """Lookups over one graph: who produces a tensor, initializer values, declared shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        inferred = onnx.shape_inference.infer_shapes(model)
        self.graph = model.graph
        self.producer = {output: node for node in model.graph.node for output in node.output}
        self.initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        typed = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        self.shapes = {value.name: _dims(value) for value in typed}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(_attribute(node, "value", None))
        return None

    def node_of(self, tensor: str, what: str) -> onnx.NodeProto:
        node = self.producer.get(tensor)
        if node is None:
            raise HeatmapsUnsupported(f"{what} ({tensor}) is not computed by a node")
        return node


def _dims(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    shape = value.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim)


def _linear_head(graph: _Graph, logits: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(pooled input, W (K, C), b (K,)) of the linear layer computing `logits`."""
    node = graph.node_of(logits, "the logits")
    if node.op_type == "Gemm":
        if _attribute(node, "transA", 0):
            raise HeatmapsUnsupported("the head's Gemm transposes its input")
        weight = graph.constant(node.input[1])
        if weight is None:
            raise HeatmapsUnsupported("the head's Gemm weights are not constant")
        weight = weight if _attribute(node, "transB", 0) else weight.T
        bias = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        alpha, beta = float(_attribute(node, "alpha", 1.0)), float(_attribute(node, "beta", 1.0))
        bias = np.zeros(weight.shape[0], np.float32) if bias is None else beta * np.broadcast_to(bias, weight.shape[:1])
        return node.input[0], alpha * weight, bias
    bias = np.zeros(0, np.float32)
    if node.op_type == "Add":
        constants = [graph.constant(name) for name in node.input]
        if sum(c is not None for c in constants) != 1:
            raise HeatmapsUnsupported("the head ends in an Add that is not a constant bias")
        bias = next(c for c in constants if c is not None)
        node = graph.node_of(node.input[constants.index(None)], "the head's product")
    if node.op_type != "MatMul":
        raise HeatmapsUnsupported(f"the probabilities come from a {node.op_type} node, not a linear layer")
    weight = graph.constant(node.input[1])
    if weight is None or weight.ndim != 2:
        raise HeatmapsUnsupported("the head's MatMul weights are not a constant matrix")
    weight = weight.T  # the graph computes x @ W with W of shape (C, K)
    bias = np.zeros(weight.shape[0], np.float32) if bias.size == 0 else np.broadcast_to(bias, weight.shape[:1])
    return node.input[0], weight, bias


def _pooled_feature(graph: _Graph, pooled: str) -> str:
    """The (N, C, h, w) tensor whose spatial mean is `pooled`, through reshape-like nodes."""
    node = graph.node_of(pooled, "the head's input")
    while node.op_type in _SHAPE_ONLY:
        node = graph.node_of(node.input[0], "the head's input")
    if node.op_type == "GlobalAveragePool":
        return node.input[0]
    if node.op_type == "ReduceMean":
        has_axes_input = len(node.input) > 1 and node.input[1]
        axes = graph.constant(node.input[1]) if has_axes_input else _attribute(node, "axes", None)
        rank = len(graph.shapes.get(node.input[0], ()))
        if axes is not None and rank == 4 and sorted(int(a) % rank for a in np.ravel(axes)) == [2, 3]:
            return node.input[0]
        raise HeatmapsUnsupported(f"the head averages axes {axes} of a rank-{rank} tensor, not the two spatial axes")
    raise HeatmapsUnsupported(
        f"the linear head reads a {node.op_type} node, not a global average pool of a feature map "
        "(max pooling, attention pooling or a deeper head has no exact class activation map)"
    )


def find_cam_head(model: onnx.ModelProto, output: str = PROBABILITY_OUTPUT) -> CamHead:
    """The CAM structure behind `output`; HeatmapsUnsupported says what was found instead."""
    graph = _Graph(model)
    node = graph.node_of(output, f"output {output!r}")
    while node.op_type in ("Identity", "Cast"):
        node = graph.node_of(node.input[0], f"output {output!r}")
    if node.op_type != "Sigmoid":
        raise HeatmapsUnsupported(f"output {output!r} comes from a {node.op_type} node, not a sigmoid of logits")
    pooled, weight, bias = _linear_head(graph, node.input[0])
    feature = _pooled_feature(graph, pooled)
    shape = graph.shapes.get(feature, ())
    if len(shape) != 4 or shape[1] != weight.shape[1]:
        raise HeatmapsUnsupported(
            f"the pooled tensor has shape {list(shape)}, not (N, {weight.shape[1]}, h, w) as the head's weights need"
        )
    return CamHead(
        feature=feature,
        weight=np.ascontiguousarray(weight, dtype=np.float32),
        bias=np.ascontiguousarray(bias, dtype=np.float32),
        map_shape=(shape[0], weight.shape[0], shape[2], shape[3]),
    )


# Ops that resample space (their kernel, stride, pads and dilations place each output pixel on the input).
_SPATIAL_OPS = ("Conv", "MaxPool", "AveragePool")
# Ops whose output has the spatial layout of an input (elementwise, per-channel, concatenation along channels).
_SAME_GRID_OPS = (
    "Relu", "HardSwish", "HardSigmoid", "Sigmoid", "Clip", "Add", "Mul", "Sub", "Div", "BatchNormalization",
    "Identity", "Concat", "Cast", "Neg", "Tanh", "Exp", "Softplus", "Expand", "Erf", "Pow", "Sqrt", "Dropout",
    "Gelu",
)  # fmt: skip

# Ops whose output has no place on the input (global pools: the squeeze of squeeze-and-excitation; shapes).
_PLACELESS_OPS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "Constant", "Shape")


@dataclass(frozen=True)
class Grid:
    """Where a feature map lies on the model input: index i's receptive-field centre is input index stride * i + shift
    (both axes alike; pixel centres at integer indices)."""

    stride: float
    shift: float

    def map_origin(self) -> float:
        """The model-input coordinate (pixel edges, 0 = the input's top-left corner) of the map's top-left corner."""
        return self.shift + 0.5 - self.stride / 2


def _through(node: onnx.NodeProto, grid: Grid) -> Grid:
    """The grid of a spatial op's output, from its input's: output index o reads input indices
    s*o - pad_begin ... s*o - pad_begin + (k - 1) * dilation, centred on s*o - pad_begin + (k - 1) * dilation / 2."""
    kernel = _attribute(node, "kernel_shape", None)
    if kernel is None:
        raise HeatmapsUnsupported(f"{node.op_type} node {node.name} states no kernel_shape")
    strides = _attribute(node, "strides", [1] * len(kernel))
    dilations = _attribute(node, "dilations", [1] * len(kernel))
    pads = _attribute(node, "pads", [0] * 2 * len(kernel))
    if _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(set(strides)) != 1:
        raise HeatmapsUnsupported(f"{node.op_type} node {node.name} pads automatically or strides unevenly")
    centres = {(k - 1) * d / 2 - p for k, d, p in zip(kernel, dilations, pads[: len(kernel)])}
    if len(centres) != 1:
        raise HeatmapsUnsupported(f"{node.op_type} node {node.name} is placed differently along x and y")
    return Grid(grid.stride * strides[0], grid.shift + grid.stride * centres.pop())


def feature_grid(model: onnx.ModelProto, feature: str) -> Grid:
    """Where `feature` lies on the graph input, composed op by op from the input (a global pool's output has no
    place and is skipped where it is broadcast back, as in squeeze-and-excitation); HeatmapsUnsupported when an op
    resamples space in a way not modelled or two inputs of one op disagree.

    Tensors are followed in two layouts: NCHW, and NHWC between a Transpose to channels-last and back (ConvNeXt's
    blocks), where a LayerNormalization over the last axis and a MatMul by a constant matrix act per location."""
    graph = _Graph(model)
    grids: dict[str, Grid | None] = {tensor.name: Grid(1.0, 0.0) for tensor in model.graph.input}
    channels_last: set[str] = set()  # placed tensors in NHWC layout
    for name in graph.initializers:
        grids[name] = None
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        placed_inputs = [name for name in node.input if name and grids.get(name) is not None]
        placed = {grids[name] for name in placed_inputs}
        nhwc = bool(placed_inputs) and placed_inputs[0] in channels_last
        if node.op_type in _SPATIAL_OPS and placed:
            if nhwc:
                raise HeatmapsUnsupported(f"{node.op_type} node {node.name} reads a channels-last tensor")
            result = _through(node, grids[node.input[0]])
        elif not placed or node.op_type in _PLACELESS_OPS:
            result = None
        elif node.op_type in _LAYOUT_OPS:
            result, nhwc = _per_location(node, graph, grids[placed_inputs[0]], nhwc)
        elif node.op_type in _SAME_GRID_OPS or len(graph.shapes.get(node.output[0], ())) != 4:
            if len(placed) != 1:
                raise HeatmapsUnsupported(f"{node.op_type} node {node.name} joins tensors placed differently")
            result = placed.pop()
        else:
            raise HeatmapsUnsupported(f"cannot tell where a {node.op_type} node ({node.name}) moves the feature map")
        for output in node.output:
            grids[output] = result
            if result is not None and nhwc:
                channels_last.add(output)
    grid = grids.get(feature)
    if grid is None or feature in channels_last:
        raise HeatmapsUnsupported(f"cannot place {feature} on the input")
    return grid


# Ops whose effect on the spatial layout depends on the tensor's layout (NCHW or NHWC).
_LAYOUT_OPS = ("Transpose", "LayerNormalization", "MatMul")
_TO_CHANNELS_LAST, _TO_CHANNELS_FIRST = [0, 2, 3, 1], [0, 3, 1, 2]


def _per_location(node: onnx.NodeProto, graph: _Graph, grid: Grid, nhwc: bool) -> tuple[Grid, bool]:
    """(grid, channels-last?) of a layout op's output: a Transpose between NCHW and NHWC keeps every location's
    place; on NHWC, a LayerNormalization over the last axis and a MatMul by a constant (C, C') matrix act on each
    location's channels alone. Anything else mixes locations or is not understood: HeatmapsUnsupported."""
    if node.op_type == "Transpose":
        perm = list(_attribute(node, "perm", []))
        if perm == (_TO_CHANNELS_FIRST if nhwc else _TO_CHANNELS_LAST):
            return grid, not nhwc
    elif node.op_type == "LayerNormalization":
        if nhwc and int(_attribute(node, "axis", -1)) in (-1, 3):
            return grid, True
    elif node.op_type == "MatMul":
        weight = graph.constant(node.input[1])
        if nhwc and weight is not None and weight.ndim == 2:
            return grid, True
    layout = "NHWC" if nhwc else "NCHW"
    raise HeatmapsUnsupported(f"{node.op_type} node {node.name} on an {layout} tensor may mix locations")


def add_heatmap_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a float32 classifier graph with the output `heatmaps` (N, K, h, w) added (module docstring)."""
    if any(output.name == HEATMAP_OUTPUT for output in model.graph.output):
        raise ValueError(f"the graph already has an output {HEATMAP_OUTPUT!r}")
    head = find_cam_head(model)
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    weight_name, bias_name = f"{HEATMAP_OUTPUT}.weight", f"{HEATMAP_OUTPUT}.bias"
    graph.initializer.extend(
        [
            numpy_helper.from_array(head.weight[:, :, None, None], weight_name),
            numpy_helper.from_array(head.bias, bias_name),
        ]
    )
    graph.node.append(
        helper.make_node(
            "Conv",
            [head.feature, weight_name, bias_name],
            [HEATMAP_OUTPUT],
            name="class_activation_maps",
            kernel_shape=[1, 1],
        )
    )
    graph.output.append(helper.make_tensor_value_info(HEATMAP_OUTPUT, TensorProto.FLOAT, list(head.map_shape)))
    onnx.checker.check_model(augmented, full_check=True)
    return augmented


def heatmap_manifest_entry(model: onnx.ModelProto, input_size: int) -> dict:
    """The classifier's manifest entry `heatmaps` for a graph with the output: what it holds and where it lies."""
    head = find_cam_head(model, PROBABILITY_OUTPUT)
    _, labels, rows, columns = head.map_shape
    grid = feature_grid(model, head.feature)
    if rows != columns or abs(grid.stride * rows - input_size) > 1e-6:
        raise HeatmapsUnsupported(
            f"a {rows} x {columns} map at stride {grid.stride} does not tile a {input_size} x {input_size} input"
        )
    return {
        "output": HEATMAP_OUTPUT,
        "method": "class activation maps (Zhou et al. 2016): the head's weights and bias applied to the last "
        "feature map, exact for global average pooling + one linear layer",
        "shape": [int(labels), int(rows), int(columns)],
        "values": "per-location logits; the mean over a label's map is that label's logit",
        # Cell (i, j) covers model-input x from origin + stride * j to origin + stride * (j + 1), y alike:
        # centred on its receptive field, so the map sits half a cell up and left of the input for "same" padding.
        "grid": {"stride": grid.stride, "origin": grid.map_origin()},
    }


# ---------------------------------------------------------------------------------------------------
# Checks on real images (no PyTorch needed: the graph's own probabilities are the reference)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def map_mean_difference(probabilities: np.ndarray, heatmaps: np.ndarray) -> float:
    """Largest |sigmoid(mean of a map) - the probability|: 0 up to rounding when the maps are exact CAMs."""
    means = heatmaps.astype(np.float64).mean(axis=(2, 3))
    return float(np.abs(_sigmoid(means) - probabilities.astype(np.float64)).max(initial=0.0))


def run_classifier(path: Path, images: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(list(outputs), {INPUT_NAME: images})


def check_added_output(original: Path, augmented: Path, images: np.ndarray) -> dict:
    """On `images`: probabilities unchanged by the new output, and every map's mean reproducing its logit."""
    batches = [images[:1]] + ([images] if len(images) > 1 else [])
    changed = mean_difference = 0.0
    for batch in batches:
        (before,) = run_classifier(original, batch, [PROBABILITY_OUTPUT])
        after, heatmaps = run_classifier(augmented, batch, [PROBABILITY_OUTPUT, HEATMAP_OUTPUT])
        changed = max(changed, float(np.abs(after - before).max()))
        mean_difference = max(mean_difference, map_mean_difference(after, heatmaps))
    if changed > 0.0 or mean_difference > FP32_MEAN_TOLERANCE:
        raise SystemExit(
            f"error: {augmented.name}: probabilities changed by {changed:.3g} or map means differ from the logits "
            f"by {mean_difference:.3g} (tolerance {FP32_MEAN_TOLERANCE}); nothing written"
        )
    return {"probabilities_changed": changed, "map_mean_vs_probability": mean_difference}


def check_float16_maps(fp32: Path, fp16: Path, images: np.ndarray) -> dict:
    """Largest float16-vs-float32 difference of the maps (logit units); fails beyond FP16_MAP_TOLERANCE."""
    (reference,) = run_classifier(fp32, images, [HEATMAP_OUTPUT])
    (candidate,) = run_classifier(fp16, images, [HEATMAP_OUTPUT])
    difference = float(np.abs(candidate.astype(np.float64) - reference).max())
    if difference > FP16_MAP_TOLERANCE:
        raise SystemExit(
            f"error: {fp16.name}: float16 maps differ from float32 by {difference:.3g} "
            f"(tolerance {FP16_MAP_TOLERANCE}); nothing written"
        )
    return {"max_abs_difference_vs_fp32": difference, "tolerance": FP16_MAP_TOLERANCE}


# ---------------------------------------------------------------------------------------------------
# python -m training.heatmaps: add the output to an existing pack


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.heatmaps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pack", type=Path, required=True, help="model pack folder (rewritten in place)")
    parser.add_argument("--data", type=Path, required=True, help="dataset whose images the checks run on")
    parser.add_argument("--split", default="test", help="split of --data to take the check images from")
    parser.add_argument("--images", type=int, default=8, help="how many images the checks use")
    parser.add_argument("--version", default=None, help="new pack version (default: keep the manifest's)")
    return parser


def check_images(data: Path, split: str, count: int, pack: ModelPack) -> np.ndarray:
    from training.data import read_split  # the dataset readers need the training extras anyway
    from training.dataset import stacked_inputs

    records = read_split(data, split, "auto")[:count]
    if not records:
        raise SystemExit(f"error: no images in {data} {split}")
    spec = pack.model_inputs.classifier
    (images,) = stacked_inputs(records, (spec,), description="check images")
    return images


def stamp_version(path: Path, version: str) -> None:
    """Set the "version" metadata of an ONNX file (every model of a pack carries the pack's version)."""
    model = onnx.load(str(path))
    props = {entry.key: entry.value for entry in model.metadata_props} | {"version": version}
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    onnx.save(model, str(path))


def add_to_pack(pack_dir: Path, images: np.ndarray, version: str | None = None) -> dict:
    """Rewrite the pack's classifier files with the heatmap output and update its manifest; returns the manifest."""
    from training.export import to_float16  # torch-free, but the export module is where float16 is made

    pack = ModelPack.load(pack_dir)
    manifest = pack.manifest
    entry = manifest["classifier"]
    if HEATMAP_OUTPUT in (entry.get("outputs") or ()):
        raise SystemExit(f"error: the classifier of {pack_dir} already has the {HEATMAP_OUTPUT!r} output")
    files = {"fp32": pack.model_file("classifier", "fp32")}
    files |= {p: pack.model_file("classifier", p) for p in pack.precisions if p != "fp32"}
    unknown = sorted(set(files) - {"fp32", "fp16"})
    if unknown:
        raise SystemExit(f"error: {pack_dir} has classifier variants {unknown} this command cannot convert")
    with tempfile.TemporaryDirectory() as scratch:
        staged = {precision: Path(scratch) / path.name for precision, path in files.items()}
        try:
            augmented = add_heatmap_output(onnx.load(str(files["fp32"])))
        except HeatmapsUnsupported as exc:
            raise SystemExit(f"error: the classifier of {pack_dir} cannot have heatmaps: {exc}") from None
        onnx.save(augmented, str(staged["fp32"]))
        parity = {"fp32": check_added_output(files["fp32"], staged["fp32"], images)}
        if "fp16" in staged:
            fp16 = to_float16(augmented)
            del fp16.metadata_props[:]
            helper.set_model_props(fp16, {e.key: e.value for e in onnx.load(str(files["fp16"])).metadata_props})
            onnx.save(fp16, str(staged["fp16"]))
            parity["fp16"] = check_float16_maps(staged["fp32"], staged["fp16"], images)
        for precision, path in staged.items():
            shutil.move(str(path), files[precision])
    if version:
        for model in ("detector", "classifier"):
            for precision in pack.precisions:
                stamp_version(pack.model_file(model, precision), version)
        manifest["version"] = version
    for model in ("detector", "classifier"):
        manifest[model]["sha256"] = sha256_of(pack.model_file(model, "fp32"))
        for precision, variant in (manifest[model].get("variants") or {}).items():
            variant["sha256"] = sha256_of(pack.model_file(model, precision))
    entry["outputs"] = [*(entry.get("outputs") or CLASSIFIER_OUTPUTS), HEATMAP_OUTPUT]
    entry["heatmaps"] = heatmap_manifest_entry(augmented, pack.model_inputs.classifier.size) | {
        "added_by": "python -m training.heatmaps (classifier weights unchanged)"
    }
    manifest.setdefault("export_parity", {})["heatmaps"] = {"images": len(images), **parity}
    (pack_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    ModelPack.load(pack_dir)  # verifies like the service will
    return manifest


def main(args: argparse.Namespace) -> dict:
    pack = ModelPack.load(args.pack)
    images = check_images(args.data, args.split, args.images, pack)
    manifest = add_to_pack(args.pack, images, args.version)
    entry = manifest["classifier"]["heatmaps"]
    print(
        f"{args.pack}: classifier output {HEATMAP_OUTPUT!r} {entry['shape']} added (grid {entry['grid']}); "
        f"checks {manifest['export_parity']['heatmaps']}"
    )
    return manifest


if __name__ == "__main__":
    main(get_args_parser().parse_args())
