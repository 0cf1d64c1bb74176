"""Which decodes run in threads and which in worker processes (service.dicom.decode_pool.DecodePool.route)."""

from __future__ import annotations

import pytest

from service.dicom.decode import NATIVE_TRANSFER_SYNTAXES, peek_transfer_syntax
from service.dicom.decode_pool import DecodePool
from training import synthetic as S


@pytest.fixture(scope="module")
def small_files() -> dict[str, bytes]:
    files = {}
    for name in S.TRANSFER_SYNTAXES:
        if S.can_encode(name):
            ds, _ = S.synthesize_instance(seed=5, rows=64, cols=48, transfer_syntax=name)
            files[name] = S.dicom_bytes(ds)
    return files


def test_peek_reads_the_transfer_syntax_of_every_encoding(small_files):
    assert len(small_files) >= 10
    for name, body in small_files.items():
        assert peek_transfer_syntax(body) == S.TRANSFER_SYNTAXES[name], name


@pytest.mark.parametrize(
    "body",
    [b"", b"not dicom at all" * 20, b"\0" * 128 + b"DICM", b"\0" * 128 + b"DICM" + b"\x08\x00\x10\x00UI\x04\x001.2\0"],
)
def test_peek_gives_none_without_a_readable_meta_header(body):
    assert peek_transfer_syntax(body) is None


def test_peek_stops_at_a_truncated_meta_header(small_files):
    body = small_files["explicit"]
    assert peek_transfer_syntax(body[:140]) is None


def test_uncompressed_goes_to_threads_and_codecs_to_processes(small_files):
    pool = DecodePool(workers=1, timeout_s=5, max_waiting=4)
    try:
        routes = {name: pool.route(body) for name, body in small_files.items()}
        assert pool.route(b"garbage") == "process"  # the full parser in a worker says what is wrong
    finally:
        pool.close()
    for name, route in routes.items():
        expected = "thread" if S.TRANSFER_SYNTAXES[name] in NATIVE_TRANSFER_SYNTAXES else "process"
        assert route == expected, name
    assert "thread" in routes.values() and "process" in routes.values()


def test_threads_can_be_turned_off(small_files):
    pool = DecodePool(workers=1, timeout_s=5, max_waiting=4, native_in_threads=False)
    try:
        assert pool.route(small_files["explicit"]) == "process"
    finally:
        pool.close()
