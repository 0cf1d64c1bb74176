"""Per-disease heatmaps: the CAM output in the classifier graph, its place on the image, and the JSON/PNG/SEG forms."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from service.api.app import create_app
from service.dicom.pipeline import prepare
from service.dicom.preprocess import Letterbox
from service.inference.heatmaps import HeatmapGrid, heatmaps_json, region, to_pixels
from service.inference.modelpack import HEATMAP_OUTPUT, ModelPack
from service.viewer_outputs.codes import json_code
from service.viewer_outputs.heatmaps import decode, on_image, peak
from tests.dicom_checks import dciodvfy_errors
from training.export import export_onnx, with_heatmaps
from training.heatmaps import HeatmapsUnsupported, add_heatmap_output, feature_grid, find_cam_head
from training.localisation import measure_grid
from training.models import BACKBONES, Classifier

SIZE = 64  # model input of the graphs exported here: small enough to export every backbone in seconds


def _post(client, data: bytes, params: dict | None = None):
    return client.post("/v1/predict", content=data, params=params or {}, headers={"Content-Type": "application/dicom"})


def _dicom(tiny_dataset, index: int = 0) -> bytes:
    return sorted((tiny_dataset / "test").glob("*.dicom"))[index].read_bytes()


# --- the graph output ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKBONES)
def exported(request, tmp_path_factory):
    """A randomly initialised classifier of each registry backbone, exported as training.export does."""
    torch.manual_seed(0)
    classifier = Classifier(3, request.param).eval()
    path = tmp_path_factory.mktemp("cam") / f"{request.param}.onnx"
    found: dict = {}
    export_onnx(classifier, SIZE, ("probabilities",), path, {}, lambda g: with_heatmaps(g, SIZE, found))
    return request.param, classifier, path, found


def test_every_backbone_exports_exact_heatmaps(exported):
    """Each registry backbone gets the heatmaps output; its maps equal PyTorch's CAMs and average to the logits."""
    name, classifier, path, found = exported
    assert "unavailable" not in found, f"{name}: {found.get('unavailable')}"
    images = np.random.default_rng(0).normal(size=(2, 1, SIZE, SIZE)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, maps = session.run(["probabilities", HEATMAP_OUTPUT], {"images": images})
    with torch.no_grad():
        reference = classifier.class_activation_maps(torch.from_numpy(images)).numpy()
        logits = classifier.logits(torch.from_numpy(images)).numpy()
    assert maps.shape == reference.shape == (2, 3, *found["entry"]["shape"][1:])
    np.testing.assert_allclose(maps, reference, atol=1e-4)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), logits, atol=1e-4)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), atol=1e-5)


def test_map_origin_is_the_receptive_field_centre(exported):
    """The grid's origin puts each cell on the centroid of its receptive field, measured by back-propagation."""
    name, classifier, _, found = exported
    stride, origin = measure_grid(classifier.feature_map, 512)
    grid = found["entry"]["grid"]
    assert stride == grid["stride"], name
    # DenseNet's uncentred transition pools shift its cells by 14 pixels, MobileNet's "same" padding by -16: a
    # wrong grid is off by far more than the measurement's pixel or two.
    assert origin == pytest.approx(grid["origin"], abs=2.0), name


def _graph(nodes: list, initializers: list, feature_shape: tuple, name: str = "head") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializers,
        value_info=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", *feature_shape])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _linear_head(pool: str) -> tuple[list, list]:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["a"], ["features"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(pool, ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    initializers = [
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(2, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(2,)).astype(np.float32), "b"),
    ]
    return nodes, initializers


def test_grid_composes_strides_and_uncentred_pools():
    """A 3x3/2 "same" convolution then a 2x2/2 average pool (DenseNet's transition) centre cell i on input index
    4i + 1, so the 4-pixel cells start half a pixel above and left of the input."""
    model = _graph(*_linear_head("GlobalAveragePool"), (4, 4, 4))
    grid = feature_grid(model, "features")
    assert (grid.stride, grid.shift, grid.map_origin()) == (4.0, 1.0, -0.5)


