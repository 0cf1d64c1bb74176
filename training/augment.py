"""Augmentation for radiographs with boxes, built from torchvision.transforms.v2.

The boxes are `tv_tensors.BoundingBoxes` transformed together with the image, so a shifted, scaled or rotated
finding keeps a box around it (a rotated box becomes the box around its rotated corners), and boxes pushed off
the canvas are clipped or dropped (`SanitizeBoundingBoxes`).

Geometry: scale, translation and a small rotation in one affine warp (`RandomAffine`), filled with the
letterbox padding's black. Intensity, in display space ([0, 1], bright = dense): brightness and contrast
(`ColorJitter`), gamma and Gaussian noise of a random strength, then the model's normalisation again.

No horizontal flip by default: a chest radiograph's laterality is anatomy (the heart on the left; dextrocardia
and situs inversus are labels of their own), so a flipped image is a different diagnosis. `--hflip` enables it
for data where that does not matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from service.dicom.preprocess import Normalization


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.9, 1.1)  # zoom range
    translate: float = 0.06  # largest shift, a fraction of the input size along each axis
    rotation: float = 5.0  # largest rotation, degrees either way
    brightness: float = 0.1  # brightness factor in [1 - b, 1 + b]
    contrast: float = 0.15  # contrast factor in [1 - c, 1 + c]
    gamma: float = 0.2  # gamma in [exp(-g), exp(g)], log-uniform
    noise: float = 0.03  # Gaussian noise std drawn uniformly in [0, noise], display units
    horizontal_flip: bool = False


class RandomGamma(v2.Transform):
    """display ** gamma with log-uniform gamma: exposure and processing differences between machines."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, spread: float) -> None:
        super().__init__()
        self.spread = spread

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gamma": math.exp(float(torch.empty(()).uniform_(-self.spread, self.spread)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(inpt.clamp(0, 1) ** params["gamma"], like=inpt)


class RandomNoise(v2.Transform):
    """Additive Gaussian noise whose strength is itself random (quantum noise differs between exposures)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, max_sigma: float) -> None:
        super().__init__()
        self.max_sigma = max_sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": float(torch.rand(())) * self.max_sigma}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(inpt + torch.randn_like(inpt) * params["sigma"], like=inpt)


def radiograph_augmentation(config: AugmentConfig, normalization: Normalization) -> v2.Compose:
    """The training-time transform of one normalised input and its boxes (a dict: image, boxes, labels)."""
    mean, std = normalization.mean, normalization.std
    steps: list[v2.Transform] = [
        v2.Normalize(mean=[-mean / std], std=[1 / std]),  # model input -> display space
        v2.RandomAffine(
            degrees=config.rotation,
            translate=(config.translate, config.translate),
            scale=config.scale,
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=0.0,
        ),
    ]
    if config.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ColorJitter(brightness=config.brightness, contrast=config.contrast),
        RandomGamma(config.gamma),
        RandomNoise(config.noise),
        v2.Normalize(mean=[mean], std=[std]),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ]
    return v2.Compose(steps)


def augment_sample(
    transform: v2.Compose, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image 1 x S x S, boxes (K, 4) xyxy in its pixels, labels (K,)) through the transform, boxes with the pixels."""
    size = tuple(image.shape[-2:])
    out = transform(
        {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size),
            "labels": labels,
        }
    )
    return out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor), out["labels"]
