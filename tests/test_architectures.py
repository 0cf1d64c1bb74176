"""The architecture registry: every backbone builds both models with the same head contract, and every one trains,
exports (dynamic batch, parity gate) and serves unchanged at a tiny size, detector and classifier at their own sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.inference.modelpack import ModelPack
from service.settings import Settings
from tests.reference import at_operating_points
from training import export, train
from training.architectures import BACKBONES
from training.data import read_split
from training.evaluate import predict_records, torch_infer_from_run
from training.models import Classifier, Detector

REQUIRED = {
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
}
# Every registry entry exported at least once, across these packs and conftest.py's tiny pack (mobilenet_v3_small
# in both roles): an ONNX export costs 10-30 s of CPU per model, so each backbone is exported in one role; both
# roles build every backbone in the cheap PyTorch tests below, and a backbone's ops are the same in either role.
# The first pack is the gpu preset's pair (ResNet-50-FPN detector, DenseNet-121 classifier), exported with fp16.
PACKS = (
    ("resnet50", "densenet121"),
    ("efficientnet_b0", "efficientnet_b1"),
    ("convnext_tiny", "efficientnet_b2"),
    ("mobilenet_v3_large", "efficientnet_b3"),
)
DETECTOR_SIZE, CLASSIFIER_SIZE = 96, 64  # different on purpose: the service letterboxes once per size


def test_registry_has_the_torchvision_names_the_recipes_use():
    """resnet50, densenet121, efficientnet_b0..b3 and the MobileNets are registry entries, and the packs below
    export every entry."""
    assert set(BACKBONES) >= REQUIRED
    assert {name for pair in PACKS for name in pair} | {"mobilenet_v3_small"} == set(BACKBONES)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_classifier_is_pool_then_linear_so_class_activation_maps_are_exact(name):
    """logits = linear(mean of feature_map): the per-label map (features x the linear weights) averages to the logit."""
    torch.manual_seed(0)
    classifier = Classifier(3, name).eval()
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        features = classifier.feature_map(images)
        linear = classifier.head[-1]
        maps = torch.einsum("kc,nchw->nkhw", linear.weight, features)
        logits = classifier.logits(images)
    assert features.shape[:2] == (2, linear.in_features) and features.shape[-1] == 2  # stride 32 at 64²
    torch.testing.assert_close(maps.mean(dim=(2, 3)) + linear.bias, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_detector_taps_strides_8_16_32(name):
    """The FPN reads each backbone at strides 8, 16 and 32: 8² + 4² + 2² locations at 64², boxes and scores dense."""
    detector = Detector(2, name, fpn_channels=32).eval()
    with torch.no_grad():
        boxes, scores = detector(torch.zeros(3, 1, 64, 64))
    assert sorted(detector.taps.values()) == [8, 16, 32]
    assert boxes.shape == (3, 84, 4) and scores.shape == (3, 84, 2)


def _train_and_export(dataset: Path, root: Path, detector: str, classifier: str, fp16: bool) -> Path:
    run, pack = root / "run", root / "pack"
    recipe = ["--preset", "gpu", "--pretrained", "none"] if (detector, classifier) == PACKS[0] else []
    train.main(
        train.get_args_parser().parse_args(
            [
                *recipe,
                "--data",
                str(dataset),
                "--out",
                str(run),
                "--detector-backbone",
                detector,
                "--classifier-backbone",
                classifier,
                "--detector-input-size",
                str(DETECTOR_SIZE),
                "--classifier-input-size",
                str(CLASSIFIER_SIZE),
                "--fpn-channels",
                "32",
                "--epochs",
                "1",
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--min-examples",
                "1",
                "--workers",
                "0",
            ]
        )
    )
    options = ["--run", str(run), "--out", str(pack), "--parity-images", "3"]
    export.main(export.get_args_parser().parse_args([*options, *([] if fp16 else ["--no-fp16"])]))
    return pack


@pytest.mark.slow
@pytest.mark.parametrize(("detector", "classifier"), PACKS, ids=[f"{d}+{c}" for d, c in PACKS])
def test_each_architecture_trains_exports_and_serves(tiny_dataset, tmp_path, detector, classifier):
    """A pack of these backbones, detector at 96² and classifier at 64², passes the export's parity gate, declares
    each model's input, has a dynamic batch axis, and the service answers a DICOM exactly as PyTorch evaluates it."""
    first = (detector, classifier) == PACKS[0]
    pack_path = _train_and_export(tiny_dataset, tmp_path, detector, classifier, fp16=first)
    pack = ModelPack.load(pack_path)
    manifest = pack.manifest
    assert manifest["detector"]["backbone"] == detector and manifest["classifier"]["backbone"] == classifier
    assert [spec.size for spec in pack.input_specs] == [DETECTOR_SIZE, CLASSIFIER_SIZE]
    assert manifest["export_parity"]["fp32"]["providers"]["CPUExecutionProvider"]["max_abs_difference"]
    assert pack.precisions == (("fp32", "fp16") if first else ("fp32",))
    for model, size in (("detector", DETECTOR_SIZE), ("classifier", CLASSIFIER_SIZE)):
        graph = onnx.load(str(pack.model_file(model)), load_external_data=False)
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, size, size]
        assert json.loads({p.key: p.value for p in graph.metadata_props}["input_size"]) == size

    run = tmp_path / "run"
    if first:  # the gpu preset's recipe: its architectures and flags, except what the test sets
        saved = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["args"]
        assert saved["preset"] == "gpu" and saved["amp"] is True and saved["lr"] == pytest.approx(2e-4)
    infer, inputs, local_labels, _, _, params = torch_infer_from_run(run)
    records = read_split(tiny_dataset, "test")[:2]
    evaluation = predict_records(records, inputs, infer, params, batch_size=2, threads=1)
    # Every detection the postprocess keeps (a floor at its score threshold): the pack's operating points, applied
    # before NMS by the service, can keep detections that an untrained model's pre-NMS top-k cuts off after it.
    floor = params.score_threshold
    calibrated = pack.calibrated_probabilities(evaluation.probabilities)
    settings = Settings(
        models=pack_path,
        max_batch_size=2,
        providers=["CPUExecutionProvider"],
        decode_workers=1,
        finding_score_floor=floor,
    )
    with TestClient(create_app(settings)) as client:
        models = client.get("/v1/models").json()
        assert models["input_sizes"] == {"detector": DETECTOR_SIZE, "classifier": CLASSIFIER_SIZE}
        for index, record in enumerate(records):
            answer = client.post(
                "/v1/predict", content=record.path.read_bytes(), headers={"Content-Type": "application/dicom"}
            )
            assert answer.status_code == 200, answer.text
            served = answer.json()
            np.testing.assert_allclose(  # the service reports the pack's calibrated probabilities
                [d["probability"] for d in served["diseases"]], calibrated[index], atol=1e-4
            )
            expected = at_operating_points(evaluation.detections[index], pack.finding_thresholds(floor))
            assert [f["label"] for f in served["findings"]] == [local_labels[c] for c in expected.classes]
