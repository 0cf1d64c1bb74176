"""The backbones the detector and the classifier can be built on, by torchvision's own names.

    python -m training.train ... --detector-backbone resnet50 --classifier-backbone densenet121 --pretrained imagenet

Each entry turns a torchvision classification model into an `nn.Sequential` of feature blocks: the last
block's output is the final feature map (after its activation), and the strides at which blocks end are
found by a dummy pass (`stage_ends`), so the FPN taps of the detector (strides 8, 16, 32) and the classifier's
global-average-pool input come from one rule for every architecture. torchvision's own classification head
(avgpool + fc / classifier) is left out: ours is global average pool -> linear on the final feature map, for
every entry, so class activation maps (features x the linear layer's weights) are exact for all of them.

| name | feature blocks | what differs from torchvision's classifier |
| --- | --- | --- |
| resnet50 | conv1, bn1, relu, maxpool, layer1..4 | nothing (its head is avgpool -> fc too) |
| densenet121 | features + ReLU | torchvision applies that ReLU in forward(); it is a block here |
| efficientnet_b0..b3 | features | its dropout + linear head becomes ours |
| convnext_tiny | features + LayerNorm2d per location | torchvision normalises the pooled vector; here each location is
  normalised before pooling (same parameters), which keeps pool -> linear the last step |
| mobilenet_v3_small/large | features | its two-layer MLP head becomes one linear layer |

Pretrained starts (`--pretrained`): "imagenet" loads torchvision's default ImageNet weights through its
weights API (downloaded into `$TORCH_HOME/hub/checkpoints` when a network exists, read from there when the file
is present), a FILE path loads a state dict of the torchvision model from disk (air-gapped hosts), "none"
starts from random weights.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

NO_PRETRAINING = "none"
IMAGENET = "imagenet"


class PretrainedWeightsError(RuntimeError):
    """The requested pretrained weights cannot be had or do not fit the backbone; the message says what to do."""


@dataclass(frozen=True)
class Architecture:
    name: str  # torchvision.models.<name>, and the name of its weights in torchvision's registry
    blocks: Callable[[nn.Module], list[nn.Module]]  # the built torchvision model -> its feature blocks, in order
    head_prefixes: tuple[str, ...]  # state-dict keys of torchvision's classification head (never loaded)


def _features(model: nn.Module) -> list[nn.Module]:
    return list(model.features)


def _resnet(model: nn.Module) -> list[nn.Module]:
    return [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4]


def _densenet(model: nn.Module) -> list[nn.Module]:
    return [*model.features, nn.ReLU(inplace=False)]


def _convnext(model: nn.Module) -> list[nn.Module]:
    # torchvision's head starts with LayerNorm2d over the pooled vector: moved before the pool (same parameters).
    return [*model.features, model.classifier[0]]


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("mobilenet_v3_small", _features, ("classifier.",)),
        Architecture("mobilenet_v3_large", _features, ("classifier.",)),
        Architecture("resnet50", _resnet, ("fc.",)),
        Architecture("densenet121", _densenet, ("classifier.",)),
        Architecture("efficientnet_b0", _features, ("classifier.",)),
        Architecture("efficientnet_b1", _features, ("classifier.",)),
        Architecture("efficientnet_b2", _features, ("classifier.",)),
        Architecture("efficientnet_b3", _features, ("classifier.",)),
        Architecture("convnext_tiny", _convnext, ("classifier.1.", "classifier.2.")),
    )
}
BACKBONES = tuple(ARCHITECTURES)


def backbone(name: str, pretrained: str | Path | None = None) -> nn.Sequential:
    """The feature blocks of torchvision's `name`, with the weights `pretrained` names (None or "none": random)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    architecture = ARCHITECTURES[name]
    model = torchvision.models.get_model(name, weights=None)
    if pretrained is not None and str(pretrained) != NO_PRETRAINING:
        state = imagenet_state_dict(name) if str(pretrained) == IMAGENET else file_state_dict(Path(pretrained))
        load_backbone_weights(model, state, architecture, str(pretrained))
    return nn.Sequential(*architecture.blocks(model))


def stage_ends(features: nn.Sequential, size: int = 64) -> dict[int, tuple[int, int]]:
    """Index of the last block at each stride -> (stride, channels), found by a dummy pass at `size`²."""
    x, ends = torch.zeros(1, 3, size, size), {}
    was_training = features.training
    features.eval()  # BatchNorm must not update its statistics from the dummy pass
    with torch.no_grad():
        for index, block in enumerate(features):
            x = block(x)
            ends[size // x.shape[-1]] = (index, x.shape[1])
    features.train(was_training)
    return {index: (stride, channels) for stride, (index, channels) in ends.items()}


def imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    """torchvision's default ImageNet weights of an architecture (its weights registry, by model name)."""
    return torchvision.models.get_model_weights(name).DEFAULT


def imagenet_cache_file(name: str) -> Path:
    """Where torchvision keeps (or would download) those weights: $TORCH_HOME/hub/checkpoints/<file name>."""
    weights = imagenet_weights(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(weights.url).path).name


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict through torchvision's weights API: from the cache, else downloaded into it."""
    weights, cached = imagenet_weights(name), imagenet_cache_file(name)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)  # the hash is checked on download only
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        if cached.exists():
            raise PretrainedWeightsError(f"{cached} could not be read as {weights} weights: {exc}") from None
        raise PretrainedWeightsError(
            f"--pretrained imagenet needs torchvision's {weights} weights for {name}, which are not in "
            f"{cached.parent} and could not be downloaded from {weights.url} ({type(exc).__name__}: {exc}). "
            f"On a host without network, copy that file to {cached} (TORCH_HOME decides the folder), or pass "
            f"--pretrained FILE with a state dict of torchvision's {name}."
        ) from None


def file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(
            f"--pretrained {path}: no such file (expected 'none', 'imagenet' or a state dict file)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that is not plain tensors, a truncated file, ...
        raise PretrainedWeightsError(f"--pretrained {path} is not a readable state dict: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ...} wrapper of training scripts
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"--pretrained {path} holds no state dict (a mapping of names to tensors)")
    return state


def load_backbone_weights(
    model: nn.Module, state: dict[str, torch.Tensor], architecture: Architecture, source: str
) -> None:
    """Load every backbone tensor of `state` into torchvision's model; anything missing or misshapen is an error.

    torchvision's classification head is skipped: its shape depends on the label count it was trained for.
    """
    own = {key: value for key, value in model.state_dict().items() if not key.startswith(architecture.head_prefixes)}
    given = {key: value for key, value in state.items() if not key.startswith(architecture.head_prefixes)}
    missing = sorted(set(own) - set(given))
    misshapen = sorted(key for key in set(own) & set(given) if own[key].shape != given[key].shape)
    if missing or misshapen:
        details = []
        if missing:
            details.append(f"{len(missing)} of its {len(own)} backbone tensors are missing (e.g. {missing[:3]})")
        if misshapen:
            key = misshapen[0]
            details.append(
                f"{len(misshapen)} have another shape (e.g. {key}: {tuple(given[key].shape)} in the file, "
                f"{tuple(own[key].shape)} in {architecture.name})"
            )
        raise PretrainedWeightsError(
            f"--pretrained {source} does not fit the {architecture.name} backbone: {'; '.join(details)}. "
            f"It must be a state dict of torchvision.models.{architecture.name}."
        )
    model.load_state_dict(given, strict=False)
