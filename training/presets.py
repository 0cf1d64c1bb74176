"""Named training recipes: `python -m training.train --preset cpu-demo|gpu ...`.

A preset fills every recipe flag the command line leaves out; a flag given explicitly always wins
(`--preset gpu --epochs 5` is the gpu recipe for five epochs). Without --preset, cpu-demo applies.

cpu-demo: the scale this repository's CPU can train in well under an hour; the CI tests and the committed demo
pack use it. gpu: the production recipe for the real datasets on one or more GPUs (torchrun): a ResNet-50-FPN
detector at 1024² (VinBigData winners trained detectors at 1024), a DenseNet-121 classifier at 512² (CheXNet,
TorchXRayVision), both from ImageNet weights, mixed precision, a cached streaming pipeline.
"""

from __future__ import annotations

import argparse

# Every flag a preset decides (as argparse dests). The parser's default for each is None, meaning "the preset's".
RECIPE_FLAGS = (
    "detector_backbone",
    "classifier_backbone",
    "detector_input_size",
    "classifier_input_size",
    "fpn_channels",
    "shared_backbone",
    "pretrained",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "amp",
    "augment",
    "workers",
    "cam_loss",
)

PRESETS: dict[str, dict[str, object]] = {
    "cpu-demo": {
        "detector_backbone": "mobilenet_v3_small",
        "classifier_backbone": "mobilenet_v3_small",
        "detector_input_size": 384,
        "classifier_input_size": 384,
        "fpn_channels": 64,
        "shared_backbone": False,
        "pretrained": "none",  # this machine has no network for torchvision's weights
        "epochs": 20,
        "batch_size": 16,
        "lr": 2e-3,
        "weight_decay": 1e-4,
        "amp": False,
        "augment": True,
        "workers": 2,
        # Heatmaps onto the findings: one epoch of fine-tuning the demo classifier put the heatmap peak inside a
        # finding's box for 67% of positive phantoms with it, 25% without, at mean AUROC 0.921 vs 0.927.
        "cam_loss": 0.5,
    },
    "gpu": {
        "detector_backbone": "resnet50",
        "classifier_backbone": "densenet121",
        "detector_input_size": 1024,
        "classifier_input_size": 512,
        "fpn_channels": 256,
        "shared_backbone": False,
        "pretrained": "imagenet",
        "epochs": 30,
        "batch_size": 16,
        "lr": 2e-4,  # pretrained backbones: a tenth of the from-scratch rate
        "weight_decay": 1e-4,
        "amp": True,
        "augment": True,
        "workers": 8,
        # Not measured on real data (diseases there are not drawn from the boxes as on phantoms): off unless asked.
        "cam_loss": 0.0,
    },
}
DEFAULT_PRESET = "cpu-demo"


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=f"training recipe filling every recipe flag not given explicitly (default: {DEFAULT_PRESET}); "
        "see training/presets.py and the README",
    )


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the recipe flags left at None from the chosen preset (cpu-demo when none is named); returns `args`.

    Also records which values came from the preset, so a run says what it was trained with and why.
    """
    preset = PRESETS[args.preset or DEFAULT_PRESET]
    from_preset = []
    for name in RECIPE_FLAGS:
        if getattr(args, name, None) is None:
            setattr(args, name, preset[name])
            from_preset.append(name)
    args.preset = args.preset or DEFAULT_PRESET
    args.from_preset = from_preset
    return args
