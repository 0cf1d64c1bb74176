"""Multi-process (DistributedDataParallel) helpers for `training.train`, launched with torchrun.

torchrun starts one process per device and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without those variables, or with a world of
one, everything here is a no-op and training runs as a plain single process.

Rules the training loop relies on:
- every rank draws the same seeded permutation of the training set each epoch and takes its own
  shard of it (torch's DistributedSampler, training/dataset.shard_sampler), padded so each rank runs
  the same number of steps (a rank that runs out early would leave the others blocked in a gradient
  all-reduce);
- rank 0 alone evaluates and writes files; the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# Rank 0 validates and writes the checkpoint while the other ranks wait at a barrier; on the real
# dataset that (and uneven DICOM decoding before the first collective) can outlast NCCL's 10-minute
# default, which would kill a healthy run.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank 0 of a world of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # set once the process group is up

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env(environ: Mapping[str, str]) -> DistContext:
    """Read torchrun's variables; a missing WORLD_SIZE means a plain `python -m training.train`."""
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(environ["RANK"]), int(environ["LOCAL_RANK"])
    if not 0 <= rank < world_size:
        raise SystemExit(f"error: RANK={rank} outside WORLD_SIZE={world_size}")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def start(context: DistContext, device: torch.device, backend: str | None) -> DistContext:
    """Join the process group (no-op for a single process); returns the context with its backend."""
    if not context.enabled:
        return context
    backend = backend or default_backend(device)
    if device.type == "cuda":
        # Before init so NCCL (and all_gather_object) use this rank's GPU, not cuda:0 on every rank.
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return DistContext(context.rank, context.world_size, context.local_rank, backend)


def stop() -> None:
    """Leave the process group, if one is up (called at the end and on error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, context: DistContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the joint model; the model itself for a single process.

    DDP broadcasts rank 0's parameters here, so call it after loading any checkpoint. The model
    must give every parameter a gradient each step (JointModel(every_parameter_in_graph=True)).
    """
    if not context.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(context: DistContext) -> None:
    if not context.enabled:
        return
    if context.backend == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def mean_across_ranks(stats: dict[str, float], context: DistContext, device: torch.device) -> dict[str, float]:
    """Average per-rank training losses so the log describes the whole effective batch."""
    if not context.enabled:
        return stats
    names = list(stats)  # the same order on every rank: the same code built the dict
    values = torch.tensor([float(stats[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {name: float(value) / context.world_size for name, value in zip(names, values.tolist())}


def parameter_digest(modules: Iterable[nn.Module]) -> str:
    """sha256 of every parameter's bytes: equal on all ranks exactly when DDP kept them in sync.

    Buffers (BatchNorm running statistics) are left out on purpose: each rank updates them from
    its own batches after DDP's start-of-step broadcast, so they differ by design.
    """
    digest = hashlib.sha256()
    for module in modules:
        for parameter in module.parameters():
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_strings(value: str, context: DistContext) -> list[str]:
    """Every rank's value, in rank order (a collective: all ranks must call it)."""
    if not context.enabled:
        return [value]
    gathered: list[str | None] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return [str(item) for item in gathered]


@contextlib.contextmanager
def quiet_unless_main(context: DistContext) -> Iterator[None]:
    """Silence stderr (tqdm bars of code that does not take a `disable` flag) on ranks other than 0.

    Scoped to the block: an exception still propagates and is printed after stderr is restored.
    """
    if context.is_main:
        yield
        return
    with Path(os.devnull).open("w") as sink, contextlib.redirect_stderr(sink):
        yield
