"""Shared fixtures: one tiny generated dataset, a few training steps, one exported pack, one app.

Built once per test session so the whole suite stays inside CI's budget on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings

TINY_SIZE = 128  # model input for the tiny pack: small enough to train a few steps in seconds


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from training.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("dataset")
    generate_dataset(root, n_train=40, n_test=8, seed=7, difficulty="easy", size=(400, 336))
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    from training import train

    run = tmp_path_factory.mktemp("run")
    args = train.get_args_parser().parse_args(
        [
            "--data",
            str(tiny_dataset),
            "--out",
            str(run),
            "--epochs",
            "2",
            "--max-steps",
            "3",
            "--batch-size",
            "8",
            "--input-size",
            str(TINY_SIZE),
            "--min-examples",
            "1",
            "--workers",
            "1",
            "--seed",
            "3",
        ]
    )
    train.main(args)
    return run


@pytest.fixture(scope="session")
def tiny_pack(tiny_run, tmp_path_factory) -> Path:
    from training import export

    pack = tmp_path_factory.mktemp("packs") / "tiny"
    export.main(
        export.get_args_parser().parse_args(["--run", str(tiny_run), "--out", str(pack), "--parity-images", "4"])
    )
    return pack


@pytest.fixture(scope="session")
def tiny_settings(tiny_pack) -> Settings:
    return Settings(
        models=tiny_pack,
        max_batch_size=4,
        max_queue_delay_ms=2,
        providers=["CPUExecutionProvider"],
        max_body_bytes=16 * 1024 * 1024,
    )


@pytest.fixture(scope="session")
def client(tiny_settings):
    with TestClient(create_app(tiny_settings), raise_server_exceptions=False) as test_client:
        yield test_client
