"""Several HTTP workers sharing one inference server: the wire protocol, the remote batcher, and the live launcher."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.errors import NotReady, Overloaded
from service.inference.batcher import Batcher
from service.inference.client import RemoteBatcher, RemoteModels, hello_problem
from service.inference.modelpack import ModelPack
from service.inference.protocol import (
    PREFIX,
    PROTOCOL_VERSION,
    ProtocolError,
    decode_body,
    encode_frame,
    pack_identity,
    parse_prefix,
    read_frame,
)
from service.inference.server import InferenceServer, input_problem
from service.inference.state import ServingState
from service.multiworker import default_decode_workers, restart_delay, worker_environment
from service.settings import Settings
from tests.live import free_port, wait_until_ready

SIZE = 8
FAKE_PACK = ModelPack(
    path=Path("unused"),
    manifest={
        "name": "fake",
        "version": "1",
        "input": {"size": SIZE, "normalization": {"mean": 0.5, "std": 0.25}},
        "detector": {"sha256": "d" * 64, "labels": ["a"]},
        "classifier": {"sha256": "c" * 64, "labels": ["b"]},
    },
)


def frame_bytes(header: dict, arrays=()) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(header, arrays))


def decode_frame(frame: bytes, max_payload_bytes: int = 64 * 1024 * 1024) -> tuple[dict, list[np.ndarray]]:
    """One whole frame held in memory -> header and arrays, through the protocol's own parse_prefix and decode_body."""
    header_length, payload_length = parse_prefix(frame[: PREFIX.size], max_payload_bytes)
    body = frame[PREFIX.size :]
    if len(body) != header_length + payload_length:
        raise ProtocolError(
            f"frame holds {len(body)} bytes after its prefix, the prefix says {header_length + payload_length}"
        )
    return decode_body(body[:header_length], body[header_length:])


def raw_frame(header: bytes, payload: bytes = b"") -> bytes:
    """A frame as a misbehaving peer could write it, not checked by encode_frame."""
    return struct.pack("<II", len(header), len(payload)) + header + payload


def test_protocol_round_trips_header_and_arrays():
    """A frame decodes to the same header and arrays (dtype, shape, values), non-contiguous and 0-d arrays included."""
    arrays = [
        np.random.default_rng(0).random((1, SIZE, SIZE), dtype=np.float32),
        np.zeros((0, 4), np.float32),
        np.arange(12, dtype=np.float64).reshape(3, 4).T,
        np.float16(1.5).reshape(()),
        np.array([True, False]),
    ]
    header, decoded = decode_frame(frame_bytes({"op": "infer", "id": 7}, arrays))
    assert header == {"op": "infer", "id": 7}
    assert [(a.dtype, a.shape) for a in decoded] == [(a.dtype, a.shape) for a in arrays]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, decoded))


@pytest.mark.parametrize(
    "frame, problem",
    [
        (b"\x00\x00\x10\x00" + b"\x00" * 4, "header length"),  # 1 MiB header announced
        (frame_bytes({"op": "infer"}, [np.zeros(300, np.float32)]), "payload of 1200 bytes exceeds"),
        (frame_bytes({"op": "x"})[:-1], "frame holds"),
        (raw_frame(b'{"arrays": [{"dtype": "object", "shape": [1]}]}', b"\x00" * 8), "no allowed dtype"),
        (raw_frame(b'{"arrays": [{"dtype": "float32", "shape": [-1]}]}'), "not a list of sizes"),
        (raw_frame(b'{"arrays": [{"dtype": "float32", "shape": [2]}]}', b"\x00" * 4), "shorter than the arrays"),
        (raw_frame(b'{"arrays": [{"dtype": "float32", "shape": [1]}]}', b"\x00" * 8), "longer than the arrays"),
        (raw_frame(b"[1, 2]"), "not a JSON object"),
        (raw_frame(b"\x80\x04K\x01."), "not JSON"),  # a pickle: never evaluated
    ],
)
def test_protocol_refuses_malformed_frames(frame, problem):
    """Oversized lengths, truncated frames, non-JSON headers (a pickle), disallowed dtypes and array sizes that
    disagree with the payload are refused."""
    with pytest.raises(ProtocolError, match=problem):
        decode_frame(frame, max_payload_bytes=1024)


