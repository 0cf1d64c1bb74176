"""The node's spool folder: received instances and rendered results, written durably, within a byte budget.

Layout (every name is a random job id in hex or a result kind, never a DICOM value, so nothing a
sender controls can steer a path):

    <spool>/jobs.sqlite3            the job database (service.dicom_node.jobs)
    <spool>/instances/<job>.dcm     a received instance, as received (Part 10)
    <spool>/results/<job>/<kind>.dcm  its rendered results (sr, gsps, sc)
    <spool>/tmp/                    files being written; emptied at start-up

A file is durable when its bytes and its directory entry are on disk: it is written under tmp/,
fsync'd, renamed into place, and the target directory is fsync'd (POSIX rename is atomic, but only
the directory's fsync makes the new name survive a power cut).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
from pathlib import Path

from service.settings import ResultKind

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
RESULT_KINDS: tuple[ResultKind, ...] = ("sr", "gsps", "sc", "seg")


class SpoolFull(Exception):
    """Accepting the instance would take the spool over its byte budget."""


def new_job_id() -> str:
    return secrets.token_hex(16)


def fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    """Files of the node's jobs under one root, and the bytes they hold against `max_bytes`."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root.expanduser().resolve()
        self.max_bytes = max_bytes
        self.instances = self.root / "instances"
        self.results = self.root / "results"
        self.tmp = self.root / "tmp"
        for folder in (self.root, self.instances, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Leftovers of writes a crash interrupted: never acknowledged, so nobody is waiting for them.
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._used = 0  # bytes of files plus reservations of writes in progress

    @property
    def database(self) -> Path:
        return self.root / "jobs.sqlite3"

    @property
    def used_bytes(self) -> int:
        return self._used

    def account(self, stored_bytes: int) -> None:
        """Count files already in the spool (at start-up, from the job database)."""
        with self._lock:
            self._used += stored_bytes

    def reserve(self, size: int) -> None:
        """Claim `size` bytes of the budget before writing them; SpoolFull when they do not fit."""
        with self._lock:
            if self._used + size > self.max_bytes:
                raise SpoolFull(f"spool holds {self._used} of {self.max_bytes} bytes; {size} more do not fit")
            self._used += size

    def release(self, size: int) -> None:
        with self._lock:
            self._used = max(0, self._used - size)

    def instance_path(self, job_id: str) -> Path:
        return self.instances / f"{_checked(job_id)}.dcm"

    def result_path(self, job_id: str, kind: str) -> Path:
        if kind not in RESULT_KINDS:
            raise ValueError(f"unknown result kind {kind!r}")
        return self.results / _checked(job_id) / f"{kind}.dcm"

    def write(self, target: Path, data: bytes) -> None:
        """Write `data` to `target` (a path of this spool) so that it survives a crash once this returns."""
        if not target.is_relative_to(self.root) or target.parent == self.tmp:
            raise ValueError("spool writes stay inside the spool's own folders")
        target.parent.mkdir(exist_ok=True, mode=0o700)
        temporary = self.tmp / f"{secrets.token_hex(8)}.part"
        try:
            with temporary.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_directory(target.parent)

    def read_instance(self, job_id: str) -> bytes:
        return self.instance_path(job_id).read_bytes()

    def read_result(self, job_id: str, kind: str) -> bytes:
        return self.result_path(job_id, kind).read_bytes()

    def purge(self, job_id: str) -> None:
        """Delete a job's instance and results (its bytes are released by the caller, from the job row)."""
        self.instance_path(job_id).unlink(missing_ok=True)
        shutil.rmtree(self.results / _checked(job_id), ignore_errors=True)


def _checked(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise ValueError("job ids are 32 lowercase hex digits")
    return job_id
