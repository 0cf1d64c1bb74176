"""Export gate: ONNX Runtime reproduces PyTorch, the pack is stamped and verified, evaluation equals serving."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from service.modelpack import ModelPack, PackError
from service.postprocess import at_operating_points
from training.data import load_tensors, read_split
from training.evaluate import predict_records, torch_infer_from_run
from training.export import Tolerances, check_parity, export_onnx, load_run


@pytest.fixture(scope="module")
def exported(tiny_run, tiny_dataset, tmp_path_factory):
    checkpoint, detector, classifier = load_run(tiny_run)
    folder = tmp_path_factory.mktemp("onnx")
    size = checkpoint["input_size"]
    export_onnx(detector, size, ("boxes", "scores"), folder / "detector.onnx", {"model": "detector"})
    export_onnx(classifier, size, ("probabilities",), folder / "classifier.onnx", {"model": "classifier"})
    from service.pipeline import InputSpec
    from service.preprocess import Normalization

    spec = InputSpec(size, Normalization(*checkpoint["normalization"]))
    images = load_tensors(read_split(tiny_dataset, "test")[:5], spec, checkpoint["local_labels"], checkpoint["global_labels"]).images
    return detector, classifier, folder, images


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_pytorch_on_real_images(exported, batch):
    """Boxes, scores and probabilities agree within the export tolerances at batch sizes 1 and 5."""
    detector, classifier, folder, images = exported
    worst = check_parity(detector, classifier, folder / "detector.onnx", folder / "classifier.onnx", images[:batch], Tolerances())
    assert worst["box_pixels"] <= Tolerances().box_pixels and worst["probability"] <= Tolerances().probability


def test_parity_gate_refuses_a_mismatched_graph(exported):
    """The gate fails when the ONNX graph is not the model being exported (weights changed after export)."""
    import torch

    detector, classifier, folder, images = exported
    with torch.no_grad():
        classifier.head[-1].bias += 1.0
    try:
        with pytest.raises(SystemExit, match="disagree"):
            check_parity(detector, classifier, folder / "detector.onnx", folder / "classifier.onnx", images, Tolerances())
    finally:
        with torch.no_grad():
            classifier.head[-1].bias -= 1.0


def test_graphs_have_dynamic_batch_fixed_size_and_metadata(tiny_pack):
    """Both graphs take N x 1 x S x S with a symbolic N, and carry labels and input size as metadata."""
    pack = ModelPack.load(tiny_pack)
    for model in ("detector", "classifier"):
        graph = onnx.load(str(pack.model_file(model)))
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, pack.input_spec.size, pack.input_spec.size]
        metadata = {p.key: p.value for p in graph.metadata_props}
        assert metadata["input_size"] == str(pack.input_spec.size)
        expected = pack.local_labels if model == "detector" else pack.global_labels
        assert json.loads(metadata["labels"]) == expected


def test_tampered_pack_is_rejected(tiny_pack, tmp_path):
    """A model file whose sha256 differs from the manifest (truncated or replaced) fails to load, saying why."""
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(tiny_pack, copy)
    data = (copy / "classifier.onnx").read_bytes()
    (copy / "classifier.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(PackError, match="sha256"):
        ModelPack.load(copy)


def test_evaluation_in_pytorch_equals_service_json(client, tiny_run, tiny_dataset, tiny_pack):
    """For a test DICOM, the evaluation code (PyTorch) and the service (ONNX, from the DICOM bytes) give the
    same boxes and probabilities."""
    infer, spec, local_labels, global_labels, _, params = torch_infer_from_run(tiny_run)
    reporting = ModelPack.load(tiny_pack).finding_thresholds()
    records = read_split(tiny_dataset, "test")[:3]
    evaluation = predict_records(records, spec, infer, params, batch_size=3, threads=1)
    for index, record in enumerate(records):
        served = client.post("/v1/predict", content=record.path.read_bytes(), headers={"Content-Type": "application/dicom"}).json()
        np.testing.assert_allclose([d["probability"] for d in served["diseases"]], evaluation.probabilities[index], atol=1e-4)
        expected = at_operating_points(evaluation.detections[index], reporting)
        assert [f["label"] for f in served["findings"]] == [local_labels[c] for c in expected.classes]
        served_boxes = np.array([[f["box"][k] for k in ("x_min", "y_min", "x_max", "y_max")] for f in served["findings"]]).reshape(-1, 4)
        np.testing.assert_allclose(served_boxes, expected.boxes, atol=0.011)  # the JSON rounds boxes to 0.01 px
        np.testing.assert_allclose([f["score"] for f in served["findings"]], expected.scores, atol=1e-4)
