"""An optional on-disk cache of preprocessed model inputs, so each DICOM is decoded once instead of every epoch.

    python -m training.train ... --cache data/cache      (also training.evaluate --cache, for its baseline)

Layout: one folder per input spec, one file per image:

    CACHE/<size>px-<key>/spec.json          what the folder holds (size, normalisation, dtype, preprocessing digest)
    CACHE/<size>px-<key>/<image_id>.npz     "input": S x S model input; "meta": rows, columns, file size, mtime

An entry is exactly `service.dicom.pipeline.prepare(...).inputs` (the service's own preprocessing), stored as
float16 by default (2 bytes a pixel: 0.5 MB at 512², 2 MB at 1024²; float16 keeps 11 significant bits, an error
under 1e-3 on the normalised input, finer than the 8-bit steps most radiographs are windowed to) or float32.
Nothing is held in memory: the training dataset reads one file per image as it needs it.

Invalidation: <key> is a digest of the size, the normalisation, the dtype and the source of the service's
decode/preprocess/pipeline modules, so another input spec or a change to the preprocessing code gets a fresh
folder (the old one can be deleted). Each entry records its DICOM file's size and modification time; an entry
whose file changed since is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import service.dicom.decode
import service.dicom.pipeline
import service.dicom.preprocess
from service.dicom.pipeline import InputSpec, prepare
from service.dicom.preprocess import Letterbox

CACHE_DTYPES = ("float16", "float32")
# The code whose output an entry is: a change to any of these files makes every cached input stale.
PREPROCESSING_SOURCES = (service.dicom.decode, service.dicom.preprocess, service.dicom.pipeline)


@functools.cache
def preprocessing_digest() -> str:
    digest = hashlib.sha256()
    for module in PREPROCESSING_SOURCES:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One cached input, as `prepare` would return it for that spec (float32 again)."""

    input: np.ndarray  # 1 x S x S float32
    geometry: Letterbox


def _file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class PreprocessedCache:
    root: Path
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype {self.dtype!r}; choose one of {CACHE_DTYPES}")

    def folder(self, spec: InputSpec) -> Path:
        description = self.describe(spec)
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
        return Path(self.root) / f"{spec.size}px-{key}"

    def describe(self, spec: InputSpec) -> dict:
        return {
            "size": spec.size,
            "normalization": {"mean": spec.normalization.mean, "std": spec.normalization.std},
            "dtype": self.dtype,
            "preprocessing_sha256": preprocessing_digest(),
        }

    def path(self, spec: InputSpec, image_id: str) -> Path:
        return self.folder(spec) / f"{image_id}.npz"

    def load(self, spec: InputSpec, image_id: str, source: Path) -> Entry | None:
        """The cached input of `image_id`, or None when it is missing, unreadable or older than its DICOM file."""
        try:
            with np.load(self.path(spec, image_id)) as stored:
                rows, columns, size, mtime = (int(v) for v in stored["meta"])
                if (size, mtime) != _file_stamp(source):
                    return None
                tensor = stored["input"]
        except (OSError, KeyError, ValueError):
            return None
        if tensor.shape != (spec.size, spec.size):
            return None
        return Entry(tensor.astype(np.float32)[np.newaxis], Letterbox(rows, columns, spec.size))

    def has(self, spec: InputSpec, image_id: str, source: Path) -> bool:
        """Whether a current entry exists (reads only its metadata, not the image)."""
        try:
            with np.load(self.path(spec, image_id)) as stored:
                return tuple(int(v) for v in stored["meta"][2:]) == _file_stamp(source)
        except (OSError, KeyError, ValueError):
            return False

    def store(self, spec: InputSpec, image_id: str, source: Path, tensor: np.ndarray, geometry: Letterbox) -> Entry:
        """Write one entry atomically (a temporary file renamed into place: readers never see half a file).

        Returns it as `load` will: in the cache's dtype, so a result does not depend on whether it was cached yet.
        """
        folder = self.folder(spec)
        folder.mkdir(parents=True, exist_ok=True)
        description = folder / "spec.json"
        if not description.exists():
            description.write_text(json.dumps(self.describe(spec), indent=2) + "\n")
        meta = np.array([geometry.rows, geometry.columns, *_file_stamp(source)], dtype=np.int64)
        stored = np.asarray(tensor, dtype=self.dtype).reshape(spec.size, spec.size)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
        with os.fdopen(handle, "wb") as file:
            np.savez(file, input=stored, meta=meta)
        Path(temporary).replace(self.path(spec, image_id))
        return Entry(stored.astype(np.float32)[np.newaxis], geometry)

    def missing(self, specs: tuple[InputSpec, ...], items: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
        """The (image_id, path) items that lack a valid entry for some spec."""
        return [item for item in items if not all(self.has(spec, *item) for spec in specs)]

    def build(
        self, specs: tuple[InputSpec, ...], items: list[tuple[str, Path]], workers: int = 1, description: str = "cache"
    ) -> int:
        """Decode every item that lacks an entry (once, for all specs) and store it; returns how many were built."""
        todo = self.missing(specs, items)
        if not todo:
            return 0
        jobs = [(self, specs, image_id, path) for image_id, path in todo]
        with tqdm(total=len(jobs), desc=f"{description} ({len(items) - len(todo)} of {len(items)} cached)") as bar:
            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    for _ in pool.map(_build_one, jobs, chunksize=4):
                        bar.update()
            else:
                for job in jobs:
                    _build_one(job)
                    bar.update()
        return len(todo)


def _build_one(job: tuple[PreprocessedCache, tuple[InputSpec, ...], str, Path]) -> None:
    cache, specs, image_id, path = job
    prepared = prepare(path.read_bytes(), specs)
    for spec, tensor, geometry in zip(specs, prepared.inputs, prepared.geometries):
        cache.store(spec, image_id, path, tensor, geometry)
