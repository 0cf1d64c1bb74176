"""Train the detector and the classifier on a VinDr-PCXR-style dataset.

    python -m training.train --data data/synthetic --out runs/demo --epochs 20

Writes into RUN_DIR: checkpoint.pt (models, optimizer, scheduler, args, epoch: resumable with
--resume), log.jsonl (one line per epoch), thresholds.json (per-label operating points chosen on
the validation split, never on test), loss_curves.png and run.json.

Several GPUs: one process per GPU with torchrun (DistributedDataParallel), e.g. on one machine

    torchrun --nproc_per_node=4 -m training.train --data data/vindr-pcxr --out runs/ddp --epochs 20

Each rank runs on cuda:LOCAL_RANK (backend nccl; gloo on CPU; --dist-backend overrides) and trains
on its own strided shard of every epoch's shuffled order, so the effective batch is --batch-size x
world size (16 x 4 = 64 above); --lr is not scaled for it, pass the one you want. Every rank
decodes the whole training split itself: world size x the CPU time and host memory of one process
(about 1.7 GB per rank for VinDr-PCXR's 7,728 training images at 256 px; --workers is per rank),
but no transfer between ranks. Rank 0 alone validates and writes the run folder; --resume works the
same way (every rank loads the checkpoint).
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

from service.dicom.pipeline import InputSpec
from service.dicom.preprocess import Normalization
from training import distributed
from training.data import Record, TensorSet, add_layout_arguments, fusion_from_args, load_tensors, read_split
from training.distributed import DistContext
from training.engine import Augment, JointModel, cosine_with_warmup, evaluate, steps_per_epoch, train_one_epoch
from training.labels import LABEL_SETS, LabelSet
from training.metrics import ImageDetections, finding_threshold, youden_threshold
from training.models import BACKBONES, Classifier, Detector

DEFAULT_NORMALIZATION = Normalization(mean=0.5, std=0.25)
FALLBACK_FINDING_THRESHOLD = 0.5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset folder in the VinDr-PCXR layout")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--input-size", type=int, default=256, help="square model input (pixels)")
    parser.add_argument("--detector-backbone", choices=BACKBONES, default="mobilenet_v3_small")
    parser.add_argument("--classifier-backbone", choices=BACKBONES, default="mobilenet_v3_small")
    parser.add_argument("--fpn-channels", type=int, default=64)
    parser.add_argument(
        "--pretrained-backbone",
        type=Path,
        default=None,
        help="local torchvision state_dict for the backbone (nothing is downloaded)",
    )
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
    parser.add_argument("--workers", type=int, default=2, help="processes decoding DICOMs")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
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


def seed_everything(seed: int, rank: int = 0) -> torch.Generator:
    """Seed the global generators and return the shared one that draws each epoch's batch order.

    The shared generator must be seeded alike on every rank (they shard one permutation); the
    global ones are offset by the rank so dropout differs between ranks (DDP copies rank 0's
    initial weights to the others anyway).
    """
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    return torch.Generator().manual_seed(seed)


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
    for name in ("cls", "box", "ctr", "classifier"):
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


def train_on_rank(args: argparse.Namespace, context: DistContext, device: torch.device) -> dict:
    """The whole run as seen from one rank (the only rank for a plain single process)."""
    generator = seed_everything(args.seed, context.rank)
    args.out.mkdir(parents=True, exist_ok=True)
    start = load_starting_point(args, context)
    records = read_split(args.data, "train", args.layout, fusion_from_args(args))[: args.limit]
    local_labels, global_labels = labels_to_train(records, args, start)
    train_records, val_records = split_train_val(records, args.val_fraction, args.seed)
    steps = steps_per_epoch(len(train_records), args.batch_size, context.world_size, args.max_steps)
    announce_plan(context, args, device, len(train_records), len(val_records), local_labels, global_labels, steps)
    spec = InputSpec(size=args.input_size, normalization=DEFAULT_NORMALIZATION)
    train_data, val_data = load_splits(train_records, val_records, spec, local_labels, global_labels, args, context)
    state = new_training_state(args, len(local_labels), len(global_labels), steps * args.epochs, train_data, device)
    restore(state, start, generator, args, context)
    # After loading: DDP starts every rank from rank 0's weights. The checkpoint keeps saving the
    # unwrapped detector and classifier, so export, evaluate and --resume read it unchanged.
    joint = JointModel(state.detector, state.classifier, every_parameter_in_graph=context.enabled)
    model = distributed.wrap(joint, context, device)

    normalization = (spec.normalization.mean, spec.normalization.std)
    val_probabilities = val_detections = None
    for epoch in range(state.start_epoch, args.epochs):
        started = time.time()
        train_stats = train_epoch_on_every_rank(
            model, state, train_data, generator, epoch, normalization, args, context, device
        )
        if context.is_main:
            val_metrics, val_probabilities, val_detections = evaluate(
                state.detector, state.classifier, val_data, local_labels, global_labels, device
            )
            log_epoch(args.out, state, epoch, train_stats, val_metrics, started)
            save_checkpoint(args, state, generator, epoch, local_labels, global_labels, normalization)
        distributed.barrier(context)  # the other ranks wait while rank 0 validates and saves

    # Every rank hashes its parameters: identical digests prove DDP kept the replicas in step.
    digests = replica_digests(state, context)
    summary: dict = {}
    if context.is_main:
        if val_probabilities is None:  # resumed a finished run: recompute validation outputs
            _, val_probabilities, val_detections = evaluate(
                state.detector, state.classifier, val_data, local_labels, global_labels, device
            )
        write_thresholds(
            args.out / "thresholds.json", val_data, val_probabilities, val_detections, local_labels, global_labels
        )
        summary = write_run_summary(args, context, state.log, steps, digests, len(train_records), len(val_records))
    distributed.barrier(context)
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP replicas diverged: parameter digests per rank {digests} (see {args.out / 'run.json'})")
    return summary


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
        for key in ("input_size", "detector_backbone", "classifier_backbone", "fpn_channels", "seed", "val_fraction"):
            setattr(args, key, checkpoint["args"][key])
    elif initial is not None:
        # The weights dictate the architecture; seed and split stay this run's own.
        for key in ("input_size", "detector_backbone", "classifier_backbone", "fpn_channels"):
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


def load_splits(
    train_records: list[Record],
    val_records: list[Record],
    spec: InputSpec,
    local_labels: list[str],
    global_labels: list[str],
    args: argparse.Namespace,
    context: DistContext,
) -> tuple[TensorSet, TensorSet | None]:
    """The preprocessed training split, and the validation split on rank 0 (None on the other ranks)."""
    # Simple over clever: each rank decodes the whole training split (its shard changes every
    # epoch); only rank 0 validates, so only it decodes the validation split.
    with distributed.quiet_unless_main(context):
        train_data = load_tensors(train_records, spec, local_labels, global_labels, args.workers, "preprocess train")
    val_data = (
        load_tensors(val_records, spec, local_labels, global_labels, args.workers, "preprocess val")
        if context.is_main
        else None
    )
    return train_data, val_data


def new_training_state(
    args: argparse.Namespace,
    local_count: int,
    global_count: int,
    total_steps: int,
    train_data: TensorSet,
    device: torch.device,
) -> TrainingState:
    """Freshly initialised models (from the global seed), AdamW, the warm-up + cosine schedule, loss weights."""
    detector = Detector(local_count, args.detector_backbone, args.fpn_channels, args.pretrained_backbone).to(device)
    classifier = Classifier(global_count, args.classifier_backbone, args.pretrained_backbone).to(device)
    optimizer = torch.optim.AdamW(
        list(detector.parameters()) + list(classifier.parameters()), lr=args.lr, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, min(200, total_steps // 10 + 1))
    )
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    # Rare diseases get a larger positive weight (capped) so the classifier does not ignore them.
    prevalence = train_data.image_labels.mean(axis=0).clip(1e-3, 1.0)
    pos_weight = torch.from_numpy(((1 - prevalence) / prevalence).clip(1.0, 10.0)).float().to(device)
    return TrainingState(detector, classifier, optimizer, scheduler, scaler, pos_weight)


def restore(
    state: TrainingState,
    start: StartingPoint,
    generator: torch.Generator,
    args: argparse.Namespace,
    context: DistContext,
) -> None:
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
        generator.set_state(checkpoint["generator"])
        state.start_epoch, state.log = checkpoint["epoch"] + 1, checkpoint["log"]
        announce(context, f"resumed from {args.out / 'checkpoint.pt'} at epoch {state.start_epoch}")


def train_epoch_on_every_rank(
    model: torch.nn.Module,
    state: TrainingState,
    train_data: TensorSet,
    generator: torch.Generator,
    epoch: int,
    normalization: tuple[float, float],
    args: argparse.Namespace,
    context: DistContext,
    device: torch.device,
) -> dict:
    """One epoch on this rank's shard; the losses come back averaged over the ranks."""
    train_stats = train_one_epoch(
        model,
        train_data,
        state.optimizer,
        state.scheduler,
        state.pos_weight,
        Augment(),
        generator,
        args.batch_size,
        device,
        epoch,
        normalization,
        args.max_steps,
        state.scaler,
        rank=context.rank,
        world_size=context.world_size,
        show_progress=context.is_main,
    )
    losses = distributed.mean_across_ranks({k: v for k, v in train_stats.items() if k != "steps"}, context, device)
    return losses | {"steps": train_stats["steps"]}


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
    print(
        f"epoch {epoch}: loss {sum(v for k, v in train_stats.items() if k != 'steps'):.3f}  "
        f"val mAP@0.4 {val_metrics['map40'] or 0:.3f}  val mean AUROC {val_metrics['mean_auroc'] or 0:.3f}  "
        f"({entry['seconds']} s)"
    )


