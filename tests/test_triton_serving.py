"""The service with CXR_INFERENCE_URL against a real Triton server (the nvidia-pytriton wheel's tritonserver, in its
own .triton-venv/, hosting the test pack through the Python backend running ONNX Runtime)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from benchmarks.local_triton import SHM, TritonServer, ensure_venv
from service.api.app import create_app
from service.inference.modelpack import ModelPack
from service.inference.triton.repository import ServingOptions, write_repository
from service.settings import DEFAULT_PACK
from tests.live import free_port, wait_until_ready

DICOM = {"Content-Type": "application/dicom"}


@pytest.fixture(scope="module")
def triton_repository(tiny_pack, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repository"
    # Small batches and one thread per instance: CI has two cores, shared with the service under test.
    options = ServingOptions(max_batch_size=4, preferred_batch_sizes=(4,), cpu_threads=1)
    write_repository(ModelPack.load(tiny_pack), out, "python", options)
    return out


@pytest.fixture(scope="module")
def triton(triton_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    server = TritonServer(ensure_venv(), triton_repository, free_port(), free_port(), free_port(), log)
    with server.start():
        server.wait_ready()
        yield server


def json_without_timing(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    return {key: value for key, value in body.items() if key not in ("request_id", "timing_ms")}


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    pytest.fail(f"not ready: {client.get('/readyz').json()}")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_remote_answers_equal_in_process_serving(triton, tiny_settings, tiny_dataset, client, protocol):
    """Several phantoms give the same JSON through Triton (gRPC and HTTP) as in-process; /v1/models says where."""
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    settings = tiny_settings.model_copy(update={"inference_url": url, "decode_workers": 1})
    with TestClient(create_app(settings)) as remote:
        wait_ready(remote)
        inference = remote.get("/v1/models").json()["inference"]
        assert inference["where"] == "remote" and inference["url"] == url and inference["protocol"] == protocol
        assert inference["server"]["name"] == "triton"
        assert inference["models"]["detector"]["sha256"] == ModelPack.load(tiny_settings.models).model_sha256(
            "detector"
        )
        assert client.get("/v1/models").json()["inference"]["where"] == "in-process"
        for path in sorted((tiny_dataset / "test").glob("*.dicom"))[:4]:
            body = path.read_bytes()
            assert json_without_timing(remote.post("/v1/predict", content=body, headers=DICOM)) == json_without_timing(
                client.post("/v1/predict", content=body, headers=DICOM)
            )


def test_a_server_with_another_pack_keeps_the_service_unready(triton, tiny_settings, caplog):
    """A service verifying another pack than the server's stays unready (inference_server_mismatch), logging why."""
    settings = tiny_settings.model_copy(update={"inference_url": triton.grpc_url, "models": DEFAULT_PACK})
    with TestClient(create_app(settings), raise_server_exceptions=False) as other:
        deadline = time.monotonic() + 10
        while other.get("/readyz").json().get("reason") != "inference_server_mismatch":
            assert time.monotonic() < deadline, other.get("/readyz").json()
            time.sleep(0.1)
        response = other.get("/readyz")
        assert response.status_code == 503 and response.headers["Retry-After"]
    assert "not serving this pack" in caplog.text and "sha256" in caplog.text


def group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


class Load:
    """Clients posting the same DICOM in a loop until stopped; statuses and Retry-After headers tallied."""

    def __init__(self, base: str, body: bytes, clients: int = 3) -> None:
        self.base, self.body = base, body
        self.statuses: Counter = Counter()
        self.missing_retry_after = 0
        self.slowest_s = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                response = http.post("/v1/predict", content=self.body, headers=DICOM)
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                self.statuses[response.status_code] += 1
                if response.status_code == 503 and not response.headers.get("Retry-After"):
                    self.missing_retry_after += 1
                if response.status_code == 503:
                    time.sleep(0.05)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def wait_for(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(0.05)
    return time.monotonic() - started


def test_triton_killed_under_load_means_503_then_recovery(triton_repository, tiny_pack, tiny_dataset, tmp_path):
    """SIGKILL of Triton mid-load: requests get 503 with Retry-After (no 500, no hang), /readyz 503; once Triton is
    back on the same port the service recovers by itself. Every Triton process and /dev/shm region is gone."""
    install = ensure_venv()
    ports = (free_port(), free_port(), free_port())
    first = TritonServer(install, triton_repository, *ports, tmp_path / "triton-1.log").start()
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("CXR_")} | {
        "CXR_INFERENCE_URL": first.grpc_url,
        "CXR_MAX_BATCH_SIZE": "4",
        "CXR_DECODE_WORKERS": "1",
        "CXR_MAX_BODY_BYTES": str(16 * 1024 * 1024),
        "CXR_INFERENCE_TIMEOUT_S": "5",
    }
    service_log = (tmp_path / "service.log").open("w")
    service = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--models", str(tiny_pack), "--log-level", "warning"],
        env=env,
        stdout=service_log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    body = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    second = None
    try:
        first.wait_ready()
        wait_until_ready(base, timeout_s=60)
        with Load(base, body) as load:
            wait_for(lambda: load.statuses[200] >= 6, 60, "six answers through Triton")
            first_group = group_members(first.process.pid)
            assert len(first_group) >= 3  # the server and a Python-backend stub per model
            first.kill()
            wait_for(lambda: not group_members(first.process.pid), 10, "every process of the killed Triton gone")
            assert not list(SHM.glob(f"{first.shm_prefix}*"))
            wait_for(lambda: load.statuses[503] >= 3, 30, "503 answers while Triton is down")
            ready = httpx.get(f"{base}/readyz", timeout=5)
            assert ready.status_code == 503 and ready.headers["Retry-After"], ready.text
            assert ready.json()["reason"] == "inference_server_unavailable"

            answered = load.statuses[200]
            second = TritonServer(install, triton_repository, *ports, tmp_path / "triton-2.log").start()
            second.wait_ready()
            recovery_s = wait_for(lambda: load.statuses[200] > answered + 3, 30, "answers after Triton's return")
        print(f"statuses {dict(load.statuses)}; recovery {recovery_s:.1f} s after Triton was ready")
        assert set(load.statuses) <= {200, 503}, load.statuses
        assert load.missing_retry_after == 0
        assert load.slowest_s < 30
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
        service_log.close()
        for server in (first, second):
            if server is not None:
                server.stop()
                wait_for(lambda s=server: not group_members(s.process.pid), 10, "every Triton process gone")
                assert not list(SHM.glob(f"{server.shm_prefix}*"))
        print((tmp_path / "service.log").read_text()[-3000:])
