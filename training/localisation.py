"""Teach the classifier's class activation maps where the findings are (`--cam-loss`).

A classifier trained on image labels alone may find a disease from anything that correlates with it: on the
phantoms, the demo classifier's maps peak at a few fixed places whatever the image (the anatomy that predicts
the label), so its heatmaps do not point at the finding. The detector's boxes say where the findings are, and
they come with every training image, so the classifier can be told too:

For each image n and each disease k the image is positive for (other than "No finding"), the class activation
map M_nk (training/heatmaps.py: the head's weights applied to every cell of the last feature map) is turned
into a distribution over the cells with a softmax, and the loss is the negative log of the mass it puts on the
cells inside the image's finding boxes:

    loss = mean over (n, k) of  -log sum_{cells c in boxes of n} softmax(M_nk)_c

The softmax ignores a constant added to the map, and the map's mean is the disease's logit, so this term
shapes *where* the evidence lies and leaves *how much* there is (the probability) to the classification loss.
Which finding boxes belong to which disease is not in the labels (VinDr-PCXR labels diseases per image), so
every finding box of the image counts: the map of a positive disease must put its peak on one of the image's
findings. Images without a box, or without a positive disease, add nothing.

A cell is inside a box when its centre is; a box too small to hold a cell centre claims the cell holding its
own centre, so every box counts. Cell centres come from the same grid the export records in the manifest
(`feature_grid`), measured here once (`measure_grid`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def box_cells(
    boxes: torch.Tensor, rows: int, columns: int, stride: float, origin: float, device: torch.device | None = None
) -> torch.Tensor:
    """(rows, columns) bool: the map cells whose centres lie inside any of `boxes` ((B, 4) x_min, y_min, x_max,
    y_max in model-input pixels), plus the cell holding each box's centre. Cell (i, j)'s centre is at
    origin + stride * (j + 0.5), origin + stride * (i + 0.5)."""
    cells = torch.zeros(rows, columns, dtype=torch.bool, device=device)
    if len(boxes) == 0:
        return cells
    boxes = boxes.to(device=device, dtype=torch.float32)
    xs = origin + stride * (torch.arange(columns, device=device, dtype=torch.float32) + 0.5)
    ys = origin + stride * (torch.arange(rows, device=device, dtype=torch.float32) + 0.5)
    inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])  # (B, columns)
    inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])  # (B, rows)
    cells |= (inside_y[:, :, None] & inside_x[:, None, :]).any(dim=0)
    centre_x = ((boxes[:, 0] + boxes[:, 2]) / 2 - origin) / stride
    centre_y = ((boxes[:, 1] + boxes[:, 3]) / 2 - origin) / stride
    column = centre_x.floor().long().clamp(0, columns - 1)
    row = centre_y.floor().long().clamp(0, rows - 1)
    cells[row, column] = True
    return cells


def class_activation_maps(feature_map: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """(N, C, h, w) features and the head's linear layer -> (N, K, h, w) logit maps (their mean is the logit)."""
    return torch.einsum("kc,nchw->nkhw", linear.weight, feature_map) + linear.bias[None, :, None, None]


def cam_localisation_loss(
    maps: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    labels: torch.Tensor,
    stride: float,
    origin: float,
    skip: Sequence[int] = (),
) -> torch.Tensor:
    """The module docstring's loss for (N, K, h, w) maps, each image's (B, 4) finding boxes in model-input pixels,
    (N, K) 0/1 labels; labels in `skip` (e.g. "No finding") are left out. 0 (with a gradient path) when no pair
    counts."""
    n_images, n_labels, rows, columns = maps.shape
    log_mass = []
    for n in range(n_images):
        cells = box_cells(boxes[n], rows, columns, stride, origin, maps.device)
        if not bool(cells.any()):
            continue
        positive = [k for k in range(n_labels) if k not in skip and float(labels[n, k]) >= 0.5]
        if not positive:
            continue
        log_p = torch.log_softmax(maps[n, positive].float().flatten(1), dim=1)  # (P, h*w)
        log_mass.append(torch.logsumexp(log_p[:, cells.flatten()], dim=1))
    if not log_mass:
        return maps.sum() * 0.0
    return -torch.cat(log_mass).mean()


def measure_grid(feature_map: Callable[[torch.Tensor], torch.Tensor], size: int) -> tuple[float, float]:
    """(stride, origin) of a backbone's last feature map on a size x size input, measured: the centroid of the
    input gradient of the central cell (a random mix of its channels: a plain sum can be constant, as after a
    LayerNorm) is its centre, origin + stride * (cell + 0.5). The export derives the grid exactly from the ONNX
    graph (training/heatmaps.feature_grid); this measurement is within a pixel or two of it, which the loss does
    not notice (cells are 32 pixels)."""
    generator = torch.Generator().manual_seed(0)
    # Noise, not zeros: a zero input leaves ReLUs at their kink, where the gradient is 0.
    image = torch.randn(1, 1, size, size, generator=generator).requires_grad_(True)
    features = feature_map(image)
    rows, columns = features.shape[-2:]
    stride = size / columns
    mix = torch.randn(features.shape[1], generator=generator)
    (features[0, :, rows // 2, columns // 2] * mix).sum().backward()
    weights = image.grad[0, 0].abs().sum(dim=0)
    centre = float((weights * (torch.arange(size) + 0.5)).sum() / weights.sum())  # in pixel edges
    return stride, centre - stride * (columns // 2 + 0.5)


@dataclass(frozen=True)
class CamLoss:
    """The `--cam-loss` term as training computes it: `weight` x cam_localisation_loss on the classifier's feature map.

    `box_scale` takes the targets' boxes (detector-input pixels) to the pixels of the input the feature map was
    computed from (classifier size / detector size; 1 when the classifier shares the detector's backbone).
    """

    weight: float
    stride: float
    origin: float
    box_scale: float = 1.0
    skip: tuple[int, ...] = ()

    def __call__(
        self, feature_map: torch.Tensor, linear: nn.Linear, targets: Sequence[dict], labels: torch.Tensor
    ) -> torch.Tensor:
        maps = class_activation_maps(feature_map.float(), linear)
        boxes = [target["boxes"] * self.box_scale for target in targets]
        return self.weight * cam_localisation_loss(maps, boxes, labels, self.stride, self.origin, self.skip)
