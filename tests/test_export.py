"""Export gate: ONNX Runtime reproduces PyTorch; the pack is stamped, calibrated and verified (serving: test_parity)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from service.inference.modelpack import ModelPack, PackError
from service.inference.postprocess import Detections
from training.data import Box, Record, read_split
from training.dataset import stacked_inputs
from training.export import (
    FP16_TOLERANCES,
    FP32_TOLERANCES,
    Tolerances,
    check_parity,
    checkpoint_inputs,
    copy_evaluation,
    export_float16,
    export_onnx,
    float32_tail,
    label_selection,
    load_run,
    missed_top_detections,
    model_images,
)


@pytest.fixture(scope="module")
def exported(tiny_run, tiny_dataset, tmp_path_factory):
    checkpoint, detector, classifier = load_run(tiny_run)
    folder = tmp_path_factory.mktemp("onnx")
    inputs = checkpoint_inputs(checkpoint)
    export_onnx(detector, inputs.detector.size, ("boxes", "scores"), folder / "detector.onnx", {"model": "detector"})
    export_onnx(classifier, inputs.classifier.size, ("probabilities",), folder / "classifier.onnx", {})
    images = model_images(inputs, stacked_inputs(read_split(tiny_dataset, "test")[:5], inputs.specs))
    return detector, classifier, folder, images


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_pytorch_on_real_images(exported, batch):
    """Boxes, scores and probabilities agree within the export tolerances at batch sizes 1 and 5."""
    detector, classifier, folder, images = exported
    worst = check_parity(
        detector,
        classifier,
        folder / "detector.onnx",
        folder / "classifier.onnx",
        tuple(part[:batch] for part in images),
        Tolerances(),
    )
    assert worst["box_pixels"] <= Tolerances().box_pixels and worst["probability"] <= Tolerances().probability


def test_parity_gate_refuses_a_mismatched_graph(exported):
    """The gate fails when the ONNX graph is not the model being exported (weights changed after export)."""
    import torch

    detector, classifier, folder, images = exported
    with torch.no_grad():
        classifier.head[-1].bias += 1.0
    try:
        with pytest.raises(SystemExit, match="disagree"):
            check_parity(
                detector, classifier, folder / "detector.onnx", folder / "classifier.onnx", images, Tolerances()
            )
    finally:
        with torch.no_grad():
            classifier.head[-1].bias -= 1.0


def test_graphs_have_dynamic_batch_fixed_size_and_metadata(tiny_pack):
    """Both graphs of both variants take N x 1 x S x S float32 with a symbolic N, return float32, and carry
    labels, input size and precision as metadata."""
    pack = ModelPack.load(tiny_pack)
    assert pack.precisions == ("fp32", "fp16")
    for precision in pack.precisions:
        for model in ("detector", "classifier"):
            graph = onnx.load(str(pack.model_file(model, precision)))
            tensor_type = graph.graph.input[0].type.tensor_type
            dims = tensor_type.shape.dim
            size = pack.model_inputs.spec(model).size
            assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, size, size]
            assert tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert all(output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for output in graph.graph.output)
            metadata = {p.key: p.value for p in graph.metadata_props}
            assert metadata["input_size"] == str(size) and metadata["precision"] == precision
            expected = pack.local_labels if model == "detector" else pack.global_labels
            assert json.loads(metadata["labels"]) == expected


def test_fp16_variant_matches_pytorch_within_its_tolerances(exported):
    """The float16 graphs reproduce PyTorch within the fp16 tolerances, with the same top detections, at
    batch sizes 1 and 5 (and far closer than the float32 gate would allow float16 to be)."""
    detector, classifier, folder, images = exported
    for model in ("detector", "classifier"):
        export_float16(folder / f"{model}.onnx", folder / f"{model}.fp16.onnx", {"model": model})
    worst = check_parity(
        detector, classifier, folder / "detector.fp16.onnx", folder / "classifier.fp16.onnx", images, FP16_TOLERANCES
    )
    assert worst["probability"] <= FP16_TOLERANCES.probability and worst["score"] <= FP16_TOLERANCES.score
    assert worst["top_detections_missed"] == 0
    assert worst["probability"] > FP32_TOLERANCES.probability / 100  # it really ran in float16


def test_fp16_variant_keeps_the_decoding_tail_in_float32(tiny_pack):
    """In the float16 detector, exp / sigmoid and everything computed from them are float32 (no float16 round
    trip between them), the convolutions are float16, and no two nodes share a name."""
    pack = ModelPack.load(tiny_pack)
    fp32_graph = onnx.load(str(pack.model_file("detector"))).graph
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(pack.model_file("detector", "fp16")))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output, *graph.input]}
    by_name = {node.name: node for node in graph.node}
    assert len(by_name) == len(graph.node)
    tail = float32_tail(fp32_graph)
    assert {"Exp", "Sigmoid", "Sqrt"} <= {by_name[name].op_type for name in tail}
    for name in tail:
        assert all(types[output] == onnx.TensorProto.FLOAT for output in by_name[name].output), name
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    assert convolutions and all(types[node.output[0]] == onnx.TensorProto.FLOAT16 for node in convolutions)


def test_fp16_variant_is_about_half_the_size(tiny_pack):
    """The float16 files store weights in 2 bytes: each is at most 60% of its float32 file."""
    pack = ModelPack.load(tiny_pack)
    for model in ("detector", "classifier"):
        assert pack.model_file(model, "fp16").stat().st_size <= 0.6 * pack.model_file(model).stat().st_size


def test_manifest_lists_variants_parity_and_label_selection(tiny_pack):
    """The manifest gives each variant's file and sha256, the measured parity of both variants against their
    tolerances, and which labels were trained."""
    manifest = ModelPack.load(tiny_pack).manifest
    assert manifest["precisions"] == ["fp32", "fp16"]
    for model in ("detector", "classifier"):
        variant = manifest[model]["variants"]["fp16"]
        assert variant["file"] == f"{model}.fp16.onnx" and len(variant["sha256"]) == 64
    parity = manifest["export_parity"]
    for precision, tolerances in (("fp32", FP32_TOLERANCES), ("fp16", FP16_TOLERANCES)):
        measured = parity[precision]["providers"]["CPUExecutionProvider"]["max_abs_difference"]
        assert parity[precision]["tolerances"]["probability"] == tolerances.probability
        assert 0 <= measured["probability"] <= tolerances.probability
    assert parity["fp16"]["providers"]["CPUExecutionProvider"]["top_detections"]["missed"] == 0
    selection = manifest["label_selection"]
    assert selection["local"]["trained"] == manifest["detector"]["labels"]
    assert selection["global"]["trained"] == manifest["classifier"]["labels"]
    assert "research" in manifest["intended_use"].lower() and "not for diagnostic use" in manifest["intended_use"]


def test_tampered_fp16_variant_is_rejected(tiny_pack, tmp_path):
    """A replaced float16 file fails the pack's verification, naming the variant, like a replaced float32 one."""
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(tiny_pack, copy)
    (copy / "detector.fp16.onnx").write_bytes(b"not the model")
    with pytest.raises(PackError, match=r"fp16 detector file detector\.fp16\.onnx has sha256"):
        ModelPack.load(copy)