def test_heatmaps_added_to_a_plain_graph_are_exact():
    """add_heatmap_output on a Gemm head: the maps average to the logits and the probabilities are untouched."""
    model = _graph(*_linear_head("GlobalAveragePool"), (4, 4, 4))
    augmented = add_heatmap_output(model)
    images = np.random.default_rng(2).normal(size=(3, 1, 16, 16)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(["probabilities"], {"images": images})[0]
    after, maps = ort.InferenceSession(augmented.SerializeToString()).run(
        ["probabilities", HEATMAP_OUTPUT], {"images": images}
    )
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(1 / (1 + np.exp(-maps.mean(axis=(2, 3)))), after, atol=1e-6)


def test_max_pooled_head_says_it_has_no_heatmaps():
    """A head on global max pooling has no exact CAM: the export says why and writes the graph unchanged."""
    model = _graph(*_linear_head("GlobalMaxPool"), (4, 4, 4))
    with pytest.raises(HeatmapsUnsupported, match="GlobalMaxPool"):
        find_cam_head(model)
    found: dict = {}
    assert with_heatmaps(model, 16, found) is model
    assert "GlobalMaxPool" in found["unavailable"]


# --- the JSON form and what viewers make of it -----------------------------------------------------


def test_pixels_run_from_the_maps_mean_to_its_maximum():
    """255 at the maximum, 0 at or below the mean (= the logit), linear between; a flat map is all 0."""
    maps = np.array([[[0.0, 1.0], [2.0, 5.0]], [[3.0, 3.0], [3.0, 3.0]]])  # means 2 and 3
    np.testing.assert_array_equal(to_pixels(maps), [[[0, 0], [0, 255]], [[0, 0], [0, 0]]])
    np.testing.assert_array_equal(to_pixels(np.array([[1.0, 2.0], [3.0, 6.0]])), [[0, 0], [0, 255]])
    assert to_pixels(np.array([[0.0, 4.0], [0.0, 0.0]]))[0, 1] == 255


def test_region_is_the_letterbox_inverse_of_the_grid():
    """A 1000 x 800 image in a 256 input: 8 cells of 32 from -15.5 cover columns -60.49..938.54, rows -60.55..939.45."""
    covered = region(Letterbox(rows=1000, columns=800, size=256), HeatmapGrid(32.0, -15.5), 8, 8)
    assert covered == {"x_min": -60.49, "y_min": -60.55, "x_max": 938.54, "y_max": 939.45}


def test_json_heatmap_round_trips_and_locates_its_peak():
    """The PNG decodes to the map's pixels; its peak and its resampled values sit where the cells lie."""
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 2] = 8.0  # one strong cell: row 1, column 2
    geometry = Letterbox(rows=400, columns=400, size=64)  # scale 0.16
    (heatmap,) = heatmaps_json(maps, geometry, HeatmapGrid(16.0, -7.5))
    pixels, rectangle = decode(heatmap)
    np.testing.assert_array_equal(pixels, to_pixels(maps)[0])
    assert rectangle == (-46.88, -46.88, 353.12, 353.12)
    cell = 100.0  # 16 model pixels / 0.16
    assert peak(heatmap) == pytest.approx((-46.875 + 2.5 * cell, -46.875 + 1.5 * cell), abs=0.02)
    on = on_image(heatmap, 400, 400)
    assert on.max() == pytest.approx(1.0, abs=0.01)
    assert np.unravel_index(on.argmax(), on.shape) == (103, 203)  # the cell centre, to the pixel


# --- through the API (the tiny pack, exported with heatmaps) ---------------------------------------


def test_include_heatmaps_gives_every_disease_its_map(client, tiny_dataset, tiny_pack):
    """?include=heatmaps: each disease has a PNG of the manifest's map shape and the letterbox-inverse rectangle."""
    data = _dicom(tiny_dataset)
    pack = ModelPack.load(tiny_pack)
    body = _post(client, data, {"include": "heatmaps"}).json()
    _, rows, columns = pack.heatmaps["shape"]
    prepared = prepare(data, pack.input_specs)
    grid = HeatmapGrid.from_manifest(pack.heatmaps, pack.model_inputs.classifier.size, columns)
    assert [d["label"] for d in body["diseases"]] == pack.global_labels
    for disease in body["diseases"]:
        heatmap = disease["heatmap"]
        with Image.open(io.BytesIO(base64.b64decode(heatmap["png"]))) as image:
            assert (image.mode, image.size) == ("L", (columns, rows))
        assert {k: heatmap[k] for k in ("x_min", "y_min", "x_max", "y_max")} == region(
            prepared.geometries[pack.input_index("classifier")], grid, rows, columns
        )
    assert all("heatmap" not in d for d in _post(client, data).json()["diseases"])


def test_every_finding_and_disease_carries_the_srs_code(client, tiny_dataset):
    """`code` is the codes table's concept, and the SR codes each finding and disease with exactly that concept."""
    data = _dicom(tiny_dataset, 1)
    body = _post(client, data).json()
    items = body["findings"] + body["diseases"]
    assert items and all(item["code"] == json_code(item["label"]) for item in items)
    sr = pydicom.dcmread(io.BytesIO(_post(client, data, {"format": "sr"}).content))
    coded = set()
    pending = list(sr.ContentSequence)
    while pending:
        item = pending.pop()
        pending += list(item.get("ContentSequence", []))
        for concept in [*item.get("ConceptNameCodeSequence", []), *item.get("ConceptCodeSequence", [])]:
            coded.add((concept.CodingSchemeDesignator, concept.CodeValue, concept.CodeMeaning))
    assert {(i["code"]["scheme"], i["code"]["value"], i["code"]["meaning"]) for i in items} <= coded


