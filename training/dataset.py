"""Streaming training data: each DICOM decoded when a batch needs it, through the service's own preprocessing.

`RadiographDataset` is a `torch.utils.data.Dataset` over the records of a split. An item is the image prepared
by `service.dicom.pipeline.prepare` (the function the service runs on every request: no train/serve skew) for
each model input spec, read from the on-disk cache (`training.cache`) when one is given, with the record's
boxes mapped into the detector's input pixels and, for training, augmented with the image
(`training.augment`). `DataLoader` workers decode in parallel with the training step, and a
`DistributedSampler` gives each DDP rank its own shard: a rank decodes only the images it trains on.

Nothing grows with the dataset: a record is a path and its labels; pixels live only in the batches in flight
(`benchmarks/training_memory.py` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from service.dicom.pipeline import InputSpec, ModelInputs, prepare
from service.dicom.preprocess import Letterbox
from training.augment import AugmentConfig, augment_sample, radiograph_augmentation
from training.cache import PreprocessedCache
from training.data import Record


@dataclass
class Sample:
    images: tuple[torch.Tensor, ...]  # one 1 x S x S float32 per distinct input spec (ModelInputs.specs order)
    boxes: torch.Tensor  # (K, 4) xyxy in the detector's input pixels
    box_labels: torch.Tensor  # (K,) int64 indices into the local labels
    image_labels: torch.Tensor  # (G,) float32, columns in global-label order
    index: int  # position of the record in the dataset


@dataclass
class Batch:
    images: tuple[torch.Tensor, ...]  # one N x 1 x S x S per distinct input spec
    boxes: list[torch.Tensor]
    box_labels: list[torch.Tensor]
    image_labels: torch.Tensor  # N x G
    indices: list[int]


def collate(samples: list[Sample]) -> Batch:
    return Batch(
        images=tuple(torch.stack(position) for position in zip(*(sample.images for sample in samples))),
        boxes=[sample.boxes for sample in samples],
        box_labels=[sample.box_labels for sample in samples],
        image_labels=torch.stack([sample.image_labels for sample in samples]),
        indices=[sample.index for sample in samples],
    )


def model_space_boxes(
    record: Record, geometry: Letterbox, local_index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The record's boxes of trained local labels, in the model input's pixels, and their label indices."""
    kept = [box for box in record.boxes if box.label in local_index]
    xyxy = np.array([[b.x_min, b.y_min, b.x_max, b.y_max] for b in kept], dtype=np.float32).reshape(-1, 4)
    return geometry.to_model(xyxy), np.array([local_index[b.label] for b in kept], dtype=np.int64)


def image_label_matrix(records: list[Record], global_labels: list[str]) -> np.ndarray:
    """N x G float32 0/1 image labels, columns in global-label order."""
    return np.array(
        [[record.image_labels.get(name, 0) for name in global_labels] for record in records], dtype=np.float32
    ).reshape(len(records), len(global_labels))


class RadiographDataset(Dataset):
    """The records of a split as model inputs and targets, decoded on demand (or read from the cache)."""

    def __init__(
        self,
        records: list[Record],
        inputs: ModelInputs,
        local_labels: list[str],
        global_labels: list[str],
        cache: PreprocessedCache | None = None,
        augment: AugmentConfig | None = None,
    ) -> None:
        self.records = list(records)
        self.inputs = inputs
        self.specs = inputs.specs
        self.detector_index = inputs.index("detector")
        self.local_index = {name: i for i, name in enumerate(local_labels)}
        self.image_labels = image_label_matrix(self.records, global_labels)
        self.cache = cache
        self.transforms = (
            [radiograph_augmentation(augment, spec.normalization) for spec in self.specs] if augment else None
        )

    def __len__(self) -> int:
        return len(self.records)

    def prepared(self, record: Record) -> tuple[tuple[np.ndarray, ...], tuple[Letterbox, ...]]:
        """One input per spec and its letterbox: from the cache when it holds them all, else decoded (and cached)."""
        if self.cache is not None:
            entries = [self.cache.load(spec, record.image_id, record.path) for spec in self.specs]
            if all(entry is not None for entry in entries):
                return tuple(e.input for e in entries), tuple(e.geometry for e in entries)  # type: ignore[union-attr]
        prepared = prepare(record.path.read_bytes(), self.specs)
        if self.cache is None:
            return prepared.inputs, prepared.geometries
        stored = [
            self.cache.store(spec, record.image_id, record.path, tensor, geometry)
            for spec, tensor, geometry in zip(self.specs, prepared.inputs, prepared.geometries)
        ]
        return tuple(entry.input for entry in stored), tuple(entry.geometry for entry in stored)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        tensors, geometries = self.prepared(record)
        boxes, labels = model_space_boxes(record, geometries[self.detector_index], self.local_index)
        images = [torch.from_numpy(np.ascontiguousarray(tensor)) for tensor in tensors]
        box_tensor, label_tensor = torch.from_numpy(boxes), torch.from_numpy(labels)
        if self.transforms is not None:
            for position, transform in enumerate(self.transforms):
                if position == self.detector_index:
                    images[position], box_tensor, label_tensor = augment_sample(
                        transform, images[position], box_tensor, label_tensor
                    )
                else:  # the classifier's own input size: augmented on its own (it has no boxes to follow)
                    no_boxes = torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64)
                    images[position] = augment_sample(transform, images[position], *no_boxes)[0]
        return Sample(
            images=tuple(images),
            boxes=box_tensor.float(),
            box_labels=label_tensor.long(),
            image_labels=torch.from_numpy(self.image_labels[index]),
            index=index,
        )


def shard_sampler(dataset: Dataset, rank: int, world_size: int, shuffle: bool, seed: int) -> DistributedSampler:
    """This rank's shard of each epoch (a single process is a world of one): call set_epoch() every epoch.

    torch's DistributedSampler pads the order to a multiple of the world size, so every rank runs the same
    number of steps (a rank that finished early would leave the others waiting in a gradient all-reduce).
    """
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    sampler: Sampler | None = None,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of `collate` from `workers` processes (0: in this process); `seed` fixes the workers' random streams."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def stacked_inputs(
    records: list[Record], specs: tuple[InputSpec, ...], description: str = "prepare"
) -> tuple[np.ndarray, ...]:
    """A few images prepared as the service prepares them, stacked per spec (parity checks and tests)."""
    prepared = [prepare(record.path.read_bytes(), specs) for record in tqdm(records, desc=description)]
    return tuple(
        np.stack([image.inputs[position] for image in prepared])
        if prepared
        else np.zeros((0, 1, spec.size, spec.size), np.float32)
        for position, spec in enumerate(specs)
    )