def test_hello_problem_names_what_is_wrong():
    """A worker refuses a server that is not ready, speaks another protocol or serves another pack."""
    good = {"protocol": PROTOCOL_VERSION, "ready": True, "pack": pack_identity(FAKE_PACK)}
    assert hello_problem(good, pack_identity(FAKE_PACK)) is None
    reason, detail = hello_problem(good | {"ready": False, "reason": "starting"}, pack_identity(FAKE_PACK))
    assert reason == "inference_server_not_ready" and "not ready: starting" in detail
    reason, detail = hello_problem(good | {"protocol": 99}, pack_identity(FAKE_PACK))
    assert reason == "inference_server_mismatch" and "protocol" in detail
    other = good | {"pack": pack_identity(FAKE_PACK) | {"detector_sha256": "e" * 64}}
    reason, detail = hello_problem(other, pack_identity(FAKE_PACK))
    assert reason == "inference_server_mismatch" and "not the one this worker verified" in detail


def test_server_accepts_only_one_image_of_the_pack_size():
    """The inference server runs nothing but one float32 1 x S x S image per input size of the pack per request."""
    assert input_problem([np.zeros((1, SIZE, SIZE), np.float32)], [SIZE]) is None
    assert "float32 (1, 8, 8)" in input_problem([np.zeros((1, SIZE, SIZE), np.float64)], [SIZE])
    assert "float32 (1, 8, 8)" in input_problem([np.zeros((2, SIZE, SIZE), np.float32)], [SIZE])
    assert "1 array(s), got 0" in input_problem([], [SIZE])
    two = [np.zeros((1, SIZE, SIZE), np.float32), np.zeros((1, 6, 6), np.float32)]
    assert input_problem(two, [SIZE, 6]) is None
    assert "float32 (1, 6, 6)" in input_problem(two[:1] * 2, [SIZE, 6])
    assert "2 array(s), got 1" in input_problem(two[:1], [SIZE, 6])


def test_decode_workers_split_the_cores_between_http_workers():
    """Each of N workers gets max(1, cores // N) decode processes unless CXR_DECODE_WORKERS says otherwise."""
    assert [default_decode_workers(n, 16) for n in (1, 2, 3, 32)] == [16, 8, 5, 1]
    extra = worker_environment({}, Path("/s"), Path("/pack"), 4, 8)
    assert extra == {"CXR_INFERENCE_SOCKET": "/s", "CXR_MODELS": "/pack", "CXR_DECODE_WORKERS": "2"}
    assert "CXR_DECODE_WORKERS" not in worker_environment({"CXR_DECODE_WORKERS": "3"}, Path("/s"), Path("/p"), 4, 8)
    assert [restart_delay(n) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 30.0]


@pytest.fixture()
def socket_path():
    # Not tmp_path: a Unix socket path must stay under ~104 characters.
    with tempfile.TemporaryDirectory(prefix="cxr-test-", dir="/tmp") as folder:
        yield Path(folder) / "inference.sock"


def fake_outputs(images: np.ndarray) -> tuple[np.ndarray, ...]:
    """Stands in for OnnxModels.run: per-image outputs that identify the image they came from."""
    total = images.sum(axis=(1, 2, 3))
    return (
        total[:, None, None] * np.ones((1, 3, 4), np.float32),
        np.ones((len(images), 3, 2), np.float32),
        total[:, None],
    )


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_remote_batcher_gives_local_results_and_errors(socket_path):
    """Over the socket, submit() returns each image's own outputs, a full server queue raises Overloaded (429,
    Retry-After) and once the server has gone away, images are refused at once with NotReady (503, Retry-After)."""

    def slow_outputs(images):
        time.sleep(0.3)
        return fake_outputs(images)

    async def scenario():
        batcher = Batcher(slow_outputs, max_batch_size=1, max_delay_s=0.001, max_queue_size=1)
        state = ServingState(
            pack=FAKE_PACK,
            models=RemoteModels(socket=socket_path, providers=["FakeProvider"]),
            batcher=batcher,
            not_ready_reason="",
        )
        server = InferenceServer(state, Settings(max_batch_size=1))
        batcher.start()
        listener = await asyncio.get_running_loop().create_unix_server(server.protocol, path=str(socket_path))
        status: list[str] = []
        models = RemoteModels(socket=socket_path)
        remote = RemoteBatcher(
            socket_path, pack_identity(FAKE_PACK), models, lambda reason, _: status.append(reason), max_batch_size=1
        )
        remote.start()
        await until(lambda: status and status[-1] == "")
        assert models.providers == ["FakeProvider"]

        images = [np.full((1, SIZE, SIZE), value, np.float32) for value in (1.0, 2.0, 3.0)]
        first = asyncio.create_task(remote.submit(images[0]))
        await asyncio.sleep(0.1)  # the first is being inferred: the next fills the queue, the third overflows it
        second = asyncio.create_task(remote.submit(images[1]))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as overloaded:
            await remote.submit(images[2])
        assert overloaded.value.status_code == 429 and overloaded.value.headers["Retry-After"] == "1"
        for task, image in ((first, images[0]), (second, images[1])):
            result = await task
            expected = [output[0] for output in fake_outputs(image[None])]
            assert all(np.array_equal(a, b) for a, b in zip(result.outputs, expected))
            assert result.batch_size == 1 and result.inference_ms >= 250 and result.queue_ms >= 0

        listener.close()
        server.close_connections()  # the server goes away
        await until(lambda: status[-1] != "")
        with pytest.raises(NotReady) as refused:
            await remote.submit(images[0])
        assert refused.value.headers["Retry-After"] == "5" and "inference server" in refused.value.message
        await remote.stop()
        await batcher.stop()

    asyncio.run(scenario())


