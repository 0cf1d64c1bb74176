"""Multi-process training: torchrun with two CPU ranks on the gloo backend, launched as users launch it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.live import free_port
from training.dataset import shard_sampler
from training.engine import steps_per_epoch
from training.models import Classifier, Detector

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
BATCH_SIZE = 4
MAX_STEPS = 2
LAUNCH_TIMEOUT_S = 180  # two fresh interpreters importing torch on a loaded 2-core runner


def _torchrun(dataset: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node=2 -m training.train ...` on CPU, as a user runs it."""
    # Drop any torchrun variables of an enclosing launcher so the child job sets up its own world.
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU ranks, one thread each: two cores suffice
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={WORLD_SIZE}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "training.train",
        "--data",
        str(dataset),
        "--out",
        str(run),
        "--max-steps",
        str(MAX_STEPS),
        "--batch-size",
        str(BATCH_SIZE),
        "--input-size",
        "64",
        "--min-examples",
        "1",
        "--workers",
        "1",
        "--seed",
        "5",
        "--dist-backend",
        "gloo",
        *extra,
    ]
    # A session of its own, so a timeout can kill the ranks too and not only the launcher.
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as launcher:
        try:
            stdout, stderr = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            stdout, stderr = launcher.communicate()
            pytest.fail(
                f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s (a rank stuck in a collective?)\n"
                f"{stdout}\n{stderr}"
            )
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)


def _assert_ranks_in_step(run: Path) -> dict:
    summary = json.loads((run / "run.json").read_text())
    ddp = summary["distributed"]
    assert ddp["world_size"] == WORLD_SIZE and ddp["backend"] == "gloo"
    assert ddp["effective_batch_size"] == BATCH_SIZE * WORLD_SIZE
    digests = ddp["parameter_sha256_per_rank"]
    assert len(digests) == WORLD_SIZE and len(set(digests)) == 1, digests
    return summary


@pytest.fixture(scope="module")
def ddp_run(tiny_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp-run")
    # One rare finding (one boxed image of 40, or none) makes most batches free of positive locations,
    # the case where DDP would wait forever for the detector heads' gradients.
    cache = tmp_path_factory.mktemp("ddp-cache")
    result = _torchrun(
        tiny_dataset, run, "--epochs", "1", "--local-labels", "Cardiomegaly", "--cache", str(cache), "--no-augment"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("epoch 0:") == 1, result.stdout  # rank 0 alone reports
    # Rank 0 builds 17 training + 6 validation images, rank 1 the other 17; only rank 0 draws progress bars.
    assert "cache (0 of 23 cached)" in result.stderr and "cache (0 of 17 cached)" not in result.stderr
    # Each rank built its own share of the cache: every training and validation image is there, once.
    assert len(list(cache.glob("*/*.npz"))) == 40
    return run


def test_ranks_take_disjoint_equal_shards_of_one_shuffled_order():
    """Each rank's sampler yields ceil(N/W) indices of the epoch's shared permutation, disjoint except for the
    padding, together covering every image; the next epoch reshuffles."""
    dataset = list(range(7))
    samplers = [shard_sampler(dataset, rank, 3, shuffle=True, seed=5) for rank in range(3)]
    parts = [list(sampler) for sampler in samplers]
    assert [len(part) for part in parts] == [3, 3, 3]
    assert set().union(*parts) == set(dataset)
    assert sum(len(part) for part in parts) - len(set().union(*parts)) == 2  # the padding repeats two indices
    for sampler in samplers:
        sampler.set_epoch(1)
    assert [list(sampler) for sampler in samplers] != parts
    assert steps_per_epoch(34, 4, world_size=2) == 5 and steps_per_epoch(34, 4) == 9
    assert steps_per_epoch(34, 4, world_size=2, max_steps=2) == 2


def test_two_gloo_ranks_train_in_step_and_rank_0_writes_the_run(ddp_run):
    """torchrun with 2 CPU ranks exits 0, both ranks end bit-identical, and rank 0 wrote every output."""
    for name in ("checkpoint.pt", "log.jsonl", "thresholds.json", "loss_curves.png", "run.json"):
        assert (ddp_run / name).exists(), name
    _assert_ranks_in_step(ddp_run)
    log = [json.loads(line) for line in (ddp_run / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0]  # one writer: a second rank would duplicate the line
    assert log[0]["train"]["steps"] == MAX_STEPS


def test_ddp_checkpoint_loads_into_single_process_models(ddp_run):
    """The checkpoint holds unwrapped state dicts (no 'module.' prefix) that load strictly into the plain models."""
    checkpoint = torch.load(ddp_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    args = checkpoint["args"]
    detector = Detector(len(checkpoint["local_labels"]), args["detector_backbone"], args["fpn_channels"])
    classifier = Classifier(len(checkpoint["global_labels"]), args["classifier_backbone"])
    detector.load_state_dict(checkpoint["detector"])
    classifier.load_state_dict(checkpoint["classifier"])
    assert checkpoint["inputs"]["detector"]["size"] == checkpoint["inputs"]["classifier"]["size"] == 64
    assert checkpoint["epoch"] == 0


def test_resume_under_ddp_continues_from_the_checkpoint(ddp_run, tiny_dataset, tmp_path):
    """--resume under torchrun: every rank loads the checkpoint, training goes on at epoch 1, the ranks stay in step."""
    run = tmp_path / "resumed"
    shutil.copytree(ddp_run, run)
    result = _torchrun(tiny_dataset, run, "--epochs", "2", "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and result.stdout.count("epoch 1:") == 1, result.stdout
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [0, 1]
    assert _assert_ranks_in_step(run)["epochs"] == 2