def test_overlay_draws_a_mosaic_of_coloured_panels(client, tiny_dataset, tiny_pack):
    """format=png&overlay=heatmaps: the annotated image and one coloured panel per disease, four to a row."""
    data = _dicom(tiny_dataset)
    response = _post(client, data, {"format": "png", "overlay": "heatmaps"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    panels = 1 + len(ModelPack.load(tiny_pack).global_labels)
    columns, rows = min(4, panels), -(-panels // 4)
    width, height = source.Columns, source.Rows  # the phantoms are smaller than a panel: not reduced
    with Image.open(io.BytesIO(response.content)) as mosaic:
        assert mosaic.size == (columns * width + (columns - 1) * 4, rows * height + (rows - 1) * 4)
        pixels = np.asarray(mosaic.convert("RGB")).astype(int)
    heat = [pixels[:height, (width + 4) * i : (width + 4) * i + width] for i in range(1, columns)]
    assert max(np.abs(panel[..., 0] - panel[..., 2]).max() for panel in heat) > 30  # colour over the grey image


def test_seg_is_a_valid_segmentation_of_the_source(client, tiny_dataset, tmp_path):
    """format=seg: a FRACTIONAL Segmentation referencing the image, one coded segment per disease, dciodvfy-clean."""
    data = _dicom(tiny_dataset, 2)
    body = _post(client, data, {"include": "heatmaps"}).json()
    response = _post(client, data, {"format": "seg"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    seg = pydicom.dcmread(io.BytesIO(response.content))
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "FRACTIONAL"
    assert (seg.Rows, seg.Columns, seg.StudyInstanceUID) == (source.Rows, source.Columns, source.StudyInstanceUID)
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    diseases = {d["label"]: d for d in body["diseases"]}
    assert [s.SegmentLabel for s in segments.values()] == list(diseases)
    for item in segments.values():
        concept = item.SegmentedPropertyTypeCodeSequence[0]
        code = diseases[item.SegmentLabel]["code"]
        assert (concept.CodingSchemeDesignator, concept.CodeValue) == (code["scheme"], code["value"])
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, functional in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(functional.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        derived = functional.DerivationImageSequence[0].SourceImageSequence[0]
        assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID
        disease = diseases[segments[number].SegmentLabel]
        expected = np.rint(255 * disease["probability"] * on_image(disease["heatmap"], seg.Rows, seg.Columns))
        assert np.abs(frame.astype(int) - expected).max() <= 1
    assert dciodvfy_errors(seg, tmp_path) == []


@pytest.mark.parametrize("params", [{"format": "sr", "overlay": "heatmaps"}, {"overlay": "heatmaps"}])
def test_overlay_without_png_is_refused(client, tiny_dataset, params):
    """overlay applies to the PNG only: any other format is a 422 invalid_request, before the upload is read."""
    response = _post(client, _dicom(tiny_dataset), params)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_pack_without_heatmaps_refuses_them_and_says_so(tiny_pack, tiny_settings, tiny_dataset, tmp_path):
    """A pack whose classifier lists no heatmaps output: 422 heatmaps_unavailable, /v1/models says heatmaps null."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_pack, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["classifier"]["outputs"] = ["probabilities"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(create_app(tiny_settings.model_copy(update={"models": plain}))) as other:
        assert other.get("/v1/models").json()["heatmaps"] is None
        for params in ({"include": "heatmaps"}, {"format": "seg"}, {"format": "png", "overlay": "heatmaps"}):
            response = _post(other, _dicom(tiny_dataset), params)
            assert response.status_code == 422 and response.json()["error"]["code"] == "heatmaps_unavailable"
        assert _post(other, _dicom(tiny_dataset)).status_code == 200


def test_models_describes_heatmaps_and_triage(client, tiny_pack):
    """/v1/models gives the maps' shape and grid and the triage operating point of the manifest."""
    body = client.get("/v1/models").json()
    manifest = json.loads((tiny_pack / "manifest.json").read_text())
    assert body["heatmaps"]["shape"] == manifest["classifier"]["heatmaps"]["shape"]
    assert body["heatmaps"]["grid"] == manifest["classifier"]["heatmaps"]["grid"]
    assert body["triage"]["threshold"] == manifest["triage"]["threshold"]


def test_triage_is_the_complement_of_no_finding_at_the_manifests_operating_point(client, tiny_dataset, tiny_pack):
    """triage.abnormality = 1 - P(No finding) of the same answer; priority expedite exactly at or above threshold."""
    threshold = json.loads((tiny_pack / "manifest.json").read_text())["triage"]["threshold"]
    for index in range(3):
        body = _post(client, _dicom(tiny_dataset, index)).json()
        no_finding = next(d for d in body["diseases"] if d["label"] == "No finding")
        assert body["triage"]["abnormality"] == pytest.approx(1 - no_finding["probability"], abs=1e-9)
        expected = "expedite" if body["triage"]["abnormality"] >= threshold else "routine"
        assert body["triage"]["priority"] == expected
