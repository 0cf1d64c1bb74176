"""Train the detector and the classifier on a VinDr-PCXR-style dataset.

    python -m training.train --data data/synthetic --out runs/demo --cache data/cache              (cpu-demo preset)
    python -m training.train --preset gpu --data /data/vindr-pcxr --out runs/gpu --cache /data/cache

Images stream from disk: each DICOM is decoded by DataLoader workers through the service's preprocessing when a
batch needs it, or read from --cache (built once, with a progress bar), and augmented with its boxes. Host
memory does not grow with the dataset. A preset (training/presets.py) fills every recipe flag not given.

Writes into RUN_DIR: checkpoint.pt (models, optimizer, scheduler, args, epoch: resumable with
--resume), log.jsonl (one line per epoch), thresholds.json (per-label operating points chosen on
the validation split, never on test), loss_curves.png and run.json.

Several GPUs: one process per GPU with torchrun (DistributedDataParallel), e.g. on one machine

    torchrun --nproc_per_node=4 -m training.train --data data/vindr-pcxr --out runs/ddp --epochs 20

Each rank runs on cuda:LOCAL_RANK (backend nccl; gloo on CPU; --dist-backend overrides) and trains
on its own strided shard of every epoch's shuffled order, so the effective batch is --batch-size x
world size (16 x 4 = 64 above); --lr is not scaled for it, pass the one you want. A DistributedSampler
gives every rank its own shard, and a rank decodes (or reads from the cache) only the images of its shard;
--workers is per rank. Rank 0 alone validates and writes the run folder; --resume works the same way
(every rank loads the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from service.dicom.pipeline import InputSpec, ModelInputs
from service.dicom.preprocess import Normalization
from training import distributed
from training.architectures import PretrainedWeightsError
from training.augment import AugmentConfig
from training.cache import CACHE_DTYPES, PreprocessedCache
from training.data import Record, add_layout_arguments, fusion_from_args, read_split
from training.dataset import RadiographDataset, make_loader, shard_sampler
from training.distributed import DistContext
from training.engine import JointModel, cosine_with_warmup, evaluate, steps_per_epoch, train_one_epoch
from training.labels import LABEL_SETS, LabelSet
from training.localisation import CamLoss, measure_grid
from training.metrics import ImageDetections, finding_threshold, youden_threshold
from training.models import BACKBONES, DETECTOR_STRIDES, Classifier, Detector
from training.presets import add_preset_argument, apply_preset
from training.splits import write_run_splits
from training.triage import triage_entry

DEFAULT_NORMALIZATION = Normalization(mean=0.5, std=0.25)
LOSS_NAMES = ("cls", "box", "ctr", "classifier", "cam")
# What a checkpoint's weights fix: --resume and --init-from take them from the checkpoint, not the command line.
ARCHITECTURE_ARGS = (
    "detector_input_size",
    "classifier_input_size",
    "detector_backbone",
    "classifier_backbone",
    "fpn_channels",
    "shared_backbone",
)
FALLBACK_FINDING_THRESHOLD = 0.5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset folder in the VinDr-PCXR layout")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created)")
    add_preset_argument(parser)
    # Recipe flags: None means "the preset's value" (training/presets.py); given explicitly, they win.
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument(
        "--cam-loss",
        type=float,
        default=None,
        help="weight of the heatmap localisation term (training/localisation.py): the class activation map of each "
        "positive disease is pulled onto the image's finding boxes; 0 turns it off",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="square input of both models (pixels); the two flags below override",
    )
    parser.add_argument("--detector-input-size", type=int, default=None, help="the detector's square input (pixels)")
    parser.add_argument("--classifier-input-size", type=int, default=None, help="the classifier's square input")
    parser.add_argument("--detector-backbone", choices=BACKBONES, default=None, help="torchvision name")
    parser.add_argument("--classifier-backbone", choices=BACKBONES, default=None, help="torchvision name")
    parser.add_argument("--fpn-channels", type=int, default=None, help="feature pyramid width (multiple of 16)")
    parser.add_argument(
        "--shared-backbone",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the classifier is a global-pool + linear head on the detector's backbone, trained by both losses "
        "(one backbone pass per training step; the exported classifier carries its own copy); implies the "
        "detector's backbone and input size for the classifier",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        metavar="none|imagenet|FILE",
        help="backbone start: random weights, torchvision's ImageNet weights (its weights API: downloaded into "
        "$TORCH_HOME/hub/checkpoints, or read from there offline), or a local state dict of the torchvision model",
    )
    parser.add_argument("--detector-pretrained", default=None, help="--pretrained for the detector alone")
    parser.add_argument("--classifier-pretrained", default=None, help="--pretrained for the classifier alone")
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale/shift/rotation and exposure/noise augmentation with the boxes (training/augment.py)",
    )
    parser.add_argument(
        "--hflip", action="store_true", help="also flip horizontally (off by default: laterality is anatomy)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder of preprocessed inputs, built once and reused by later runs (training/cache.py); "
        "default: decode every image in every epoch",
    )
    parser.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="float16")
    parser.add_argument(
        "--local-labels",
        nargs="*",
        default=None,
        help="local labels to train (default: those with at least --min-examples boxed images)",
    )
    parser.add_argument(
        "--global-labels",
        nargs="*",
        default=None,
        help="global labels to train (default: those with at least --min-examples positives)",
    )
    parser.add_argument(
        "--min-examples",
        type=int,
        default=10,
        help="labels rarer than this are not reliably learnable (the paper's cut-off)",
    )
    parser.add_argument("--dataset", choices=sorted(LABEL_SETS), default="vindr-pcxr", help="label set of the data")
    add_layout_arguments(parser)
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument(
        "--dist-backend",
        choices=("nccl", "gloo"),
        default=None,
        help="process-group backend under torchrun (default: nccl on CUDA, gloo on CPU)",
    )
    parser.add_argument("--workers", type=int, default=None, help="DataLoader processes decoding DICOMs (per rank)")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (CUDA only)"
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop each epoch after this many steps (smoke runs)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from another run's checkpoint.pt (weights, labels, input size, backbones) with "
        "a fresh optimizer: curriculum fine-tuning, e.g. easy phantoms first, then default",
    )
    return parser


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed the global generators, offset by the rank so dropout differs between ranks (DDP copies rank 0's
    initial weights to the others anyway). Each epoch's order comes from the sampler (seed + epoch)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """--input-size for both models unless each is given, then the preset for everything still unset."""
    if args.input_size is not None:
        args.detector_input_size = args.detector_input_size or args.input_size
        args.classifier_input_size = args.classifier_input_size or args.input_size
    apply_preset(args)
    args.detector_pretrained = args.detector_pretrained or args.pretrained
    args.classifier_pretrained = args.classifier_pretrained or args.pretrained
    if args.shared_backbone:
        # The classifier is the detector's backbone plus a head: its architecture and input are the detector's.
        for name in ("classifier_backbone", "classifier_input_size"):
            detector_value = getattr(args, name.replace("classifier", "detector"))
            if name not in args.from_preset and getattr(args, name) != detector_value:
                flag = "--" + name.replace("_", "-")
                raise SystemExit(f"error: --shared-backbone uses the detector's backbone and input; drop {flag}")
            setattr(args, name, detector_value)
    return args


def model_inputs(detector_size: int, classifier_size: int) -> ModelInputs:
    return ModelInputs(
        detector=InputSpec(detector_size, DEFAULT_NORMALIZATION),
        classifier=InputSpec(classifier_size, DEFAULT_NORMALIZATION),
    )


def choose_labels(
    records: list[Record], requested: list[str] | None, kind: str, min_examples: int, label_set: LabelSet
) -> list[str]:
    """Labels to train, in the paper's table order: the requested ones, or those common enough."""
    names = [label.name for label in (label_set.local if kind == "local" else label_set.global_)]
    if kind == "local":
        counts = Counter(label for record in records for label in {box.label for box in record.boxes})
    else:
        counts = Counter(label for record in records for label, value in record.image_labels.items() if value)
    if requested:
        unknown = [label for label in requested if label not in names]
        if unknown:
            raise SystemExit(f"error: not {kind} labels of {label_set.dataset}: {unknown}")
        return list(requested)
    return [name for name in names if counts.get(name, 0) >= min_examples]


