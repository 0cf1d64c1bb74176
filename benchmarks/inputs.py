"""The benchmark's inputs: sets of distinct 1,643 x 1,349 phantom DICOMs, made once into a cache folder.

Every set holds the same images (same seeds) in a different transfer syntax, so the sets differ only
in how the pixels are encoded. Files are regenerated only when missing; the folder name carries every
parameter, so changing one never reuses stale files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".bench-inputs"  # git-ignored


@dataclass(frozen=True)
class InputSet:
    name: str  # used in file names, tables and plots
    transfer_syntax: str | None  # a training.synthetic.CODECS name; None: the generator's random default mix
    description: str
    count: int = 16
    rows: int = 1643  # the VinDr-PCXR paper's median size
    cols: int = 1349
    bits_stored: int | None = 16  # None: drawn per image
    first_seed: int = 1000
    photometric: str | None = "MONOCHROME2"  # None: drawn per image

    @property
    def folder_name(self) -> str:
        # MONOCHROME2 is implied (the names of the sets made before the field existed stay valid).
        photometric = "" if self.photometric == "MONOCHROME2" else f"-{self.photometric or 'mixed-photometric'}"
        return (
            f"{self.name}-{self.transfer_syntax or 'mixed'}-{self.rows}x{self.cols}-{self.bits_stored or 'mixed-'}bit"
            f"{photometric}-seed{self.first_seed}-n{self.count}"
        )


INPUT_SETS = (
    InputSet("uncompressed", "explicit", "Explicit VR Little Endian, 16-bit, uncompressed"),
    InputSet("j2k", "j2k", "JPEG 2000 lossless, 16-bit"),
)


def input_set(name: str) -> InputSet:
    return next(spec for spec in INPUT_SETS if spec.name == name)


def make_input_set(spec: InputSet, cache: Path = CACHE) -> list[Path]:
    """The set's files, generating the missing ones (deterministic: seed first_seed + index)."""
    from training.synthetic import (  # only needed when generating
        dicom_bytes,
        synthesize_instance,
    )

    folder = cache / spec.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:04d}.dcm" for index in range(spec.count)]
    for index, path in enumerate(paths):
        if path.is_file():
            continue
        ds, _ = synthesize_instance(
            seed=spec.first_seed + index,
            rows=spec.rows,
            cols=spec.cols,
            difficulty="easy",
            transfer_syntax=spec.transfer_syntax,
            bits_stored=spec.bits_stored,
            photometric=spec.photometric,
        )
        partial = path.with_suffix(f".{os.getpid()}.part")  # per process: two generating the same set never collide
        partial.write_bytes(dicom_bytes(ds))
        partial.rename(path)  # a run killed mid-write never leaves a truncated input behind
    return paths


def read_bodies(paths: list[Path]) -> list[bytes]:
    return [path.read_bytes() for path in paths]
