"""The class activation map localisation loss (training/localisation.py, `--cam-loss`)."""

from __future__ import annotations

import pytest
import torch

from training.localisation import box_cells, cam_localisation_loss, measure_grid
from training.models import Classifier


def test_box_cells_take_centres_inside_and_the_cell_of_a_small_box():
    """Cells whose centre is inside a box, plus the cell under the centre of a box too small to hold one."""
    boxes = torch.tensor([[40.0, 40.0, 100.0, 70.0], [200.0, 200.0, 205.0, 205.0]])
    cells = box_cells(boxes, 8, 8, stride=32.0, origin=-15.5)
    # Centres at 32 j + 0.5: columns 2 and 3 (64.5, 96.5) and row 2 (64.5) for the first box; (6, 6) for the second.
    assert sorted(map(tuple, torch.nonzero(cells).tolist())) == [(2, 2), (2, 3), (6, 6)]
    assert not box_cells(torch.zeros(0, 4), 8, 8, 32.0, -15.5).any()


def test_loss_rewards_mass_inside_the_boxes_and_ignores_the_maps_level():
    """Lower when the positive disease's map peaks in the box; adding a constant (the logit) changes nothing."""
    boxes = [torch.tensor([[0.0, 0.0, 60.0, 60.0]])]  # cells (0..1, 0..1) of a 4 x 4 map at stride 32
    labels = torch.tensor([[0.0, 1.0]])  # label 0 skipped ("No finding"), label 1 positive
    inside, outside = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
    inside[0, 1, 0, 0] = 5.0
    outside[0, 1, 3, 3] = 5.0
    loss_inside = cam_localisation_loss(inside, boxes, labels, 32.0, -15.5, skip=(0,))
    loss_outside = cam_localisation_loss(outside, boxes, labels, 32.0, -15.5, skip=(0,))
    assert float(loss_inside) < float(loss_outside)
    shifted = cam_localisation_loss(inside + 7.0, boxes, labels, 32.0, -15.5, skip=(0,))
    assert float(shifted) == pytest.approx(float(loss_inside), abs=1e-6)


def test_images_without_boxes_or_positive_diseases_add_nothing():
    """No (image, positive disease, box) triple: the loss is 0 and still differentiable."""
    maps = torch.randn(2, 3, 4, 4, requires_grad=True)
    boxes = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 50.0, 50.0]])]
    labels = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # image 2 is positive only for the skipped label
    loss = cam_localisation_loss(maps, boxes, labels, 32.0, -15.5, skip=(0,))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(maps.grad.abs().sum()) == 0.0


def test_gradient_steps_move_the_peak_into_the_box():
    """Descending the loss alone moves a map's maximum from outside into the finding's box."""
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 6, 6] = 3.0
    maps.requires_grad_(True)
    boxes = [torch.tensor([[30.0, 30.0, 100.0, 100.0]])]  # cells 1..2 at stride 32, origin -15.5
    optimizer = torch.optim.SGD([maps], lr=5.0)
    for _ in range(20):
        optimizer.zero_grad()
        cam_localisation_loss(maps, boxes, torch.ones(1, 1), 32.0, -15.5).backward()
        optimizer.step()
    row, column = divmod(int(maps[0, 0].argmax()), 8)
    assert 1 <= row <= 2 and 1 <= column <= 2


def test_measured_grid_matches_the_exported_one_for_mobilenet():
    """measure_grid finds MobileNetV3's 32-pixel cells centred on 32 j + 0.5 (origin -15.5)."""
    torch.manual_seed(0)  # the centroid of a random network's gradient moves by a pixel or two with its weights
    stride, origin = measure_grid(Classifier(2).eval().feature_map, 512)
    assert stride == 32.0 and origin == pytest.approx(-15.5, abs=2.0)


def test_training_adds_the_term_on_the_map_the_classifier_pools():
    """--cam-loss: JointModel reports a "cam" loss whose gradient reaches the classifier (shared or own backbone)."""
    import argparse

    from training.engine import JointModel
    from training.models import Detector
    from training.train import cam_loss_term

    labels = ["No finding", "Pneumonia"]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([0])}]
    for shared in (False, True):
        detector = Detector(1)
        classifier = Classifier(2, features=detector.features) if shared else Classifier(2)
        args = argparse.Namespace(
            cam_loss=0.5, shared_backbone=shared, detector_input_size=128, classifier_input_size=64
        )
        term = cam_loss_term(args, detector, classifier, labels)
        assert term.skip == (0,) and term.stride == 32.0
        assert term.box_scale == (1.0 if shared else 0.5)
        model = JointModel(detector, classifier, cam_loss=term).train()
        images = torch.randn(1, 1, 128, 128)
        losses = model(
            images, images if shared else images[..., ::2, ::2], targets, torch.tensor([[0.0, 1.0]]), torch.ones(2)
        )
        assert float(losses["cam"]) > 0
        losses["cam"].backward()
        assert classifier.head[-1].weight.grad.abs().sum() > 0
    assert cam_loss_term(argparse.Namespace(cam_loss=0.0), detector, classifier, labels) is None
