"""Export a training run to a model pack the service loads.

    python -m training.export --run runs/demo --out models/demo-synthetic [--evaluation runs/demo/evaluation_test.json]

Writes detector.onnx and classifier.onnx (float32; dynamic batch axis, each model's own fixed input size,
metadata stamped into the files) and their float16 variants detector.fp16.onnx and classifier.fp16.onnx
(float32 inputs and outputs, so the service feeds either the same tensors), copies the run's plots
and the evaluation report, and writes manifest.json with the sha256 of every model file.

The classifier also returns `heatmaps`, its class activation maps (training/heatmaps.py), when its
architecture has exact ones (global average pooling + one linear layer: every classifier of
training.models); otherwise the export says why and the pack has none (manifest
`classifier.heatmaps_unavailable`).

Nothing is written unless ONNX Runtime reproduces the PyTorch outputs on real images from the
dataset, at batch sizes 1 and > 1: float32 within `FP32_TOLERANCES`, float16 within
`FP16_TOLERANCES` and with the same top detections after the service's postprocessing; the maps
within the same tolerances of PyTorch's `Classifier.class_activation_maps`. The measured
differences go into the manifest (`export_parity`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto

from service.dicom.pipeline import InputSpec, ModelInputs
from service.dicom.preprocess import Normalization
from service.inference.modelpack import (
    CLASSIFIER_OUTPUTS,
    DETECTOR_OUTPUTS,
    HEATMAP_OUTPUT,
    INPUT_NAME,
    MANIFEST_FORMAT,
    ModelPack,
    sha256_of,
)
from service.inference.postprocess import DetectionParams, Detections, box_iou, select_detections
from service.inference.runtime import GPU_PROVIDERS, preload_gpu_libraries
from training.acceptance import evaluation_summary
from training.calibration import read_run_calibration
from training.data import Record, fusion_from_args, read_split
from training.dataset import stacked_inputs
from training.engine import predict
from training.heatmaps import FP16_MAP_TOLERANCE, HeatmapsUnsupported, add_heatmap_output, heatmap_manifest_entry
from training.labels import LABEL_SETS
from training.models import Classifier, Detector
from training.splits import RUN_SPLITS_FILE, read_splits, write_pack_splits, write_run_splits

INTENDED_USE = (
    "Research use only; not for diagnostic use. Frontal (PA/AP) pediatric chest radiographs "
    "(patients under 10 years), CR/DX modality."
)
# What the service's intended-use gate checks (service.dicom.intended_use), as the manifest states it.
INTENDED_POPULATION = {"modalities": ["CR", "DX"], "body_part": "CHEST", "views": ["PA", "AP"], "max_age_years": 10}
MODELS = ("detector", "classifier")
PRECISIONS = ("fp32", "fp16")
# The service's postprocessing, as written into the manifest: the top-detection check uses the same.
POSTPROCESS = DetectionParams()


@dataclass(frozen=True)
class Tolerances:
    """How far ONNX Runtime may drift from PyTorch before the export refuses to write a pack."""

    box_pixels: float = 0.05  # absolute, in model-input pixels
    score: float = 1e-4
    probability: float = 1e-4
    # Boxes are compared only at locations where PyTorch scores at least this for some class (the
    # only boxes postprocessing can report); None compares every location.
    box_min_score: float | None = None
    # This many of PyTorch's best detections per image (after NMS, scoring clear of the score
    # threshold by more than `score`) must come back: same class, IoU >= 0.5, score within `score`.
    top_detections: int = 0
    heatmap: float = 1e-3  # class activation maps, absolute, in logits (they range over tens of units)


# float32 kernels differ from PyTorch's only in summation order. That order still moves a trained
# detector's dense scores by more than 1e-4 at larger inputs (demo pack 0.3.0 at 384²: 2.3e-4 at one of
# its ~24,000 location-class scores per image, while boxes stayed within 0.05 px and probabilities within
# 1e-4), so scores get the bar the service is held to for what it serves (tests/test_parity.py: 1e-3).
FP32_TOLERANCES = Tolerances(score=1e-3)
# float16 keeps 11 significant bits (relative rounding 4.9e-4 per op); over ~60 layers logits drift by
# ~1e-2, which moves probabilities by at most a quarter of that and box edges (exp of a log-distance,
# x stride) by ~1% of their distance: under 1 px for the findings' sizes at the model input. Boxes are
# checked where a finding could be reported; far-off background locations may regress boxes of
# thousands of pixels whose 1% means nothing.
FP16_TOLERANCES = Tolerances(
    box_pixels=1.0,
    score=2e-2,
    probability=2e-2,
    box_min_score=POSTPROCESS.score_threshold,
    top_detections=5,
    heatmap=FP16_MAP_TOLERANCE,
)
TOLERANCES = {"fp32": FP32_TOLERANCES, "fp16": FP16_TOLERANCES}

# Nodes from these ops on stay float32 in the fp16 variant: exp(distance logits) x stride overflows
# float16 (max 65504) at far-off locations, and the sigmoids turn logits into the reported scores.
# They are a handful of elementwise nodes on small tensors, so float32 there costs nothing. Only the
# decoding tail counts: an Exp or Sigmoid that feeds another learned layer (the sigmoid gates of
# EfficientNet's squeeze-and-excitation blocks, SiLU = x * sigmoid(x)) is part of the network and stays
# float16, or nearly the whole network would run in float32.
FP16_FLOAT32_TAIL_OPS = ("Exp", "Sigmoid")
LEARNED_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="training run folder (holds checkpoint.pt)")
    parser.add_argument("--out", type=Path, required=True, help="model pack folder to write")
    parser.add_argument("--data", type=Path, default=None, help="dataset for the parity check (default: the run's)")
    parser.add_argument("--name", default=None, help="pack name (default: the folder name)")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--parity-images", type=int, default=8)
    parser.add_argument(
        "--parity-providers",
        nargs="+",
        default=["CPUExecutionProvider"],
        help="ONNX Runtime providers the parity gate runs each variant on; on a GPU machine add "
        "CUDAExecutionProvider so float16 is checked with the kernels that will serve it",
    )
    parser.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the float16 variants (GPU serving); --no-fp16 for a float32-only pack",
    )
    parser.add_argument(
        "--evaluation",
        type=Path,
        default=None,
        help="evaluation report (training.evaluate's evaluation_<split>.json) to summarise in the manifest "
        "and copy beside the pack (default: the run's evaluation_test.json when present)",
    )
    parser.add_argument("--training-data", default=None, help="one line describing the training data, for the manifest")
    return parser


def load_run(run: Path) -> tuple[dict, Detector, Classifier]:
    path = run / "checkpoint.pt"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; train first with python -m training.train --out {run}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    args = checkpoint["args"]
    # Random initial weights: the checkpoint's replace them (no pretrained file is needed to export).
    detector = Detector(len(checkpoint["local_labels"]), args["detector_backbone"], args["fpn_channels"])
    classifier = Classifier(len(checkpoint["global_labels"]), args["classifier_backbone"])
    detector.load_state_dict(checkpoint["detector"])
    classifier.load_state_dict(checkpoint["classifier"])
    return checkpoint, detector.eval(), classifier.eval()


def checkpoint_inputs(checkpoint: dict) -> ModelInputs:
    """Each model's input spec as the run trained it."""

    def spec(model: str) -> InputSpec:
        entry = checkpoint["inputs"][model]
        return InputSpec(int(entry["size"]), Normalization(*entry["normalization"]))

    return ModelInputs(detector=spec("detector"), classifier=spec("classifier"))