TWO_SIZE_PACK = ModelPack(
    path=Path("unused"),
    manifest={
        "name": "two-sizes",
        "version": "1",
        "detector": {
            "sha256": "d" * 64,
            "labels": ["a"],
            "input": {"size": SIZE, "normalization": {"mean": 0.5, "std": 0.25}},
        },
        "classifier": {
            "sha256": "c" * 64,
            "labels": ["b"],
            "input": {"size": 6, "normalization": {"mean": 0.5, "std": 0.25}},
        },
    },
)


def test_remote_batcher_sends_each_input_size_of_a_pack(socket_path):
    """A pack whose detector and classifier take different sizes: each image travels as one array per size, the
    server batches each size separately and the models get the right one (batch outputs identify both inputs)."""

    def two_input_outputs(detector_images: np.ndarray, classifier_images: np.ndarray) -> tuple[np.ndarray, ...]:
        assert detector_images.shape[1:] == (1, SIZE, SIZE) and classifier_images.shape[1:] == (1, 6, 6)
        return detector_images.sum(axis=(1, 2, 3))[:, None], classifier_images.sum(axis=(1, 2, 3))[:, None]

    async def scenario():
        batcher = Batcher(two_input_outputs, max_batch_size=4, max_delay_s=0.05, max_queue_size=8)
        state = ServingState(pack=TWO_SIZE_PACK, models=RemoteModels(socket=socket_path), batcher=batcher)
        state.not_ready_reason = ""
        server = InferenceServer(state, Settings(max_batch_size=4))
        assert server.sizes == [SIZE, 6]
        batcher.start()
        listener = await asyncio.get_running_loop().create_unix_server(server.protocol, path=str(socket_path))
        status: list[str] = []
        remote = RemoteBatcher(
            socket_path,
            pack_identity(TWO_SIZE_PACK),
            RemoteModels(socket=socket_path),
            lambda reason, _: status.append(reason),
            4,
        )
        remote.start()
        await until(lambda: status and status[-1] == "")
        images = [
            (np.full((1, SIZE, SIZE), value, np.float32), np.full((1, 6, 6), -value, np.float32)) for value in (1, 2, 3)
        ]
        results = await asyncio.gather(*(remote.submit(pair) for pair in images))
        for (detector_image, classifier_image), result in zip(images, results):
            assert (
                result.outputs[0].item() == detector_image.sum() and result.outputs[1].item() == classifier_image.sum()
            )
        assert max(result.batch_size for result in results) > 1  # batched together, each size stacked on its own
        await remote.stop()
        listener.close()
        server.close_connections()
        await batcher.stop()

    asyncio.run(scenario())


