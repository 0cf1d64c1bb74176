"""One epoch of training, and prediction/evaluation through the shared postprocess."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service.inference.postprocess import DetectionParams, select_detections
from training.data import TensorSet
from training.distributed import rank_generator, shard
from training.metrics import ImageDetections, auroc, mean_average_precision
from training.models import Classifier, Detector, detection_loss


@dataclass(frozen=True)
class Augment:
    """Radiograph-safe augmentations: exposure/contrast/gamma, noise and small shifts.

    No horizontal flips: laterality is anatomy here (the heart's side, dextrocardia).
    """

    max_shift: float = 0.06  # fraction of the input size
    contrast: float = 0.15
    brightness: float = 0.1
    gamma: float = 0.2
    noise: float = 0.03


def batches(
    data: TensorSet,
    batch_size: int,
    generator: torch.Generator,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Index batches of one epoch; under DDP, this rank's shard of the order all ranks draw alike."""
    order = (
        torch.randperm(len(data.image_ids), generator=generator).numpy() if shuffle else np.arange(len(data.image_ids))
    )
    order = shard(order, rank, world_size)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1, max_steps: int | None = None) -> int:
    """Optimizer steps each rank takes per epoch (equal on every rank: see `shard`)."""
    images_per_rank = -(-num_images // world_size)  # ceil: the shard is padded
    steps = -(-images_per_rank // batch_size)  # ceil: the last batch may be short
    return steps if max_steps is None else min(steps, max_steps)


def augment_batch(
    images: torch.Tensor,
    boxes: list[torch.Tensor],
    augment: Augment,
    generator: torch.Generator,
    normalization_mean: float,
    normalization_std: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Apply intensity jitter in display space and an integer translation to images and boxes."""
    n, _, size, _ = images.shape
    display = images * normalization_std + normalization_mean

    def uniform(spread: float) -> torch.Tensor:
        return (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * spread

    display = display.clamp(0, 1) ** torch.exp(uniform(augment.gamma))
    display = (display - 0.5) * (1 + uniform(augment.contrast)) + 0.5 + uniform(augment.brightness)
    display = display + torch.randn(display.shape, generator=generator) * augment.noise * torch.rand(
        n, 1, 1, 1, generator=generator
    )
    shifted, moved = torch.zeros_like(display), []
    limit = int(augment.max_shift * size)
    for i in range(n):
        dx, dy = (
            torch.randint(-limit, limit + 1, (2,), generator=generator) if limit else torch.zeros(2, dtype=torch.long)
        ).tolist()
        src_x, dst_x = slice(max(0, -dx), size - max(0, dx)), slice(max(0, dx), size - max(0, -dx))
        src_y, dst_y = slice(max(0, -dy), size - max(0, dy)), slice(max(0, dy), size - max(0, -dy))
        shifted[i, :, dst_y, dst_x] = display[i, :, src_y, src_x]
        box = boxes[i] + torch.tensor([dx, dy, dx, dy], dtype=boxes[i].dtype)
        moved.append(box.clamp(0, size))
    return (shifted - normalization_mean) / normalization_std, moved


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class JointModel(nn.Module):
    """The detector and the classifier as one module whose forward() returns the training losses.

    DDP synchronises gradients only for work done inside the wrapped module's forward(), and the
    losses go through Detector.dense and Classifier.logits, not their forward(). Computing both
    losses here lets one DDP wrapper (one gradient all-reduce per step) cover the two models that
    one optimizer trains; a single process calls it unwrapped, with the same arithmetic.
    """

    def __init__(self, detector: Detector, classifier: Classifier, every_parameter_in_graph: bool = False) -> None:
        super().__init__()
        self.detector = detector
        self.classifier = classifier
        self.every_parameter_in_graph = every_parameter_in_graph

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        labels: torch.Tensor,
        pos_weight: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        losses = detection_loss(self.detector, images, targets)
        losses["classifier"] = nn.functional.binary_cross_entropy_with_logits(
            self.classifier.logits(images).float(), labels, pos_weight=pos_weight
        )
        if self.every_parameter_in_graph:
            # DDP waits for a gradient of every parameter each step, but a batch without a positive
            # location leaves the detector's box and centerness heads out of the graph (see
            # models.detection_loss) and the next step fails. Zero times one element of each
            # parameter brings them in: their gradient is 0 there, and exactly unchanged elsewhere.
            # (find_unused_parameters=True would also work, at an extra graph traversal per step.)
            losses["box"] = losses["box"] + 0.0 * sum(p.reshape(-1)[0] for p in self.parameters())
        return losses


def train_one_epoch(
    model: nn.Module,
    data: TensorSet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pos_weight: torch.Tensor,
    augment: Augment,
    generator: torch.Generator,
    batch_size: int,
    device: torch.device,
    epoch: int,
    normalization: tuple[float, float],
    max_steps: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
) -> dict[str, float]:
    """One pass over this rank's shard; `model` is a JointModel, or one wrapped in DDP."""
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    order = list(batches(data, batch_size, generator, rank=rank, world_size=world_size))
    # A single process keeps drawing augmentation from the shared stream, exactly as before DDP.
    augment_generator = generator if world_size == 1 else rank_generator(generator, rank)
    progress = tqdm(order, desc=f"epoch {epoch}", leave=False, disable=not show_progress)
    for indices in progress:
        if max_steps is not None and steps >= max_steps:
            break
        images = torch.from_numpy(data.images[indices])
        boxes = [torch.from_numpy(data.boxes[i]) for i in indices]
        images, boxes = augment_batch(images, boxes, augment, augment_generator, *normalization)
        keep = [(b[:, 2] - b[:, 0] > 1) & (b[:, 3] - b[:, 1] > 1) for b in boxes]  # shifted off-canvas
        targets = [
            {"boxes": b[k].to(device), "labels": torch.from_numpy(data.box_labels[i])[k].to(device)}
            for b, k, i in zip(boxes, keep, indices)
        ]
        images = images.to(device, non_blocking=True)
        labels = torch.from_numpy(data.image_labels[indices]).to(device)
        with torch.autocast(device.type, enabled=scaler is not None):
            losses = model(images, targets, labels, pos_weight)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 10.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        steps += 1
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
        progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {name: value / max(steps, 1) for name, value in totals.items()} | {"steps": steps}


@torch.no_grad()
def predict(
    detector: Detector, classifier: Classifier, images: np.ndarray, device: torch.device, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch outputs in the exported graphs' layout: boxes (N, L, 4), scores (N, L, C), probabilities (N, K)."""
    detector.eval()
    classifier.eval()
    outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        boxes, scores = detector(batch)
        outputs.append(
            (boxes.float().cpu().numpy(), scores.float().cpu().numpy(), classifier(batch).float().cpu().numpy())
        )
    return tuple(np.concatenate(parts) for parts in zip(*outputs))  # type: ignore[return-value]


def evaluate(
    detector: Detector,
    classifier: Classifier,
    data: TensorSet,
    local_labels: list[str],
    global_labels: list[str],
    device: torch.device,
    params: DetectionParams = DetectionParams(),
) -> tuple[dict, np.ndarray, list[ImageDetections]]:
    """Validation metrics in model-input space (fast, for model selection).

    Returns (metrics, probabilities, per-image detections against the ground truth).
    """
    boxes, scores, probabilities = predict(detector, classifier, data.images, device)
    images = []
    for i in range(len(data.image_ids)):
        detections = select_detections(boxes[i], scores[i], params)
        images.append(
            ImageDetections(detections.boxes, detections.scores, detections.classes, data.boxes[i], data.box_labels[i])
        )
    per_label_auroc = {
        name: auroc(data.image_labels[:, k], probabilities[:, k]) for k, name in enumerate(global_labels)
    }
    defined = [value for value in per_label_auroc.values() if value is not None]
    metrics = {
        "map40": mean_average_precision(images, local_labels, 0.4)["map"],
        "mean_auroc": float(np.mean(defined)) if defined else None,
        "auroc": per_label_auroc,
    }
    return metrics, probabilities, images