def model_images(inputs: ModelInputs, stacked: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(detector images, classifier images) from one stacked array per distinct input spec."""
    return stacked[inputs.index("detector")], stacked[inputs.index("classifier")]


def export_onnx(
    model: torch.nn.Module,
    size: int,
    outputs: tuple[str, ...],
    path: Path,
    metadata: dict[str, str],
    edit: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
) -> None:
    """Export `model` to `path` (float32, dynamic batch axis, `metadata` stamped in); `edit` rewrites the graph
    first (the classifier's heatmaps output is added that way)."""
    example = torch.zeros(2, 1, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=list(outputs),
        dynamic_shapes={"images": {0: batch}},
        dynamo=True,
        external_data=False,
        opset_version=18,
        verbose=False,
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    if edit is not None:
        graph = edit(graph)
    onnx.helper.set_model_props(graph, metadata | {"precision": "fp32"})
    onnx.save(graph, str(path))


# ---------------------------------------------------------------------------------------------------
# float16 variant


def float32_tail(graph: onnx.GraphProto, roots: Sequence[str] = FP16_FLOAT32_TAIL_OPS) -> list[str]:
    """Names of the nodes of op type `roots` that no learned layer computes from, and of every node computing from
    their outputs: the decoding tail between the last learned layer and the outputs."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_a_layer = _feeding_learned_layers(graph, consumers)
    tail: set[str] = set()
    pending = [node for node in graph.node if node.op_type in roots and node.name not in feeds_a_layer]
    while pending:
        node = pending.pop()
        if node.name in tail:
            continue
        tail.add(node.name)
        for name in node.output:
            pending.extend(consumers.get(name, []))
    return sorted(tail)


def _feeding_learned_layers(graph: onnx.GraphProto, consumers: dict[str, list[onnx.NodeProto]]) -> set[str]:
    """Names of the nodes from whose outputs some Conv / Gemm / MatMul computes (directly or further down)."""
    feeding: set[str] = set()
    for node in reversed(_topological_order(list(graph.node), _graph_sources(graph))[0]):
        downstream = [consumer for output in node.output for consumer in consumers.get(output, [])]
        if any(c.op_type in LEARNED_LAYER_OPS or c.name in feeding for c in downstream):
            feeding.add(node.name)
    return feeding


def _graph_sources(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.input} | {t.name for t in graph.initializer}


def _is_cast_to(node: onnx.NodeProto, elem_type: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == elem_type for a in node.attribute)


def _float32_tensors(graph: onnx.GraphProto) -> set[str]:
    typed = [*graph.input, *graph.value_info, *graph.output]
    return {v.name for v in typed if v.type.tensor_type.elem_type == TensorProto.FLOAT} | {
        t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT
    }


def _tidy_mixed_precision(graph: onnx.GraphProto) -> None:
    """Repair and trim what onnxruntime's float16 converter leaves around float32 nodes.

    The converter wraps each float32 node in its own casts, so a float32 chain round-trips
    through float16 between every two nodes (losing the precision and range it was kept for), and a
    tensor feeding two float32 nodes gets two identical Cast nodes under one name (an invalid graph).
    Here duplicates are merged, float32 -> float16 -> float32 round trips (and "casts" of float32
    initializers to float32) become Identity, which ONNX Runtime folds away, casts nobody reads are
    dropped, value_info agrees with the types again and the nodes are back in topological order.
    """
    nodes = _without_duplicates(graph.node)
    # An initializer only float32 nodes read stays float32, but the converter retypes its value_info to
    # float16: drop such entries, the initializer carries its own type.
    initializers = {tensor.name for tensor in graph.initializer}
    _keep_value_info(graph, lambda name: name not in initializers)
    _float32_round_trips_to_identity(nodes, _float32_tensors(graph))
    nodes = _read_nodes(nodes, {output.name for output in graph.output})
    ordered, available = _topological_order(nodes, {i.name for i in graph.input} | initializers)
    ordered = [onnx.NodeProto.FromString(node.SerializeToString()) for node in ordered]  # detached from graph.node
    _keep_value_info(graph, lambda name: name in available)
    del graph.node[:]
    graph.node.extend(ordered)


def _without_duplicates(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """One node per name: the converter's identical Cast nodes under one name merged (different ones are an error)."""
    unique: dict[str, onnx.NodeProto] = {}
    for node in nodes:
        if node.name and node.name in unique:
            if unique[node.name] != node:
                raise ValueError(f"float16 conversion made two different nodes named {node.name}")
            continue
        unique[node.name or f"\0unnamed {len(unique)}"] = node
    return list(unique.values())


def _keep_value_info(graph: onnx.GraphProto, keep: Callable[[str], bool]) -> None:
    kept = [v for v in graph.value_info if keep(v.name)]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _float32_round_trips_to_identity(nodes: list[onnx.NodeProto], float32: set[str]) -> None:
    """float32 -> float16 -> float32 round trips, and float32 "casts" of float32 initializers, become Identity."""
    producer = {output: node for node in nodes for output in node.output}
    for node in nodes:
        if not _is_cast_to(node, TensorProto.FLOAT):
            continue
        source = producer.get(node.input[0])
        if node.input[0] in float32:  # a float32 -> float32 "cast" of a float32 initializer
            original = node.input[0]
        elif source is not None and _is_cast_to(source, TensorProto.FLOAT16) and source.input[0] in float32:
            original = source.input[0]  # a float32 -> float16 -> float32 round trip
        else:
            continue
        node.op_type = "Identity"
        node.input[0] = original
        del node.attribute[:]


def _read_nodes(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes left once those whose outputs nobody reads are dropped, repeatedly."""
    while True:
        read = {name for node in nodes for name in node.input} | graph_outputs
        kept = [node for node in nodes if any(output in read for output in node.output)]
        if len(kept) == len(nodes):
            return nodes
        nodes = kept


def _topological_order(nodes: list[onnx.NodeProto], sources: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """`nodes` in an order where each runs after what it reads, and every tensor name defined on the way.

    `sources` are the graph's inputs and initializers; "" stands for an omitted optional input.
    """
    available = sources | {""}
    ordered: list[onnx.NodeProto] = []
    remaining = nodes
    while remaining:
        ready = [all(name in available for name in node.input) for node in remaining]
        if not any(ready):
            raise ValueError("float16 conversion left a graph with a cycle or an undefined input")
        for node, is_ready in zip(remaining, ready):
            if is_ready:
                available.update(node.output)
                ordered.append(node)
        remaining = [node for node, is_ready in zip(remaining, ready) if not is_ready]
    return ordered, available


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float16 variant of a float32 graph: float32 inputs and outputs, float32 decoding tail."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # ships with onnxruntime

    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=float32_tail(model.graph))
    _tidy_mixed_precision(converted.graph)
    onnx.checker.check_model(converted, full_check=True)  # full: types must also agree with shape inference
    return converted


def export_float16(fp32_path: Path, path: Path, metadata: dict[str, str]) -> None:
    model = to_float16(onnx.load(str(fp32_path)))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata | {"precision": "fp16"})
    onnx.save(model, str(path))


# ---------------------------------------------------------------------------------------------------
# Parity gate


def missed_top_detections(
    reference: Detections, candidate: Detections, count: int, min_score: float, score_tolerance: float
) -> tuple[int, int]:
    """(checked, missed): of the reference's `count` best detections scoring at least `min_score`,
    how many have no candidate detection of the same class with IoU >= 0.5 and a score within tolerance."""
    order = np.argsort(-reference.scores, kind="stable")[:count]
    order = order[reference.scores[order] >= min_score]
    missed = 0
    for index in order:
        same_class = candidate.classes == reference.classes[index]
        if not same_class.any():
            missed += 1
            continue
        overlaps = box_iou(reference.boxes[index], candidate.boxes[same_class]) >= 0.5
        close = np.abs(candidate.scores[same_class] - reference.scores[index]) <= score_tolerance
        missed += int(not (overlaps & close).any())
    return len(order), missed


def compare_outputs(
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
    candidate: tuple[np.ndarray, np.ndarray, np.ndarray],
    tolerances: Tolerances,
    params: DetectionParams = POSTPROCESS,
) -> dict[str, float]:
    """Largest differences between two (boxes, scores, probabilities) triples, and the top-detection check."""
    boxes, scores, probabilities = reference
    other_boxes, other_scores, other_probabilities = candidate
    box_difference = np.abs(other_boxes - boxes).max(axis=-1)  # (N, L)
    if tolerances.box_min_score is not None:
        box_difference = box_difference[scores.max(axis=-1) >= tolerances.box_min_score]
    result = {
        "box_pixels": float(box_difference.max(initial=0.0)),
        "score": float(np.abs(other_scores - scores).max()),
        "probability": float(np.abs(other_probabilities - probabilities).max()),
    }
    if tolerances.top_detections:
        checked = missed = 0
        for image in range(len(boxes)):
            counts = missed_top_detections(
                select_detections(boxes[image], scores[image], params),
                select_detections(other_boxes[image], other_scores[image], params),
                tolerances.top_detections,
                params.score_threshold + tolerances.score,
                tolerances.score,
            )
            checked, missed = checked + counts[0], missed + counts[1]
        result |= {"top_detections_checked": checked, "top_detections_missed": missed}
    return result


def heatmap_difference(classifier: Classifier, session: ort.InferenceSession, images: np.ndarray) -> float:
    """Largest |ONNX heatmaps - PyTorch class activation maps| on `images`, in logits."""
    with torch.no_grad():
        reference = classifier.eval().class_activation_maps(torch.from_numpy(images)).numpy()
    (maps,) = session.run([HEATMAP_OUTPUT], {INPUT_NAME: images})
    return float(np.abs(maps.astype(np.float64) - reference).max())


PARITY_MEASURES = ("box_pixels", "score", "probability", "heatmap")


def parity_failures(worst: dict, tolerances: Tolerances) -> dict[str, float]:
    failed = {
        name: worst[name] for name in PARITY_MEASURES if name in worst and worst[name] > getattr(tolerances, name)
    }
    if worst.get("top_detections_missed"):
        failed["top_detections_missed"] = worst["top_detections_missed"]
    return failed


def check_parity(
    detector: Detector,
    classifier: Classifier,
    detector_path: Path,
    classifier_path: Path,
    images: tuple[np.ndarray, np.ndarray],
    tolerances: Tolerances,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict:
    """Largest ONNX-vs-PyTorch differences over batches of 1 and of all images; raises if too large.

    `images` holds the same images at the detector's and at the classifier's input (the same array when the
    models share an input). Returns the differences (and the top-detection counts when checked) and the
    provider that ran.
    """
    sessions = [ort.InferenceSession(str(p), providers=list(providers)) for p in (detector_path, classifier_path)]
    has_heatmaps = HEATMAP_OUTPUT in {output.name for output in sessions[1].get_outputs()}
    worst: dict = {"box_pixels": 0.0, "score": 0.0, "probability": 0.0} | ({"heatmap": 0.0} if has_heatmaps else {})
    detector_images, classifier_images = images
    count = len(detector_images)
    for end in [1] + ([count] if count > 1 else []):
        detector_batch, classifier_batch = detector_images[:end], classifier_images[:end]
        reference = predict(detector, classifier, detector_batch, classifier_batch, torch.device("cpu"))
        onnx_boxes, onnx_scores = sessions[0].run(list(DETECTOR_OUTPUTS), {INPUT_NAME: detector_batch})
        (onnx_probabilities,) = sessions[1].run(list(CLASSIFIER_OUTPUTS), {INPUT_NAME: classifier_batch})
        measured = compare_outputs(reference, (onnx_boxes, onnx_scores, onnx_probabilities), tolerances)
        if has_heatmaps:
            measured["heatmap"] = heatmap_difference(classifier, sessions[1], classifier_batch)
        for name, value in measured.items():
            # Top-detection counts are of the largest batch (all images); differences are the worst of both.
            worst[name] = value if name.startswith("top_detections") else max(worst[name], value)
    failed = parity_failures(worst, tolerances)
    if failed:
        raise SystemExit(
            f"error: ONNX ({detector_path.name}, {classifier_path.name}) and PyTorch disagree beyond "
            f"tolerance {tolerances}: {failed}; no pack written"
        )
    return worst | {"provider": sessions[0].get_providers()[0]}


def parity_record(worst: dict) -> dict:
    """check_parity's result as the manifest states it."""
    record: dict = {"max_abs_difference": {name: worst[name] for name in PARITY_MEASURES if name in worst}}
    if "top_detections_checked" in worst:
        record["top_detections"] = {
            "checked": worst["top_detections_checked"],
            "missed": worst["top_detections_missed"],
        }
    return record


def check_variant(
    detector: Detector,
    classifier: Classifier,
    paths: dict[str, Path],
    images: tuple[np.ndarray, np.ndarray],
    precision: str,
    providers: Sequence[str],
) -> dict:
    """One variant's parity on each provider (a provider that falls back is reported once, as what ran)."""
    if any(provider in GPU_PROVIDERS for provider in providers):
        preload_gpu_libraries()  # what the service does before its GPU sessions
    results: dict[str, dict] = {}
    for provider in providers:
        worst = check_parity(
            detector,
            classifier,
            paths["detector"],
            paths["classifier"],
            images,
            TOLERANCES[precision],
            providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])),
        )
        results.setdefault(worst["provider"], parity_record(worst))
    return {"tolerances": asdict(TOLERANCES[precision]), "providers": results}


# ---------------------------------------------------------------------------------------------------
# Manifest parts


def label_counts(records: list[Record]) -> tuple[Counter, Counter]:
    """(images with a box of each local label, images positive for each global label): training's counting."""
    local = Counter(label for record in records for label in {box.label for box in record.boxes})
    global_ = Counter(label for record in records for label, value in record.image_labels.items() if value)
    return local, global_


def label_selection(run_args: dict, local_labels: list[str], global_labels: list[str], records: list[Record]) -> dict:
    """Which labels of the dataset's label set were trained, and why each of the others was not."""
    label_set = LABEL_SETS[run_args["dataset"]]
    min_examples = int(run_args.get("min_examples") or 0)
    local_counts, global_counts = label_counts(records)

    def kind(names: tuple[str, ...], trained: list[str], counts: Counter, requested: list[str] | None) -> dict:
        not_trained = {}
        for name in names:
            if name in trained:
                continue
            if requested:
                not_trained[name] = "not among the labels requested for training"
            elif counts.get(name, 0) < min_examples:
                not_trained[name] = f"fewer than {min_examples} examples ({counts.get(name, 0)} in the training split)"
            else:
                not_trained[name] = "not trained by the run this one was initialised from"
        return {"trained": list(trained), "not_trained": not_trained}

    return {
        "rule": (
            f"labels with at least {min_examples} training examples (the VinDr-PCXR paper notes rarer labels "
            "are not reliably learnable), unless labels were named explicitly"
        ),
        "min_examples": min_examples,
        "local": kind(
            tuple(label.name for label in label_set.local), local_labels, local_counts, run_args.get("local_labels")
        ),
        "global": kind(
            tuple(label.name for label in label_set.global_),
            global_labels,
            global_counts,
            run_args.get("global_labels"),
        ),
    }


def copy_evaluation(report_path: Path, out: Path) -> dict:
    """Copy the report (.json, its .md and any <stem>* plots) and the matching curves beside the pack."""
    if not report_path.is_file():
        raise SystemExit(f"error: evaluation report {report_path} not found")
    report = json.loads(report_path.read_text())
    split = report.get("split")
    companions = set(report_path.parent.glob(f"{report_path.stem}*"))
    if split:  # training.evaluate's curves: pr_curves_<split>.png, roc_curves_<split>.png
        companions |= set(report_path.parent.glob(f"*_curves_{split}.png"))
    for file in sorted(companions):
        if file.is_file() and file.resolve() != (out / file.name).resolve():
            shutil.copy(file, out / file.name)
    return evaluation_summary(report, report_path.name)


def model_entry(out: Path, model: str, precisions: Sequence[str]) -> dict:
    """The manifest's file entry of one model: its float32 file at the top, other precisions under `variants`."""
    entry: dict = {"file": f"{model}.onnx", "sha256": sha256_of(out / f"{model}.onnx"), "precision": "fp32"}
    variants = {
        precision: {"file": f"{model}.{precision}.onnx", "sha256": sha256_of(out / f"{model}.{precision}.onnx")}
        for precision in precisions
        if precision != "fp32"
    }
    if variants:
        entry["variants"] = variants
    return entry


def variant_paths(folder: Path, precision: str) -> dict[str, Path]:
    suffix = ".onnx" if precision == "fp32" else f".{precision}.onnx"
    return {model: folder / f"{model}{suffix}" for model in MODELS}


def main(args: argparse.Namespace) -> Path:
    checkpoint, detector, classifier = load_run(args.run)
    run_args = checkpoint["args"]
    inputs = checkpoint_inputs(checkpoint)
    read_thresholds(args.run)  # only a finished run has them
    splits = run_splits(args.run, checkpoint)
    calibrated = run_calibration(args.run)
    evaluation_path = args.evaluation or (args.run / "evaluation_test.json")
    if args.evaluation is None and not evaluation_path.is_file():
        evaluation_path = None

    data_root = args.data or Path(run_args["data"])
    # Read the data the way the run did (layout and rater fusion are in its saved arguments).
    training_records = read_split(data_root, "train", run_args["layout"], fusion_from_args(run_args))
    parity_records = training_records[: args.parity_images]
    labels = {"detector": checkpoint["local_labels"], "classifier": checkpoint["global_labels"]}
    images = model_images(inputs, stacked_inputs(parity_records, inputs.specs, description="parity images"))
    precisions = PRECISIONS if args.fp16 else ("fp32",)
    name = args.name or args.out.name

    models = {"detector": detector, "classifier": classifier}
    metadata = pack_metadata(name, args.version)
    parity, heatmaps = write_models(
        models, labels, metadata, inputs, precisions, images, args.parity_providers, args.out
    )
    for extra in ("loss_curves.png", "thresholds.json", "run.json"):
        if (args.run / extra).exists():
            shutil.copy(args.run / extra, args.out / extra)
    evaluation = copy_evaluation(evaluation_path, args.out) if evaluation_path is not None else None

    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "version": args.version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "intended_use": INTENDED_USE,
        "intended_population": INTENDED_POPULATION,
        "training_data": args.training_data
        or (f"{run_args['dataset']} layout at {data_root.name} ({len(training_records)} images in its train split)"),
        "label_set": run_args["dataset"],
        "label_selection": label_selection(run_args, labels["detector"], labels["classifier"], training_records),
        "precisions": list(precisions),
        **model_entries(args.out, checkpoint, calibrated, precisions, inputs, heatmaps),
        "calibration": calibrated["calibration"],
        # Chosen on the calibration split with the calibrated probabilities (training.calibrate, training/triage.py);
        # null for a classifier without a "No finding" label.
        "triage": calibrated.get("triage"),
        "training": training_entry(checkpoint, args.run),
        "evaluation": evaluation,
        "export_parity": {
            "images": len(images[0]),
            "batch_sizes": sorted({1, len(images[0])}),
            "reference": "PyTorch float32 on CPU",
            "postprocess": asdict(POSTPROCESS),
        }
        | parity,
    }
    write_pack_splits(args.out, manifest, splits | {"calibration": calibrated["calibration_image_ids"]})
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    ModelPack.load(args.out)  # the pack we wrote must verify like the service will verify it
    for precision in precisions:
        print(f"wrote {args.out} {precision}: parity {parity[precision]['providers']}")
    return args.out