def test_fp32_only_pack_loads(tiny_pack, tmp_path):
    """A pack without float16 variants (what `export --no-fp16` writes: no `variants`, no fp16 files) loads and
    offers fp32 only."""
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(tiny_pack, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["precisions"] = ["fp32"]
    for model in ("detector", "classifier"):
        del manifest[model]["variants"]
        (copy / f"{model}.fp16.onnx").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    pack = ModelPack.load(copy)
    assert pack.precisions == ("fp32",) and pack.model_file("detector").name == "detector.onnx"
    with pytest.raises(PackError, match="no fp16 detector"):
        pack.model_file("detector", "fp16")


def _detections(rows: list[tuple[float, float, float, float, float, int]]) -> Detections:
    array = np.array(rows, dtype=np.float32).reshape(-1, 6)
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(np.int64))


def test_top_detection_check_counts_only_missing_or_different_findings():
    """A reference detection counts as found when the candidate has one of the same class with IoU >= 0.5 and a
    score within tolerance; detections below the minimum score and beyond the top k are not checked."""
    reference = _detections(
        [
            (0, 0, 10, 10, 0.9, 0),
            (20, 20, 30, 30, 0.8, 1),
            (40, 40, 50, 50, 0.7, 2),
            (60, 60, 70, 70, 0.6, 3),
            (80, 80, 90, 90, 0.06, 4),
        ]
    )
    candidate = _detections(
        [
            (0, 0, 10, 11, 0.89, 0),  # found: small box and score change
            (20, 20, 30, 30, 0.8, 2),  # class changed: missed
            (40, 40, 50, 50, 0.6, 2),
        ]
    )  # score moved by 0.1: missed
    assert missed_top_detections(reference, candidate, count=4, min_score=0.07, score_tolerance=0.02) == (4, 3)
    assert missed_top_detections(reference, candidate, count=1, min_score=0.07, score_tolerance=0.02) == (1, 0)
    assert missed_top_detections(reference, reference, count=10, min_score=0.07, score_tolerance=0.0) == (4, 0)