def split_train_val(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    order = np.random.default_rng(seed).permutation(len(records))
    cut = int(round(len(records) * fraction))
    val = {int(i) for i in order[:cut]}
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def resolve_device(name: str, context: DistContext = DistContext()) -> torch.device:
    """The device named on the command line; under torchrun a CUDA device is always cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if not context.enabled or device.type != "cuda":
        return device
    if device.index is not None and device.index != context.local_rank:
        raise SystemExit(
            f"error: under torchrun each rank uses cuda:LOCAL_RANK; got --device {name} on local rank "
            f"{context.local_rank} (pass --device cuda or auto)"
        )
    return torch.device("cuda", context.local_rank)


def announce(context: DistContext, message: str, file: TextIO | None = None) -> None:
    """Print once per job: rank 0 speaks for every rank."""
    if context.is_main:
        print(message, file=file)


def plot_curves(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [entry["epoch"] for entry in log]
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    for name in LOSS_NAMES:
        if all(name in entry["train"] for entry in log):  # "cam" only with --cam-loss
            losses.plot(epochs, [entry["train"][name] for entry in log], label=name)
    losses.set(title="training losses", xlabel="epoch", ylabel="loss", yscale="log")
    losses.legend()
    scores.plot(epochs, [entry["val"]["map40"] or 0 for entry in log], label="val mAP@0.4 (detector)")
    scores.plot(epochs, [entry["val"]["mean_auroc"] or 0 for entry in log], label="val mean AUROC (classifier)")
    scores.set(title="validation", xlabel="epoch", ylim=(0, 1))
    scores.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(args: argparse.Namespace) -> dict:
    """Train in this process; under torchrun every rank runs this, and only rank 0 returns the summary."""
    resolve_recipe(args)
    context = distributed.context_from_env(os.environ)
    device = resolve_device(args.device, context)
    context = distributed.start(context, device, args.dist_backend)
    try:
        return train_on_rank(args, context, device)
    finally:
        if context.enabled:  # never tear down a process group this run did not start
            distributed.stop()


@dataclass
class StartingPoint:
    """What a run starts from besides random weights."""

    checkpoint: dict | None  # this run's own checkpoint.pt (--resume): everything, optimiser and epoch included
    initial: dict | None  # another run's checkpoint.pt (--init-from, fresh runs only): its weights and labels


@dataclass
class TrainingState:
    """The models and the optimisation state every epoch advances, and checkpoint.pt saves."""

    detector: Detector
    classifier: Classifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    pos_weight: torch.Tensor
    start_epoch: int = 0
    log: list[dict] = field(default_factory=list)


@dataclass
class Splits:
    """The streaming datasets of a run: training on every rank, validation on rank 0 only (None elsewhere)."""

    inputs: ModelInputs
    train: RadiographDataset
    val: RadiographDataset | None


def train_on_rank(args: argparse.Namespace, context: DistContext, device: torch.device) -> dict:
    """The whole run as seen from one rank (the only rank for a plain single process)."""
    seed_everything(args.seed, context.rank)
    args.out.mkdir(parents=True, exist_ok=True)
    start = load_starting_point(args, context)
    records = read_split(args.data, "train", args.layout, fusion_from_args(args))[: args.limit]
    local_labels, global_labels = labels_to_train(records, args, start)
    train_records, val_records = split_train_val(records, args.val_fraction, args.seed)
    # Which images the run learns from and validates on: evaluation refuses test splits sharing them.
    if context.is_main:
        write_run_splits(args.out, [r.image_id for r in train_records], [r.image_id for r in val_records])
    steps = steps_per_epoch(len(train_records), args.batch_size, context.world_size, args.max_steps)
    announce_plan(context, args, device, len(train_records), len(val_records), local_labels, global_labels, steps)
    splits = make_splits(train_records, val_records, local_labels, global_labels, args, context)
    state = new_training_state(args, len(local_labels), len(global_labels), steps * args.epochs, splits, device)
    restore(state, start, args, context)
    # After loading: DDP starts every rank from rank 0's weights. The checkpoint keeps saving the
    # unwrapped detector and classifier, so export, evaluate and --resume read it unchanged.
    cam_loss = cam_loss_term(args, state.detector, state.classifier, global_labels)
    joint = JointModel(state.detector, state.classifier, every_parameter_in_graph=context.enabled, cam_loss=cam_loss)
    model = distributed.wrap(joint, context, device)
    sampler = shard_sampler(splits.train, context.rank, context.world_size, shuffle=True, seed=args.seed)

    validation = None
    for epoch in range(state.start_epoch, args.epochs):
        started = time.time()
        sampler.set_epoch(epoch)  # every rank draws the same permutation and takes its own shard of it
        # Workers' random streams (augmentation) differ by epoch and rank, and repeat with the seed.
        seed = args.seed * 1_000_003 + epoch * context.world_size + context.rank
        loader = make_loader(splits.train, args.batch_size, args.workers, sampler, seed, device.type == "cuda")
        train_stats = train_epoch_on_every_rank(model, state, loader, splits.inputs, epoch, args, context, device)
        if context.is_main:
            validation = validate(state, splits, local_labels, global_labels, args, device)
            log_epoch(args.out, state, epoch, train_stats, validation[0], started)
            save_checkpoint(args, state, epoch, local_labels, global_labels, splits.inputs)
        distributed.barrier(context)  # the other ranks wait while rank 0 validates and saves

    # Every rank hashes its parameters: identical digests prove DDP kept the replicas in step.
    digests = replica_digests(state, context)
    summary: dict = {}
    if context.is_main:
        if validation is None:  # resumed a finished run: recompute validation outputs
            validation = validate(state, splits, local_labels, global_labels, args, device)
        _, val_probabilities, val_targets, val_detections = validation
        write_thresholds(
            args.out / "thresholds.json", val_targets, val_probabilities, val_detections, local_labels, global_labels
        )
        summary = write_run_summary(args, context, state.log, steps, digests, len(train_records), len(val_records))
    distributed.barrier(context)
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP replicas diverged: parameter digests per rank {digests} (see {args.out / 'run.json'})")
    return summary


def validate(
    state: TrainingState,
    splits: Splits,
    local_labels: list[str],
    global_labels: list[str],
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[dict, np.ndarray, np.ndarray, list[ImageDetections]]:
    """engine.evaluate over the validation split (rank 0), streamed like training but never augmented."""
    loader = make_loader(splits.val, args.batch_size, args.workers, seed=args.seed)
    return evaluate(state.detector, state.classifier, loader, splits.inputs, local_labels, global_labels, device)


def announce_plan(
    context: DistContext,
    args: argparse.Namespace,
    device: torch.device,
    train_images: int,
    val_images: int,
    local_labels: list[str],
    global_labels: list[str],
    steps: int,
) -> None:
    """What is about to be trained, on what, and (under torchrun) how the batch is shared out."""
    announce(
        context,
        f"{train_images} training / {val_images} validation images; "
        f"{len(local_labels)} local labels, {len(global_labels)} global labels; device {device}",
    )
    classifier = (
        "a head on the detector's backbone"
        if args.shared_backbone
        else f"{args.classifier_backbone} at {args.classifier_input_size}² (pretrained: {args.classifier_pretrained})"
    )
    announce(
        context,
        f"recipe {args.preset}: detector {args.detector_backbone} at {args.detector_input_size}² "
        f"(pretrained: {args.detector_pretrained}), classifier {classifier}; {args.epochs} epochs, batch "
        f"{args.batch_size}, lr {args.lr:g}; augmentation {'on' if args.augment else 'off'}"
        f"{' with horizontal flips' if args.augment and args.hflip else ''}; cache {args.cache or 'off'}",
    )
    if args.amp and device.type != "cuda":
        announce(context, f"--amp applies to CUDA only; training in float32 on {device}", file=sys.stderr)
    if context.enabled:
        announce(
            context,
            f"DDP: {context.world_size} ranks ({context.backend}); batch {args.batch_size} per rank = "
            f"effective batch {args.batch_size * context.world_size} (--lr not scaled); "
            f"{steps} steps per epoch on each rank",
        )


def load_starting_point(args: argparse.Namespace, context: DistContext) -> StartingPoint:
    """The checkpoints --resume and --init-from name; the settings they fix are written into `args`."""
    checkpoint_path = args.out / "checkpoint.pt"
    # Every rank loads the checkpoint itself: the same file gives every rank the same state.
    checkpoint = (
        torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if args.resume and checkpoint_path.exists()
        else None
    )
    if args.resume and checkpoint is None:
        announce(context, f"no checkpoint at {checkpoint_path}; starting from scratch", file=sys.stderr)
    # A resumed run already holds its warm-started weights; only a fresh run loads them.
    initial = (
        torch.load(args.init_from, map_location="cpu", weights_only=False)
        if args.init_from and checkpoint is None
        else None
    )
    if checkpoint is not None:
        # The run's own settings win over the command line for everything that shapes the models.
        for key in (*ARCHITECTURE_ARGS, "seed", "val_fraction"):
            setattr(args, key, checkpoint["args"][key])
    elif initial is not None:
        # The weights dictate the architecture; seed and split stay this run's own.
        for key in ARCHITECTURE_ARGS:
            setattr(args, key, initial["args"][key])
    return StartingPoint(checkpoint, initial)


def labels_to_train(
    records: list[Record], args: argparse.Namespace, start: StartingPoint
) -> tuple[list[str], list[str]]:
    """(local, global) labels: those of the checkpoint started from, else chosen from the training records."""
    if start.checkpoint is not None:
        local_labels, global_labels = start.checkpoint["local_labels"], start.checkpoint["global_labels"]
    elif start.initial is not None:
        local_labels, global_labels = start.initial["local_labels"], start.initial["global_labels"]
    else:
        label_set = LABEL_SETS[args.dataset]
        local_labels = choose_labels(records, args.local_labels, "local", args.min_examples, label_set)
        global_labels = choose_labels(records, args.global_labels, "global", args.min_examples, label_set)
    if not local_labels or not global_labels:
        raise SystemExit("error: no local or no global label has enough examples; lower --min-examples or name labels")
    return local_labels, global_labels


def make_splits(
    train_records: list[Record],
    val_records: list[Record],
    local_labels: list[str],
    global_labels: list[str],
    args: argparse.Namespace,
    context: DistContext,
) -> Splits:
    """The streaming datasets; with --cache, missing entries are built first (each rank builds a share of them)."""
    inputs = model_inputs(args.detector_input_size, args.classifier_input_size)
    cache = PreprocessedCache(args.cache, args.cache_dtype) if args.cache else None
    if cache is not None:
        # Rank r builds every world_size-th image (rank 0 also the validation split), then all read any of them.
        items = [(r.image_id, r.path) for r in train_records[context.rank :: context.world_size]]
        if context.is_main:
            items += [(r.image_id, r.path) for r in val_records]
        with distributed.quiet_unless_main(context):
            built = cache.build(inputs.specs, items, max(args.workers, 1), "cache")
        announce(context, f"cache {args.cache}: {built} images preprocessed now, {len(items) - built} reused")
        distributed.barrier(context)
    augment = AugmentConfig(horizontal_flip=args.hflip) if args.augment else None
    train = RadiographDataset(train_records, inputs, local_labels, global_labels, cache, augment)
    val = RadiographDataset(val_records, inputs, local_labels, global_labels, cache) if context.is_main else None
    return Splits(inputs, train, val)


def new_training_state(
    args: argparse.Namespace,
    local_count: int,
    global_count: int,
    total_steps: int,
    splits: Splits,
    device: torch.device,
) -> TrainingState:
    """Freshly initialised models (from the global seed), AdamW, the warm-up + cosine schedule, loss weights."""
    try:
        detector = Detector(local_count, args.detector_backbone, args.fpn_channels, args.detector_pretrained)
        if args.shared_backbone:
            if not detector.whole_backbone:
                raise SystemExit(f"error: {args.detector_backbone} has blocks after stride 32; it cannot be shared")
            classifier = Classifier(global_count, args.detector_backbone, features=detector.features)
        else:
            classifier = Classifier(global_count, args.classifier_backbone, args.classifier_pretrained)
    except PretrainedWeightsError as exc:
        raise SystemExit(f"error: {exc}") from None
    detector, classifier = detector.to(device), classifier.to(device)
    # Each parameter once, also when the backbone is shared (AdamW must not step it twice).
    parameters = list({id(p): p for p in [*detector.parameters(), *classifier.parameters()]}.values())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, min(200, total_steps // 10 + 1))
    )
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    # Rare diseases get a larger positive weight (capped) so the classifier does not ignore them.
    prevalence = splits.train.image_labels.mean(axis=0).clip(1e-3, 1.0)
    pos_weight = torch.from_numpy(((1 - prevalence) / prevalence).clip(1.0, 10.0)).float().to(device)
    return TrainingState(detector, classifier, optimizer, scheduler, scaler, pos_weight)


def restore(state: TrainingState, start: StartingPoint, args: argparse.Namespace, context: DistContext) -> None:
    """Load the starting point: --init-from's weights, or everything of --resume's checkpoint."""
    if start.initial is not None:
        state.detector.load_state_dict(start.initial["detector"])
        state.classifier.load_state_dict(start.initial["classifier"])
        announce(context, f"initialised from {args.init_from} (epoch {start.initial['epoch']} of that run)")
    if start.checkpoint is not None:
        checkpoint = start.checkpoint
        state.detector.load_state_dict(checkpoint["detector"])
        state.classifier.load_state_dict(checkpoint["classifier"])
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])
        state.start_epoch, state.log = checkpoint["epoch"] + 1, checkpoint["log"]
        announce(context, f"resumed from {args.out / 'checkpoint.pt'} at epoch {state.start_epoch}")


def train_epoch_on_every_rank(
    model: torch.nn.Module,
    state: TrainingState,
    loader: torch.utils.data.DataLoader,
    inputs: ModelInputs,
    epoch: int,
    args: argparse.Namespace,
    context: DistContext,
    device: torch.device,
) -> dict:
    """One epoch on this rank's shard; the losses come back averaged over the ranks."""
    train_stats = train_one_epoch(
        model,
        loader,
        inputs,
        state.optimizer,
        state.scheduler,
        state.pos_weight,
        device,
        epoch,
        args.max_steps,
        state.scaler,
        show_progress=context.is_main,
    )
    counters = ("steps", "images", "seconds", "images_per_s")  # this rank's own
    losses = {k: v for k, v in train_stats.items() if k not in counters}
    return distributed.mean_across_ranks(losses, context, device) | {k: train_stats[k] for k in counters}


def log_epoch(
    out: Path, state: TrainingState, epoch: int, train_stats: dict, val_metrics: dict, started: float
) -> None:
    """One line of log.jsonl (kept in the checkpoint too) and one on the console."""
    entry = {
        "epoch": epoch,
        "train": train_stats,
        "val": val_metrics,
        "seconds": round(time.time() - started, 1),
        "lr": state.optimizer.param_groups[0]["lr"],
    }
    state.log.append(entry)
    with (out / "log.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    loss = sum(v for k, v in train_stats.items() if k in LOSS_NAMES)
    print(
        f"epoch {epoch}: loss {loss:.3f}  "
        f"val mAP@0.4 {val_metrics['map40'] or 0:.3f}  val mean AUROC {val_metrics['mean_auroc'] or 0:.3f}  "
        f"({entry['seconds']} s)"
    )


def save_checkpoint(
    args: argparse.Namespace,
    state: TrainingState,
    epoch: int,
    local_labels: list[str],
    global_labels: list[str],
    inputs: ModelInputs,
) -> None:
    """checkpoint.pt: the unwrapped models, the optimisation state and everything export and --resume read."""
    torch.save(
        {
            "detector": state.detector.state_dict(),
            "classifier": state.classifier.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "args": vars(args)
            | {
                "data": str(args.data),
                "out": str(args.out),
                "cache": str(args.cache) if args.cache else None,
                "init_from": str(args.init_from) if args.init_from else None,
            },
            "epoch": epoch,
            "log": state.log,
            "local_labels": local_labels,
            "global_labels": global_labels,
            "inputs": {
                model: {"size": spec.size, "normalization": [spec.normalization.mean, spec.normalization.std]}
                for model, spec in (("detector", inputs.detector), ("classifier", inputs.classifier))
            },
        },
        args.out / "checkpoint.pt",
    )


def replica_digests(state: TrainingState, context: DistContext) -> list[str]:
    """Every rank's parameter digest, gathered on every rank (empty without torchrun)."""
    if not context.enabled:
        return []
    return distributed.gather_strings(distributed.parameter_digest([state.detector, state.classifier]), context)


def write_run_summary(
    args: argparse.Namespace,
    context: DistContext,
    log: list[dict],
    steps: int,
    digests: list[str],
    train_images: int,
    val_images: int,
) -> dict:
    """loss_curves.png and run.json (epochs, final validation, split sizes, the DDP layout); returns the summary."""
    if log:
        plot_curves(log, args.out / "loss_curves.png")
    summary: dict = {
        "epochs": len(log),
        "final_val": log[-1]["val"] if log else None,
        "train_images": train_images,
        "val_images": val_images,
    }
    if context.enabled:
        summary["distributed"] = {
            "world_size": context.world_size,
            "backend": context.backend,
            "batch_size_per_rank": args.batch_size,
            "effective_batch_size": args.batch_size * context.world_size,
            "steps_per_epoch_per_rank": steps,
            "parameter_sha256_per_rank": digests,
        }
    (args.out / "run.json").write_text(json.dumps(summary, indent=2))
    print(f"done: {args.out / 'checkpoint.pt'}")
    return summary


def cam_loss_term(
    args: argparse.Namespace, detector: Detector, classifier: Classifier, global_labels: list[str]
) -> CamLoss | None:
    """The --cam-loss term on the feature map the classifier pools (the detector's with --shared-backbone), with
    that map's grid measured once on the model's input; None when the weight is 0."""
    if not args.cam_loss:
        return None
    if args.shared_backbone:
        size, box_scale = args.detector_input_size, 1.0

        def feature_map(images: torch.Tensor) -> torch.Tensor:
            return detector.backbone_taps(images)[str(max(DETECTOR_STRIDES))]

        module: torch.nn.Module = detector
    else:
        size, box_scale = args.classifier_input_size, args.classifier_input_size / args.detector_input_size
        feature_map, module = classifier.feature_map, classifier
    training = module.training
    module.eval()  # batch statistics of one noise image must not reach the running means
    try:
        stride, origin = measure_grid(feature_map, size)
    finally:
        module.train(training)
        module.zero_grad(set_to_none=True)
    skip = tuple(k for k, label in enumerate(global_labels) if label == "No finding")
    return CamLoss(float(args.cam_loss), stride, origin, box_scale, skip)


def write_thresholds(
    path: Path,
    val_targets: np.ndarray,
    val_probabilities: np.ndarray,
    val_detections: list[ImageDetections],
    local_labels: list[str],
    global_labels: list[str],
) -> None:
    """Per-label operating points and the triage operating point, chosen on the validation split (never on test)."""
    thresholds = {
        name: youden_threshold(val_targets[:, k], val_probabilities[:, k]) for k, name in enumerate(global_labels)
    }
    # A label the validation split cannot pick an operating point for reports only confident boxes.
    finding_thresholds = {
        name: finding_threshold(val_detections, k) or FALLBACK_FINDING_THRESHOLD for k, name in enumerate(local_labels)
    }
    path.write_text(
        json.dumps(
            {
                "method": "diseases: Youden's J; findings: best F1 of boxes at IoU 0.4 "
                f"({FALLBACK_FINDING_THRESHOLD} where undefined); both on the validation split",
                "validation_images": len(val_targets),
                "thresholds": thresholds,
                "finding_thresholds": finding_thresholds,
                "triage": triage_entry(
                    val_targets,
                    val_probabilities,
                    global_labels,
                    f"the validation split ({len(val_targets)} images)",
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