def run_splits(run: Path, checkpoint: dict) -> dict[str, list[str]]:
    """The image ids the run, and every run it was initialised from (--init-from), trained and validated on.

    From each run's splits.json, or rebuilt the way training split them for a run that has none.
    """
    splits = read_splits(run / RUN_SPLITS_FILE) or _rebuilt_splits(run, checkpoint["args"])
    initial = checkpoint["args"].get("init_from")
    if initial and not Path(initial).is_file():
        print(f"warning: {initial} (this run's --init-from) is gone: its images are not recorded in the pack")
    elif initial:  # a curriculum: the earlier stage's images were seen too
        earlier = Path(initial).parent
        earlier_splits = run_splits(earlier, torch.load(Path(initial), map_location="cpu", weights_only=False))
        for role, ids in earlier_splits.items():
            splits[role] = sorted(set(splits.get(role, [])) | set(ids))
    return splits


def _rebuilt_splits(run: Path, run_args: dict) -> dict[str, list[str]]:
    from training.train import split_train_val

    records = read_split(Path(run_args["data"]), "train", run_args["layout"], fusion_from_args(run_args))
    train_records, val_records = split_train_val(
        records[: run_args.get("limit")], run_args["val_fraction"], run_args["seed"]
    )
    write_run_splits(run, [r.image_id for r in train_records], [r.image_id for r in val_records])
    print(f"{run / RUN_SPLITS_FILE} was missing: rebuilt from the run's data, --val-fraction and --seed")
    return read_splits(run / RUN_SPLITS_FILE)


