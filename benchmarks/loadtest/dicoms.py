"""The DICOMs a load test sends: a folder of the tester's own (de-identified) files, or generated phantoms.

A folder is searched recursively for DICOM Part 10 files (the `DICM` marker after the 128-byte preamble),
whatever their names; DICOMDIR index files are skipped. Without a folder, phantoms are generated once
into the benchmarks' input cache (`benchmarks/.bench-inputs/`) with `training.synthetic`, which needs
only the service's own dependencies (numpy, pydicom, Pillow and the pylibjpeg encoders), not the
training extras.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from benchmarks import inputs
from benchmarks.inputs import InputSet, make_input_set

INPUTS_ENV = "CXR_LOADTEST_INPUTS"  # the folder the locust processes read (set by the command)
PRELOAD_LIMIT_BYTES = 1 << 30  # above this the files are read from disk per request instead of held in memory

# 16 distinct phantoms of the VinDr-PCXR paper's median size, in the generator's default mix of encodings
# (uncompressed explicit/implicit VR and RLE; 8/12/16 bits; MONOCHROME1 and 2), as a PACS sends them.
PHANTOMS = InputSet(
    "loadtest",
    transfer_syntax=None,
    description="the generator's default mix of encodings",
    bits_stored=None,
    photometric=None,
    first_seed=2000,
)


def phantom_set(count: int = PHANTOMS.count, rows: int = PHANTOMS.rows, cols: int = PHANTOMS.cols) -> InputSet:
    return dataclasses.replace(PHANTOMS, count=count, rows=rows, cols=cols)


def make_phantoms(spec: InputSet, cache: Path | None = None) -> Path:
    """The folder holding the set's phantoms, generating the missing ones (in the benchmarks' input cache)."""
    return make_input_set(spec, cache or inputs.CACHE)[0].parent


def is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM Part 10 file under `folder`, sorted by path (so every generator process sees the same order)."""
    candidates = sorted(path for path in folder.rglob("*") if path.is_file() and path.name.upper() != "DICOMDIR")
    return [path for path in candidates if is_dicom_file(path)]


@dataclass
class Inputs:
    """The files and, when they fit in PRELOAD_LIMIT_BYTES together, their bytes (read once)."""

    paths: list[Path]
    bodies: list[bytes] | None

    @classmethod
    def load(cls, folder: Path) -> Inputs:
        paths = dicom_files(folder)
        if not paths:
            raise FileNotFoundError(f"no DICOM Part 10 file (with the DICM marker) under {folder}")
        total = sum(path.stat().st_size for path in paths)
        return cls(paths, [path.read_bytes() for path in paths] if total <= PRELOAD_LIMIT_BYTES else None)

    def __len__(self) -> int:
        return len(self.paths)

    def body(self, index: int) -> bytes:
        index %= len(self.paths)
        return self.bodies[index] if self.bodies is not None else self.paths[index].read_bytes()


def inputs_folder_from_environ() -> Path:
    """The folder the command chose; the default phantoms (generated if missing) when run by hand."""
    folder = os.environ.get(INPUTS_ENV)
    return Path(folder) if folder else make_phantoms(PHANTOMS)
