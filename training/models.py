"""Detector and classifier built from torchvision parts.

Both take N x 1 x S x S normalised grayscale images (see `service.dicom.preprocess`) and export to ONNX
with a dynamic batch axis. The grayscale channel is repeated to three inside the graph so that
ImageNet weights fit the first convolution while the host only ships one channel per pixel to the GPU.
The backbones come from the registry in `training.architectures` (torchvision's names); the detector and
the classifier may use different ones, and different input sizes.

Detector: an FCOS-style anchor-free head (Tian et al. 2019) on a backbone + FPN over strides 8, 16, 32
(resnet50 gives the usual ResNet-50-FPN). The exported graph returns dense per-location boxes and
scores; NMS is the shared numpy postprocess in `service.inference.postprocess`, so PyTorch evaluation
and the ONNX service decode detections identically.

Classifier: backbone -> global average pool -> dropout -> one linear layer, for every backbone, so
the class activation map of a label is exactly its linear weights applied to `feature_map(images)`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, generalized_box_iou_loss, sigmoid_focal_loss

from training.architectures import BACKBONES, backbone, stage_ends

__all__ = ["BACKBONES", "DETECTOR_STRIDES", "Classifier", "Detector", "detection_loss", "fcos_targets"]

DETECTOR_STRIDES = (8, 16, 32)


class Detector(nn.Module):
    def __init__(
        self,
        num_classes: int,
        backbone_name: str = "mobilenet_v3_small",
        fpn_channels: int = 64,
        pretrained: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = backbone(backbone_name, pretrained)
        ends = stage_ends(self.features)
        self.taps = {index: stride for index, (stride, _) in ends.items() if stride in DETECTOR_STRIDES}
        in_channels = [channels for index, (stride, channels) in sorted(ends.items()) if stride in DETECTOR_STRIDES]
        # Blocks after the stride-32 tap would be dead weight; a backbone without any can be shared (Classifier).
        self.whole_backbone = max(self.taps) == len(self.features) - 1
        self.features = self.features[: max(self.taps) + 1]
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels)
        self.cls_tower = self._tower(fpn_channels)
        self.reg_tower = self._tower(fpn_channels)
        self.cls_logits = nn.Conv2d(fpn_channels, num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(fpn_channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(fpn_channels, 1, 3, padding=1)
        # One learnable scale per level, as in FCOS, so a shared head can regress every size.
        self.level_scales = nn.Parameter(torch.ones(len(DETECTOR_STRIDES)))
        # Start with a low foreground probability so focal loss is not swamped at step 0.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))

    @staticmethod
    def _tower(channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(16, channels), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)

    def backbone_taps(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The backbone's feature maps at strides 8, 16 and 32 (keys "8", "16", "32"); "32" is its final map."""
        x = images.expand(-1, 3, -1, -1)
        taps: OrderedDict[str, torch.Tensor] = OrderedDict()
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self.taps:
                taps[str(self.taps[index])] = x
        return taps

    def dense(
        self, images: torch.Tensor, taps: OrderedDict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw per-location outputs over all levels (from `taps` when the backbone already ran on `images`).

        Returns cls logits (N, L, C), ltrb distances in input pixels (N, L, 4), centerness
        logits (N, L), location centres (L, 2) and each location's stride (L,).
        """
        levels = self.fpn(taps if taps is not None else self.backbone_taps(images))
        cls, reg, ctr, points, strides = [], [], [], [], []
        for level, (name, feature) in enumerate(levels.items()):
            stride = int(name)
            _n, _, h, w = feature.shape
            cls_feature, reg_feature = self.cls_tower(feature), self.reg_tower(feature)
            cls.append(self.cls_logits(cls_feature).flatten(2).transpose(1, 2))
            distances = torch.exp((self.level_scales[level] * self.box_deltas(reg_feature)).clamp(max=10.0)) * stride
            reg.append(distances.flatten(2).transpose(1, 2))
            ctr.append(self.centerness(reg_feature).flatten(1))
            ys = (torch.arange(h, device=images.device, dtype=images.dtype) + 0.5) * stride
            xs = (torch.arange(w, device=images.device, dtype=images.dtype) + 0.5) * stride
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
            strides.append(torch.full((h * w,), float(stride), device=images.device, dtype=images.dtype))
        return torch.cat(cls, 1), torch.cat(reg, 1), torch.cat(ctr, 1), torch.cat(points), torch.cat(strides)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes (N, L, 4) xyxy in input pixels, scores (N, L, C) in [0, 1])."""
        cls, reg, ctr, points, _ = self.dense(images)
        boxes = torch.cat([points - reg[..., :2], points + reg[..., 2:]], dim=-1)
        scores = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr).unsqueeze(-1))
        return boxes, scores