def run_calibration(run: Path) -> dict:
    """The run's calibration.json; fitted first (training.calibrate on the run's validation images) when absent."""
    calibrated = read_run_calibration(run)
    if calibrated is None:
        from training import calibrate

        print(f"{run} has no calibration.json: fitting calibrators and operating points on its validation images")
        calibrate.main(calibrate.get_args_parser().parse_args(["--run", str(run)]))
        calibrated = read_run_calibration(run)
    return calibrated


def read_thresholds(run: Path) -> dict:
    """The run's thresholds.json (the operating points chosen on validation), which only a finished run has."""
    path = run / "thresholds.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; the run did not finish")
    return json.loads(path.read_text())


def pack_metadata(name: str, version: str) -> dict[str, str]:
    """What every ONNX file of the pack carries in its metadata_props (each model's own entries are added per file)."""
    return {"pack": name, "version": version, "intended_use": INTENDED_USE}


def model_metadata(model: str, labels: list[str], spec: InputSpec) -> dict[str, str]:
    """A model's own metadata_props: which model, its labels and its input."""
    return {
        "model": model,
        "labels": json.dumps(labels),
        "input_size": str(spec.size),
        "normalization": json.dumps({"mean": spec.normalization.mean, "std": spec.normalization.std}),
    }


def write_models(
    models: dict[str, torch.nn.Module],
    labels: dict[str, list[str]],
    metadata: dict[str, str],
    inputs: ModelInputs,
    precisions: Sequence[str],
    images: tuple[np.ndarray, np.ndarray],
    parity_providers: Sequence[str],
    out: Path,
) -> tuple[dict[str, dict], dict]:
    """Export every variant into a scratch folder, check each against PyTorch, and only then move them into `out`.

    Returns each precision's parity record, and the classifier's heatmaps manifest entry ({"entry": ...}) or why
    it has none ({"unavailable": reason}); check_parity stops the export (SystemExit) before anything is moved.
    """
    outputs = {"detector": DETECTOR_OUTPUTS, "classifier": CLASSIFIER_OUTPUTS}
    heatmaps: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        staging = Path(scratch)
        fp32 = variant_paths(staging, "fp32")
        for model, module in models.items():
            spec = inputs.spec(model)
            stamped = metadata | model_metadata(model, labels[model], spec)
            edit = partial(with_heatmaps, size=spec.size, found=heatmaps) if model == "classifier" else None
            export_onnx(module, spec.size, outputs[model], fp32[model], stamped, edit)
            if "fp16" in precisions:
                export_float16(fp32[model], variant_paths(staging, "fp16")[model], stamped)
        parity = {
            precision: check_variant(
                models["detector"],
                models["classifier"],
                variant_paths(staging, precision),
                images,
                precision,
                parity_providers,
            )
            for precision in precisions
        }
        out.mkdir(parents=True, exist_ok=True)
        for precision in precisions:
            for file in variant_paths(staging, precision).values():
                shutil.move(str(file), out / file.name)
    return parity, heatmaps


