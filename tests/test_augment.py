"""Augmentation with boxes (torchvision.transforms.v2): the boxes follow the pixels, laterality is kept by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.dicom.preprocess import Normalization
from training.augment import AugmentConfig, augment_sample, radiograph_augmentation

NORMALIZATION = Normalization(mean=0.5, std=0.25)
SIZE = 128


def _bright_rectangles(boxes: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised input, black except for a white rectangle per (x0, y0, x1, y1) box; the boxes as a tensor."""
    display = torch.zeros(1, SIZE, SIZE)
    for x0, y0, x1, y1 in boxes:
        display[:, y0:y1, x0:x1] = 1.0
    return (display - NORMALIZATION.mean) / NORMALIZATION.std, torch.tensor(boxes, dtype=torch.float32)


def _pixel_box(image: torch.Tensor, box: torch.Tensor) -> np.ndarray:
    """The extent of bright pixels near `box` (display > 0.5), as x0, y0, x1, y1 with exclusive maxima."""
    display = (image[0] * NORMALIZATION.std + NORMALIZATION.mean).numpy()
    x0, y0, x1, y1 = (int(v) for v in box.round())
    window = display[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] > 0.5
    rows, cols = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
    return np.array(
        [
            cols[0] + max(0, x0 - 4),
            rows[0] + max(0, y0 - 4),
            cols[-1] + 1 + max(0, x0 - 4),
            rows[-1] + 1 + max(0, y0 - 4),
        ]
    )


@pytest.mark.parametrize("seed", range(12))
def test_boxes_follow_the_pixels(seed):
    """After scale, shift, rotation and intensity changes, each transformed box is the transformed bright
    rectangle's extent within 2 pixels."""
    torch.manual_seed(seed)
    image, boxes = _bright_rectangles([(20, 30, 50, 52), (80, 70, 100, 110)])
    transform = radiograph_augmentation(AugmentConfig(), NORMALIZATION)
    out, moved, labels = augment_sample(transform, image, boxes, torch.tensor([0, 1]))
    assert out.shape == image.shape and out.dtype == torch.float32
    assert labels.tolist() == [0, 1][: len(labels)]
    for box in moved:
        np.testing.assert_allclose(_pixel_box(out, box), box.numpy(), atol=2.0)


def test_the_transform_really_moves_and_rescales():
    """Across seeds the boxes move, change size and the intensities change (it is not an identity)."""
    image, boxes = _bright_rectangles([(40, 40, 70, 60)])
    transform = radiograph_augmentation(AugmentConfig(), NORMALIZATION)
    shifts, widths, means = [], [], []
    for seed in range(20):
        torch.manual_seed(seed)
        out, moved, _ = augment_sample(transform, image, boxes, torch.tensor([0]))
        shifts.append(float((moved[0, :2] - boxes[0, :2]).abs().max()))
        widths.append(float(moved[0, 2] - moved[0, 0]))
        means.append(float(out.mean()))
    assert max(shifts) > 3 and max(widths) - min(widths) > 2 and np.std(means) > 1e-3


def test_no_horizontal_flip_unless_asked():
    """Laterality is anatomy: without --hflip a box on the image's left stays on the left; with it, it crosses."""
    image, boxes = _bright_rectangles([(5, 50, 35, 80)])
    plain = radiograph_augmentation(AugmentConfig(), NORMALIZATION)
    flipping = radiograph_augmentation(AugmentConfig(horizontal_flip=True), NORMALIZATION)
    centres_plain, centres_flipped = [], []
    for seed in range(16):
        torch.manual_seed(seed)
        centres_plain.append(float(augment_sample(plain, image, boxes, torch.tensor([0]))[1][0, ::2].mean()))
        torch.manual_seed(seed)
        centres_flipped.append(float(augment_sample(flipping, image, boxes, torch.tensor([0]))[1][0, ::2].mean()))
    assert max(centres_plain) < SIZE / 2
    assert max(centres_flipped) > SIZE / 2


def test_a_box_pushed_off_the_canvas_is_dropped_with_its_label():
    """A box that leaves the image entirely is removed together with its label (SanitizeBoundingBoxes)."""
    image, boxes = _bright_rectangles([(0, 0, 3, 3), (60, 60, 90, 90)])
    transform = radiograph_augmentation(AugmentConfig(translate=0.3, scale=(1.0, 1.0), rotation=0.0), NORMALIZATION)
    seen_drop = False
    for seed in range(40):
        torch.manual_seed(seed)
        _, moved, labels = augment_sample(transform, image, boxes, torch.tensor([3, 5]))
        assert len(moved) == len(labels)
        assert ((moved[:, 2] - moved[:, 0]) >= 1).all() and ((moved[:, 3] - moved[:, 1]) >= 1).all()
        seen_drop |= labels.tolist() == [5]
    assert seen_drop
