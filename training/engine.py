"""One epoch of training over a streaming loader, and prediction/evaluation through the shared postprocess."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from service.dicom.pipeline import ModelInputs
from service.inference.postprocess import DetectionParams, select_detections
from training.dataset import Batch
from training.localisation import CamLoss
from training.metrics import ImageDetections, auroc, mean_average_precision
from training.models import DETECTOR_STRIDES, Classifier, Detector, detection_loss


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1, max_steps: int | None = None) -> int:
    """Optimizer steps each rank takes per epoch (equal on every rank: the sampler pads the shards)."""
    images_per_rank = -(-num_images // world_size)  # ceil: the shard is padded
    steps = -(-images_per_rank // batch_size)  # ceil: the last batch may be short
    return steps if max_steps is None else min(steps, max_steps)


def model_images(batch: Batch, inputs: ModelInputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(detector images, classifier images) of a batch on `device`: the same tensor when the models share an input."""
    on_device = [images.to(device, non_blocking=True) for images in batch.images]
    return on_device[inputs.index("detector")], on_device[inputs.index("classifier")]


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

    def __init__(
        self,
        detector: Detector,
        classifier: Classifier,
        every_parameter_in_graph: bool = False,
        cam_loss: CamLoss | None = None,
    ) -> None:
        super().__init__()
        self.detector = detector
        self.classifier = classifier
        self.every_parameter_in_graph = every_parameter_in_graph
        self.cam_loss = cam_loss  # --cam-loss: the heatmaps of positive diseases toward the finding boxes
        # --shared-backbone: the classifier is a head on the detector's backbone, which then runs once per batch.
        self.shared_backbone = classifier.features is detector.features

    def forward(
        self,
        detector_images: torch.Tensor,
        classifier_images: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        labels: torch.Tensor,
        pos_weight: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if self.shared_backbone:
            taps = self.detector.backbone_taps(detector_images)
            losses = detection_loss(self.detector, detector_images, targets, taps)
            feature_map = taps[str(max(DETECTOR_STRIDES))]
        else:
            losses = detection_loss(self.detector, detector_images, targets)
            feature_map = self.classifier.feature_map(classifier_images)
        logits = self.classifier.logits_from(feature_map)
        losses["classifier"] = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels, pos_weight=pos_weight
        )
        if self.cam_loss is not None:
            losses["cam"] = self.cam_loss(feature_map, self.classifier.head[-1], targets, labels)
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
    loader: DataLoader,
    inputs: ModelInputs,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pos_weight: torch.Tensor,
    device: torch.device,
    epoch: int,
    max_steps: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """One pass over this rank's shard (the loader's sampler); `model` is a JointModel, or one wrapped in DDP."""
    model.train()
    totals: dict[str, float] = {}
    steps = images = 0
    started = time.perf_counter()
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    progress = tqdm(loader, total=total, desc=f"epoch {epoch}", leave=False, disable=not show_progress)
    for batch in progress:
        if max_steps is not None and steps >= max_steps:
            break
        detector_images, classifier_images = model_images(batch, inputs, device)
        targets = [
            {"boxes": boxes.to(device), "labels": labels.to(device)}
            for boxes, labels in zip(batch.boxes, batch.box_labels)
        ]
        labels = batch.image_labels.to(device)
        with torch.autocast(device.type, enabled=scaler is not None):
            losses = model(detector_images, classifier_images, targets, labels, pos_weight)
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
        images += len(batch.indices)
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
        progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
    seconds = time.perf_counter() - started  # data loading included: what an epoch costs
    return {name: value / max(steps, 1) for name, value in totals.items()} | {
        "steps": steps,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
    }


@torch.no_grad()
def predict(
    detector: Detector,
    classifier: Classifier,
    detector_images: np.ndarray,
    classifier_images: np.ndarray,
    device: torch.device,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch outputs in the exported graphs' layout: boxes (N, L, 4), scores (N, L, C), probabilities (N, K)."""
    detector.eval()
    classifier.eval()
    outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, len(detector_images), batch_size):
        boxes, scores = detector(torch.from_numpy(detector_images[start : start + batch_size]).to(device))
        probabilities = classifier(torch.from_numpy(classifier_images[start : start + batch_size]).to(device))
        outputs.append((boxes.float().cpu().numpy(), scores.float().cpu().numpy(), probabilities.float().cpu().numpy()))
    return tuple(np.concatenate(parts) for parts in zip(*outputs))  # type: ignore[return-value]


@torch.no_grad()
def evaluate(
    detector: Detector,
    classifier: Classifier,
    loader: DataLoader,
    inputs: ModelInputs,
    local_labels: list[str],
    global_labels: list[str],
    device: torch.device,
    params: DetectionParams = DetectionParams(),
) -> tuple[dict, np.ndarray, np.ndarray, list[ImageDetections]]:
    """Validation metrics in model-input space (fast, for model selection), streaming over the loader.

    Only each image's detections after NMS are kept, never the dense outputs of the whole split.
    Returns (metrics, probabilities (N, K), image labels (N, K), per-image detections against the ground truth).
    """
    detector.eval()
    classifier.eval()
    images: list[ImageDetections] = []
    probabilities, targets = [], []
    for batch in tqdm(loader, desc="validate", leave=False):
        detector_images, classifier_images = model_images(batch, inputs, device)
        boxes, scores = (output.float().cpu().numpy() for output in detector(detector_images))
        probabilities.append(classifier(classifier_images).float().cpu().numpy())
        targets.append(batch.image_labels.numpy())
        for i in range(len(boxes)):
            detections = select_detections(boxes[i], scores[i], params)
            images.append(
                ImageDetections(
                    detections.boxes,
                    detections.scores,
                    detections.classes,
                    batch.boxes[i].numpy(),
                    batch.box_labels[i].numpy(),
                )
            )
    probability_matrix = np.concatenate(probabilities) if probabilities else np.zeros((0, len(global_labels)))
    target_matrix = np.concatenate(targets) if targets else np.zeros((0, len(global_labels)))
    per_label_auroc = {
        name: auroc(target_matrix[:, k], probability_matrix[:, k]) for k, name in enumerate(global_labels)
    }
    defined = [value for value in per_label_auroc.values() if value is not None]
    metrics = {
        "map40": mean_average_precision(images, local_labels, 0.4)["map"],
        "mean_auroc": float(np.mean(defined)) if defined else None,
        "auroc": per_label_auroc,
    }
    return metrics, probability_matrix, target_matrix, images