def with_heatmaps(graph: onnx.ModelProto, size: int, found: dict) -> onnx.ModelProto:
    """The classifier graph with its `heatmaps` output; when the architecture has no exact class activation maps,
    the graph unchanged and the reason, said clearly (the pack then has no heatmaps). `found` receives the
    manifest entry, or the reason."""
    try:
        augmented = add_heatmap_output(graph)
        found["entry"] = heatmap_manifest_entry(augmented, size)
    except HeatmapsUnsupported as exc:
        found["unavailable"] = str(exc)
        print(f"warning: this classifier has no heatmaps ({exc}); the pack is written without them")
        return graph
    return augmented


def input_entry(spec: InputSpec) -> dict:
    """The manifest's description of the model input and how an image becomes one."""
    return {
        "name": INPUT_NAME,
        "layout": "NCHW",
        "channels": 1,
        "size": spec.size,
        "normalization": {"mean": spec.normalization.mean, "std": spec.normalization.std},
        "preprocessing": (
            "modality LUT -> window (or min-max) -> MONOCHROME1 inverted -> top-left letterbox (PIL bilinear) "
            "-> (x - mean) / std"
        ),
    }


def model_entries(
    out: Path,
    checkpoint: dict,
    calibrated: dict,
    precisions: Sequence[str],
    inputs: ModelInputs,
    heatmaps: dict,
) -> dict[str, dict]:
    """The manifest's "detector" and "classifier": files, input, backbone, outputs, labels, operating points
    (`calibrated`: the run's calibration.json, whose operating points were chosen on the service's path) and,
    for the classifier, its heatmaps (or why it has none)."""
    classifier_heatmaps = (
        {"outputs": [*CLASSIFIER_OUTPUTS, HEATMAP_OUTPUT], "heatmaps": heatmaps["entry"]}
        if "entry" in heatmaps
        else {"outputs": list(CLASSIFIER_OUTPUTS), "heatmaps_unavailable": heatmaps.get("unavailable")}
    )
    run_args = checkpoint["args"]
    return {
        "detector": model_entry(out, "detector", precisions)
        | {
            "input": input_entry(inputs.detector),
            "backbone": run_args["detector_backbone"],
            "outputs": list(DETECTOR_OUTPUTS),
            "labels": checkpoint["local_labels"],
            "postprocess": asdict(POSTPROCESS),
            # Findings are reported at these per-label operating points; evaluation uses all boxes.
            "thresholds": calibrated["finding_thresholds"],
            "threshold_method": calibrated["finding_threshold_method"],
        },
        "classifier": model_entry(out, "classifier", precisions)
        | {
            "input": input_entry(inputs.classifier),
            "backbone": run_args["classifier_backbone"],
            **classifier_heatmaps,
            "labels": checkpoint["global_labels"],
            "thresholds": calibrated["thresholds"],
            "threshold_method": calibrated["threshold_method"],
        },
    }


def training_entry(checkpoint: dict, run: Path) -> dict:
    """The manifest's summary of the training run: epochs, seed, split sizes, final validation metrics."""
    run_summary = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    return {
        "epochs": checkpoint["epoch"] + 1,
        "seed": checkpoint["args"]["seed"],
        "train_images": run_summary.get("train_images"),
        "validation_images": run_summary.get("val_images"),
        "final_validation": checkpoint["log"][-1]["val"] if checkpoint["log"] else None,
    }


if __name__ == "__main__":
    main(get_args_parser().parse_args())