def save_checkpoint(
    args: argparse.Namespace,
    state: TrainingState,
    generator: torch.Generator,
    epoch: int,
    local_labels: list[str],
    global_labels: list[str],
    normalization: tuple[float, float],
) -> None:
    """checkpoint.pt: the unwrapped models, the optimisation state and everything export and --resume read."""
    torch.save(
        {
            "detector": state.detector.state_dict(),
            "classifier": state.classifier.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "generator": generator.get_state(),
            "args": vars(args)
            | {
                "data": str(args.data),
                "out": str(args.out),
                "pretrained_backbone": str(args.pretrained_backbone),
                "init_from": str(args.init_from) if args.init_from else None,
            },
            "epoch": epoch,
            "log": state.log,
            "local_labels": local_labels,
            "global_labels": global_labels,
            "input_size": args.input_size,
            "normalization": normalization,
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


def write_thresholds(
    path: Path,
    val_data: TensorSet,
    val_probabilities: np.ndarray,
    val_detections: list[ImageDetections],
    local_labels: list[str],
    global_labels: list[str],
) -> None:
    """Per-label operating points chosen on the validation split (never on test)."""
    thresholds = {
        name: youden_threshold(val_data.image_labels[:, k], val_probabilities[:, k])
        for k, name in enumerate(global_labels)
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
                "validation_images": len(val_data.image_ids),
                "thresholds": thresholds,
                "finding_thresholds": finding_thresholds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
