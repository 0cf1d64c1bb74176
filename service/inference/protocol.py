"""The wire format between HTTP workers and the shared inference server (service/inference/server.py).

One frame, in either direction:

    u32 header length | u32 payload length | header: UTF-8 JSON object | payload: raw array bytes

The header's "arrays" list describes the payload, in order: [{"dtype": "float32", "shape": [1, S, S]}, ...];
each array's bytes are C-ordered and little-endian. Nothing is ever unpickled: a peer can only send JSON and
numbers of an allowed dtype, and both lengths are bounded before anything is read.

Requests: {"op": "hello"} (readiness and the pack being served) and {"op": "infer", "id": n} with one
image: a 1 x S x S float32 array per input of the pack (one when detector and classifier share an input
size, else the detector's then the classifier's). Answers to "infer" carry the same id (several are in
flight on one connection and come back in completion order): {"id": n, "ok": true, "queue_ms",
"inference_ms", "batch_size"} with that image's raw model outputs (boxes, scores, probabilities), or
{"id": n, "ok": false, "code", "message", "retry_after"}.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # this module stays light: the launcher imports it, and must not load ONNX Runtime
    from service.inference.modelpack import ModelPack

PROTOCOL_VERSION = 2  # 2: one array per input size of the pack in "infer" frames
PREFIX = struct.Struct("<II")
MAX_HEADER_BYTES = 64 * 1024
# Model outputs are a few KiB per image; the only large payload is an input image, bounded by its size.
MAX_RESPONSE_PAYLOAD_BYTES = 64 * 1024 * 1024
# asyncio streams stop reading from the socket whenever 2 x limit bytes wait in their buffer (64 KiB by
# default); the client reads its (small) answers through one, with this limit, and asks for this much
# kernel send buffer so that an image leaves in one send() (capped by net.core.wmem_max).
STREAM_LIMIT = 8 * 1024 * 1024
# What ONNX models of a pack can produce (fp16 packs may answer in float16); anything else is refused.
ALLOWED_DTYPES = frozenset({"float32", "float16", "float64", "int64", "int32", "uint8", "bool"})


def pack_identity(pack: ModelPack) -> dict:
    """What server and worker compare in "hello": the worker postprocesses with its own copy of the pack."""
    return {
        "name": pack.name,
        "version": pack.version,
        "input_sizes": [spec.size for spec in pack.input_specs],
        "detector_sha256": pack.manifest["detector"]["sha256"],
        "classifier_sha256": pack.manifest["classifier"]["sha256"],
    }


class ProtocolError(ValueError):
    """A frame that does not follow the format: the connection is closed, never guessed at."""


def encode_frame(header: dict, arrays: Sequence[np.ndarray] = ()) -> list[bytes | memoryview]:
    """Buffers to write, in order, for one frame; array bytes are not copied into a joined message."""
    wire = [little_endian(np.asarray(array, order="C")) for array in arrays]
    for array in wire:
        if array.dtype.name not in ALLOWED_DTYPES:
            raise ProtocolError(f"dtype {array.dtype.name} cannot be sent")
    described = header | {"arrays": [{"dtype": array.dtype.name, "shape": list(array.shape)} for array in wire]}
    header_bytes = json.dumps(described, separators=(",", ":")).encode()
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    payload = [memoryview(array.reshape(-1).view(np.uint8)) for array in wire]
    return [PREFIX.pack(len(header_bytes), sum(len(part) for part in payload)), header_bytes, *payload]


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array with little-endian bytes (a no-op on x86 and ARM hosts), so both peers agree on the layout."""
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not np.little_endian):
        return array.astype(array.dtype.newbyteorder("<"), order="C")
    return array


def parse_prefix(prefix: bytes, max_payload_bytes: int) -> tuple[int, int]:
    """(header length, payload length) from the 8-byte prefix, refusing sizes over the limits before reading."""
    header_length, payload_length = PREFIX.unpack(prefix)
    if not 0 < header_length <= MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {header_length} is outside 1..{MAX_HEADER_BYTES}")
    if payload_length > max_payload_bytes:
        raise ProtocolError(f"payload of {payload_length} bytes exceeds {max_payload_bytes}")
    return header_length, payload_length


