"""FCOS assignment trains every box: each ground-truth box of the phantom set gets a positive location at every
supported input size, including boxes too small to contain a location."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.dicom.preprocess import Letterbox
from training.models import DETECTOR_STRIDES, centerness_targets, fcos_targets
from training.synthetic import render_case

SUPPORTED_SIZES = (64, 128, 256, 384, 512, 768, 1024)
ROWS, COLS = 1643, 1349  # the VinDr-PCXR paper's median size: boxes keep their size relative to the image


def _locations(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Location centres and strides of the detector's levels for a size x size input (as Detector.dense builds them)."""
    points, strides = [], []
    for stride in DETECTOR_STRIDES:
        cells = -(-size // stride)
        centres = (torch.arange(cells, dtype=torch.float32) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
        strides.append(torch.full((cells * cells,), float(stride)))
    return torch.cat(points), torch.cat(strides)


@pytest.fixture(scope="module")
def phantom_boxes() -> list[np.ndarray]:
    """The boxes of 30 phantoms (all three difficulties, findings drawn at random), in original pixels.

    Rendered at a third of the size (quicker; finding sizes are relative to the anatomy) and scaled back up.
    """
    images = []
    for seed in range(30):
        difficulty = ("easy", "default", "hard")[seed % 3]
        case = render_case(np.random.default_rng(seed), ROWS // 3, COLS // 3, difficulty, findings=None)
        images.append(3 * np.array([[f.x_min, f.y_min, f.x_max, f.y_max] for f in case.findings]).reshape(-1, 4))
    assert sum(len(boxes) for boxes in images) >= 30
    return images


@pytest.mark.parametrize("size", SUPPORTED_SIZES)
def test_every_phantom_box_gets_a_positive_location(phantom_boxes, size):
    """At each input size, every box of every phantom is matched to at least one location, and no location to two."""
    points, strides = _locations(size)
    geometry = Letterbox(ROWS, COLS, size)
    for boxes in phantom_boxes:
        if not len(boxes):
            continue
        model_boxes = torch.from_numpy(geometry.to_model(boxes))
        matched, labels = fcos_targets(points, strides, model_boxes, torch.arange(len(boxes)))
        assert set(matched[matched >= 0].tolist()) == set(range(len(boxes)))
        assert (labels[matched >= 0] == matched[matched >= 0]).all()


def test_small_boxes_need_the_fallback_and_get_a_usable_target():
    """A box between location centres (smaller than the stride) has no location inside it: it still gets the
    nearest one, whose centerness target is 1 and whose box loss is finite."""
    points, strides = _locations(64)
    box = torch.tensor([[9.0, 9.0, 11.5, 11.5]])  # stride-8 centres are at 4, 12, 20, ...: none inside
    matched, _ = fcos_targets(points, strides, box, torch.tensor([0]))
    (location,) = torch.nonzero(matched == 0).flatten().tolist()
    assert points[location].tolist() == [12.0, 12.0] and strides[location] == 8
    assert centerness_targets(points[location : location + 1], box).item() == 1.0


def test_two_tiny_boxes_sharing_a_nearest_location_both_train():
    """When two tiny boxes are nearest to the same location, the second takes the next free one."""
    points, strides = _locations(64)
    boxes = torch.tensor([[9.0, 9.0, 11.0, 11.0], [13.0, 13.0, 15.0, 15.0]])
    matched, _ = fcos_targets(points, strides, boxes, torch.tensor([0, 1]))
    assert sorted(matched[matched >= 0].tolist()) == [0, 1]


def test_centerness_inside_a_box_is_fcos():
    """Inside its box a location's centerness is FCOS's sqrt(min/max of left-right x min/max of top-bottom)."""
    value = centerness_targets(torch.tensor([[10.0, 20.0]]), torch.tensor([[0.0, 0.0, 40.0, 40.0]])).item()
    assert value == pytest.approx(np.sqrt((10 / 30) * (20 / 20)))


def test_without_the_fallback_some_phantom_boxes_would_never_train(phantom_boxes):
    """At 128² some phantom boxes contain no location centre at all: FCOS's rules alone cannot assign them."""
    points, _ = _locations(128)
    geometry = Letterbox(ROWS, COLS, 128)
    empty = 0
    for boxes in phantom_boxes:
        for box in geometry.to_model(boxes.reshape(-1, 4)):
            x, y = points[:, 0].numpy(), points[:, 1].numpy()
            empty += not ((x > box[0]) & (x < box[2]) & (y > box[1]) & (y < box[3])).any()
    assert empty > 0