def test_label_selection_says_why_labels_were_not_trained():
    """Labels of the dataset's label set that were not trained get a reason: too few examples (with the count)
    under the --min-examples rule, or not requested when labels were named."""
    records = [
        Record(
            image_id=f"i{k}",
            path=None,
            boxes=(Box("Cardiomegaly", 0, 0, 1, 1),) * (k < 3),
            image_labels={"Pneumonia": int(k < 12)},
        )
        for k in range(12)
    ]
    run_args = {"dataset": "vindr-pcxr", "min_examples": 10, "local_labels": None, "global_labels": None}
    selection = label_selection(run_args, [], ["Pneumonia"], records)
    assert selection["local"]["not_trained"]["Cardiomegaly"] == "fewer than 10 examples (3 in the training split)"
    assert selection["global"]["trained"] == ["Pneumonia"] and "Pneumonia" not in selection["global"]["not_trained"]
    named = label_selection(run_args | {"global_labels": ["Bronchitis"]}, [], ["Bronchitis"], records)
    assert named["global"]["not_trained"]["Pneumonia"] == "not among the labels requested for training"


def test_evaluation_report_is_summarised_and_copied(tmp_path):
    """--evaluation: the manifest gets the headline metrics with their intervals and the per-label AP / AUROC,
    and the report, its .md and its curves are copied beside the pack."""
    source, pack = tmp_path / "run", tmp_path / "pack"
    source.mkdir(), pack.mkdir()
    report = {
        "source": "run x",
        "data": "d",
        "split": "test",
        "images": 5,
        "detection": {
            "map40": 0.5,
            "map40_ci": {"low": 0.4, "high": 0.6},
            "map50": 0.4,
            "per_class": {"Cardiomegaly": {"ap40": 0.5, "ap50": 0.4, "boxes": 3}},
        },
        "classification": {"mean_auroc": 0.8, "per_label": {"Pneumonia": {"auroc": 0.8, "f1": 0.5}}},
    }
    (source / "evaluation_test.json").write_text(json.dumps(report))
    (source / "evaluation_test.md").write_text("# report")
    (source / "roc_curves_test.png").write_bytes(b"png")
    summary = copy_evaluation(source / "evaluation_test.json", pack)
    assert summary["detection"] == {
        "map40": 0.5,
        "map40_ci": {"low": 0.4, "high": 0.6},
        "map50": 0.4,
        "per_class": {"Cardiomegaly": {"ap40": 0.5}},
    }
    assert summary["classification"] == {"mean_auroc": 0.8, "per_label": {"Pneumonia": {"auroc": 0.8}}}
    assert summary["report"] == "evaluation_test.json" and summary["images"] == 5
    assert sorted(p.name for p in pack.iterdir()) == [
        "evaluation_test.json",
        "evaluation_test.md",
        "roc_curves_test.png",
    ]


def test_tampered_pack_is_rejected(tiny_pack, tmp_path):
    """A model file whose sha256 differs from the manifest (truncated or replaced) fails to load, saying why."""
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(tiny_pack, copy)
    data = (copy / "classifier.onnx").read_bytes()
    (copy / "classifier.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(PackError, match="sha256"):
        ModelPack.load(copy)