def test_remote_batcher_fails_queued_images_when_the_connection_drops(socket_path):
    """A server that dies mid-request (connection closed, no answer) fails the waiting image at once with NotReady."""

    async def die_after_one_request(reader, writer):
        await read_frame(reader, 1 << 20)  # hello
        writer.writelines(
            encode_frame(
                {
                    "op": "hello",
                    "protocol": PROTOCOL_VERSION,
                    "ready": True,
                    "providers": [],
                    "pack": pack_identity(FAKE_PACK),
                }
            )
        )
        await read_frame(reader, 1 << 20)  # the image, never answered
        writer.close()

    async def scenario():
        listener = await asyncio.start_unix_server(die_after_one_request, path=str(socket_path))
        status: list[tuple[str, str]] = []
        remote = RemoteBatcher(
            socket_path, pack_identity(FAKE_PACK), RemoteModels(socket=socket_path), lambda *s: status.append(s), 1
        )
        remote.start()
        await until(lambda: status and status[-1][0] == "")
        listener.close()
        started = time.monotonic()
        with pytest.raises(NotReady):
            await remote.submit(np.zeros((1, SIZE, SIZE), np.float32))
        assert time.monotonic() - started < 2
        await until(lambda: status[-1][0] == "inference_server_unavailable")
        assert "closed the connection" in status[-1][1] or "no inference server" in status[-1][1]
        await remote.stop()

    asyncio.run(scenario())


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc."""
    found, pending = set(), [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").glob("*"):
            try:
                children = {int(child) for child in (task / "children").read_text().split()}
            except FileNotFoundError:
                continue
            pending += list(children - found)
            found |= children
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are gone too
    except FileNotFoundError:
        return False


def inference_server_pid(launcher: int) -> int:
    for pid in descendants(launcher):
        try:
            if b"service.inference.server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except FileNotFoundError:
            continue
    pytest.fail("no inference server process under the launcher")


def assert_same_prediction(remote: dict, local: dict) -> None:
    assert [f["label"] for f in remote["findings"]] == [f["label"] for f in local["findings"]]
    for ours, theirs in zip(remote["findings"], local["findings"]):
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
        # Boxes are rounded to 0.01 px in the JSON: a 1e-6 difference may land on the other side of a rounding.
        assert ours["box"] == pytest.approx(theirs["box"], abs=0.011)
    assert [(d["label"], d["positive"]) for d in remote["diseases"]] == [
        (d["label"], d["positive"]) for d in local["diseases"]
    ]
    assert [d["probability"] for d in remote["diseases"]] == pytest.approx(
        [d["probability"] for d in local["diseases"]], abs=1e-5
    )


def test_two_workers_share_one_inference_server(tiny_pack, tiny_dataset, client, tmp_path):
    """`python -m service --workers 2` answers as the single-process service does; a killed inference server means
    /readyz 503 and prompt 503s (not a hang) until it is restarted; SIGTERM stops every process it started."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("CXR_")} | {
        "CXR_PROVIDERS": '["CPUExecutionProvider"]',
        "CXR_MAX_BATCH_SIZE": "4",
        "CXR_MAX_QUEUE_DELAY_MS": "2",
        "CXR_DECODE_WORKERS": "1",
        "CXR_MAX_BODY_BYTES": str(16 * 1024 * 1024),
    }
    log = (tmp_path / "server.log").open("w")
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--workers",
            "2",
            "--port",
            str(port),
            "--models",
            str(tiny_pack),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    dicom = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    headers = {"Content-Type": "application/dicom"}
    try:
        wait_until_ready(base, timeout_s=90)
        local = client.post("/v1/predict", content=dicom, headers=headers).json()
        for _ in range(4):  # new connections: more than one worker answers
            response = httpx.post(f"{base}/v1/predict", content=dicom, headers=headers, timeout=30)
            assert response.status_code == 200, response.text
            assert_same_prediction(response.json(), local)

        os.kill(inference_server_pid(launcher.pid), signal.SIGKILL)
        started = time.monotonic()
        response = httpx.post(f"{base}/v1/predict", content=dicom, headers=headers, timeout=30)
        assert response.status_code == 503 and response.headers["Retry-After"] == "5", response.text
        assert time.monotonic() - started < 10
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["reason"] == "inference_server_unavailable"

        wait_until_ready(base, timeout_s=60)  # restarted by the launcher; the workers reconnect on their own
        assert httpx.post(f"{base}/v1/predict", content=dicom, headers=headers, timeout=30).status_code == 200

        started_processes = descendants(launcher.pid)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(running(pid) for pid in started_processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started_processes if running(pid)]
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
        print((tmp_path / "server.log").read_text()[-5000:])