def decode_body(header_bytes: bytes, payload: bytes) -> tuple[dict, list[np.ndarray]]:
    """The header object and the arrays it describes; every size is checked against the payload's length."""
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    arrays: list[np.ndarray] = []
    offset = 0
    for spec in header.pop("arrays", []):
        dtype, shape = array_spec(spec)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(payload):
            raise ProtocolError("payload is shorter than the arrays its header describes")
        # A read-only view of the received bytes, not a copy: the image is copied once anyway, into the batch.
        arrays.append(np.frombuffer(payload, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(shape))
        offset += size
    if offset != len(payload):
        raise ProtocolError("payload is longer than the arrays its header describes")
    return header, arrays


def array_spec(spec: object) -> tuple[np.dtype, tuple[int, ...]]:
    if not isinstance(spec, dict) or spec.get("dtype") not in ALLOWED_DTYPES:
        raise ProtocolError(f"array description {spec!r} has no allowed dtype")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and 0 <= n < 2**31 for n in shape):
        raise ProtocolError(f"array shape {shape!r} is not a list of sizes")
    return np.dtype(spec["dtype"]).newbyteorder("<"), tuple(shape)


async def read_frame(reader: asyncio.StreamReader, max_payload_bytes: int) -> tuple[dict, list[np.ndarray]]:
    """The next frame from a stream; asyncio.IncompleteReadError when the peer closed the connection."""
    header_length, payload_length = parse_prefix(await reader.readexactly(PREFIX.size), max_payload_bytes)
    header_bytes = await reader.readexactly(header_length)
    payload = await reader.readexactly(payload_length) if payload_length else b""
    return decode_body(header_bytes, payload)


class FrameReceiver(asyncio.BufferedProtocol):
    """Receives frames straight into one buffer per part (prefix, header, payload) as the socket delivers them.

    asyncio's StreamReader copies a large payload several times on its way (chunks, its growing buffer, the
    slice it returns): a 4 MiB image (1024²) took ~15 ms through it on the development machine, ~1.5 ms here.
    Subclasses implement frame_received(); a frame that breaks the format closes the connection.
    """

    def __init__(self, max_payload_bytes: int) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.transport: asyncio.Transport | None = None
        self._start_frame()

    def _start_frame(self) -> None:
        self._stage = "prefix"
        self._part = bytearray(PREFIX.size)
        self._filled = 0
        self._header_bytes = b""
        self._payload_length = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._part)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._part):
            return
        try:
            self._part_complete()
        except ProtocolError as exc:
            self.protocol_error(exc)
            self.transport.close()

    def _part_complete(self) -> None:
        if self._stage == "prefix":
            header_length, self._payload_length = parse_prefix(bytes(self._part), self.max_payload_bytes)
            self._stage, self._part, self._filled = "header", bytearray(header_length), 0
            return
        if self._stage == "header" and self._payload_length:
            self._header_bytes = bytes(self._part)
            self._stage, self._part, self._filled = "payload", bytearray(self._payload_length), 0
            return
        header_bytes, payload = (
            (bytes(self._part), b"") if self._stage == "header" else (self._header_bytes, self._part)
        )
        self._start_frame()
        header, arrays = decode_body(header_bytes, payload)
        self.frame_received(header, arrays)

    def frame_received(self, header: dict, arrays: list[np.ndarray]) -> None:
        raise NotImplementedError

    def protocol_error(self, error: ProtocolError) -> None:
        """Called before the connection is closed for `error`."""

    def send(self, header: dict, arrays: Sequence[np.ndarray] = ()) -> None:
        """Write one frame; nothing when the peer has gone (nobody is waiting for it)."""
        if self.transport is None or self.transport.is_closing():
            return
        for buffer in encode_frame(header, arrays):
            self.transport.write(buffer)


def probe(socket_path: Path, timeout_s: float = 2.0) -> dict | None:
    """The server's hello answer, or None when nothing answers at socket_path.

    Blocking, and importing nothing heavy: the launcher waits with it without loading ONNX Runtime itself.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout_s)
            connection.connect(str(socket_path))
            connection.sendall(b"".join(encode_frame({"op": "hello"})))
            header_length, payload_length = parse_prefix(
                receive_exactly(connection, PREFIX.size), MAX_RESPONSE_PAYLOAD_BYTES
            )
            body = receive_exactly(connection, header_length + payload_length)
            hello, _ = decode_body(body[:header_length], body[header_length:])
            return hello
    except (OSError, EOFError, ProtocolError):
        return None


def receive_exactly(connection: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = connection.recv(remaining)
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