def fcos_targets(
    points: torch.Tensor,
    strides: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    center_radius: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each location to at most one ground-truth box: FCOS's rules, then a fallback so every box trains.

    FCOS: a location is positive for a box when it lies in the box's central region (radius in strides)
    and the box's size suits the location's level; ties go to the smallest box. A box narrower than the
    stride between locations can contain no location at all (a 6-pixel nodule between stride-8 centres)
    and would never train: every box left without a location gets the free location nearest its centre,
    a location inside the box when there is one, else the nearest outside it (see detection_loss).
    Returns (matched box index per location or -1, matched label or -1).
    """
    num_points = points.shape[0]
    if gt_boxes.numel() == 0:
        none = torch.full((num_points,), -1, dtype=torch.long, device=points.device)
        return none, none
    x, y = points[:, 0:1], points[:, 1:2]
    left, top = x - gt_boxes[:, 0], y - gt_boxes[:, 1]
    right, bottom = gt_boxes[:, 2] - x, gt_boxes[:, 3] - y
    ltrb = torch.stack([left, top, right, bottom], dim=-1)  # (L, G, 4)
    centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    radius = strides[:, None] * center_radius
    in_center = ((x - centers[:, 0]).abs() < radius) & ((y - centers[:, 1]).abs() < radius)
    inside = ltrb.min(dim=-1).values > 0
    # Level size ranges scale with the stride: (4s, 8s] regressed at stride s, open-ended at the top.
    max_distance = ltrb.max(dim=-1).values
    lower = torch.where(strides == min(DETECTOR_STRIDES), 0.0, strides * 4)[:, None]
    upper = torch.where(strides == max(DETECTOR_STRIDES), float("inf"), strides * 8)[:, None]
    suits_level = (max_distance > lower) & (max_distance <= upper)
    candidate = inside & in_center & suits_level
    areas = ((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1]))[None].expand(num_points, -1)
    areas = torch.where(candidate, areas, torch.full_like(areas, float("inf")))
    best_area, best = areas.min(dim=1)
    matched = torch.where(torch.isfinite(best_area), best, torch.full_like(best, -1))
    _assign_unmatched_boxes(matched, points, centers, inside)
    labels = torch.where(matched >= 0, gt_labels[matched.clamp(min=0)], torch.full_like(matched, -1))
    return matched, labels


def _assign_unmatched_boxes(
    matched: torch.Tensor, points: torch.Tensor, centers: torch.Tensor, inside: torch.Tensor
) -> None:
    """Give every box without a location the free location nearest its centre (inside the box first), in place."""
    has_location = torch.zeros(centers.shape[0], dtype=torch.bool, device=points.device)
    has_location[matched[matched >= 0]] = True
    for box in torch.nonzero(~has_location).flatten().tolist():
        distance = ((points - centers[box]) ** 2).sum(dim=-1)
        # Outside the box costs more than any distance inside it; taken locations are not available.
        distance = distance + torch.where(inside[:, box], 0.0, float(distance.max()) + 1.0)
        distance = torch.where(matched < 0, distance, torch.full_like(distance, float("inf")))
        nearest = int(distance.argmin())
        if torch.isfinite(distance[nearest]):
            matched[nearest] = box


def centerness_targets(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of each location in its box; 1 for a fallback location outside its (tiny) box.

    Such a location is the only one its box has, so it is that box's best location: its score must not be
    suppressed by a centerness of 0. Its regression target stays the box itself: GIoU is defined for a
    predicted box (which always contains its location) that does not contain the target.
    """
    ltrb = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], dim=-1)
    inside = ltrb.min(dim=-1).values > 0
    ltrb = ltrb.clamp(min=1e-6)
    ratio = (ltrb[:, [0, 2]].min(-1).values / ltrb[:, [0, 2]].max(-1).values) * (
        ltrb[:, [1, 3]].min(-1).values / ltrb[:, [1, 3]].max(-1).values
    )
    return torch.where(inside, torch.sqrt(ratio), torch.ones_like(ratio))


def detection_loss(
    model: Detector,
    images: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    taps: OrderedDict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """FCOS loss: sigmoid focal (classes) + GIoU (boxes) + BCE (centerness), per positive location."""
    cls, reg, ctr, points, strides = model.dense(images, taps)
    cls_targets = torch.zeros_like(cls)
    box_losses, ctr_losses, num_positive = [], [], 0
    for i, target in enumerate(targets):
        matched, labels = fcos_targets(points, strides, target["boxes"], target["labels"])
        positive = matched >= 0
        if not positive.any():
            continue
        num_positive += int(positive.sum())
        cls_targets[i, positive, labels[positive]] = 1.0
        gt = target["boxes"][matched[positive]]
        p = points[positive]
        predicted = torch.cat([p - reg[i, positive, :2], p + reg[i, positive, 2:]], dim=-1)
        centerness = centerness_targets(p, gt)
        box_losses.append((generalized_box_iou_loss(predicted, gt, reduction="none") * centerness).sum())
        ctr_losses.append(nn.functional.binary_cross_entropy_with_logits(ctr[i, positive], centerness, reduction="sum"))
    normaliser = max(num_positive, 1)
    zero = cls.sum() * 0.0
    return {
        "cls": sigmoid_focal_loss(cls, cls_targets, reduction="sum") / normaliser,
        "box": (torch.stack(box_losses).sum() if box_losses else zero) / normaliser,
        "ctr": (torch.stack(ctr_losses).sum() if ctr_losses else zero) / normaliser,
    }


class Classifier(nn.Module):
    """Multi-label image classifier: backbone -> global average pool -> one logit per disease.

    `features` makes it a head on another model's backbone (the detector's, --shared-backbone): in training the
    detection loss then teaches the classifier's features where the findings are. An exported classifier
    always carries its own copy of the backbone.
    """

    def __init__(
        self,
        num_labels: int,
        backbone_name: str = "mobilenet_v3_small",
        pretrained: str | Path | None = None,
        dropout: float = 0.2,
        features: nn.Sequential | None = None,
    ) -> None:
        super().__init__()
        self.features = features if features is not None else backbone(backbone_name, pretrained)
        channels = stage_ends(self.features)[len(self.features) - 1][1]
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_labels))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, C, h, w) that the head pools: class activation maps are read from it."""
        return self.features(images.expand(-1, 3, -1, -1))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from(self.feature_map(images))

    def logits_from(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Logits from a final feature map computed elsewhere (the detector's, when the backbone is shared)."""
        # contiguous: a channels-last map (ConvNeXt's per-location LayerNorm) would export its flatten as a strided
        # gather, behind which the export cannot find the pooled feature map for the heatmaps.
        return self.head(nn.functional.adaptive_avg_pool2d(feature_map.contiguous(), 1))

    def class_activation_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(N, K, h, w) logit maps whose spatial mean is `logits` (training/heatmaps.py): the reference the exported
        `heatmaps` output is checked against."""
        linear = self.head[-1]
        return torch.einsum("kc,nchw->nkhw", linear.weight, self.feature_map(images)) + linear.bias[None, :, None, None]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K)."""
        return torch.sigmoid(self.logits(images))
