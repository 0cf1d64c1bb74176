"""Synthetic pediatric chest X-ray phantoms written in the exact VinDr-PCXR layout.

SYNTHETIC PHANTOM - NOT CLINICAL DATA. The real datasets need credentialed access, so tests, the demo
model pack and the benchmarks run on these phantoms instead. The generative model, the layout and the
difficulty presets are described in README.md beside this file; `python -m training.synthetic --help`
lists the options. The names below are the package's public API; the modules hold the stages.
"""

from training.synthetic.cli import get_args_parser, main
from training.synthetic.dataset import generate_dataset
from training.synthetic.difficulty import DIFFICULTIES, Difficulty, resolve_difficulty
from training.synthetic.encoding import (
    CODECS,
    TRANSFER_SYNTAXES,
    Codec,
    PixelEncoding,
    can_encode,
    choose_encoding,
    codec_for,
    dicom_bytes,
    encode_dataset,
    encode_pixels,
    jpeg_ls_near,
)
from training.synthetic.instance import DISCLAIMER, image_id_for, synthesize_instance
from training.synthetic.phantom import Finding, PhantomCase, render_case

__all__ = [
    "CODECS",
    "DIFFICULTIES",
    "DISCLAIMER",
    "TRANSFER_SYNTAXES",
    "Codec",
    "Difficulty",
    "Finding",
    "PhantomCase",
    "PixelEncoding",
    "can_encode",
    "choose_encoding",
    "codec_for",
    "dicom_bytes",
    "encode_dataset",
    "encode_pixels",
    "generate_dataset",
    "get_args_parser",
    "image_id_for",
    "jpeg_ls_near",
    "main",
    "render_case",
    "resolve_difficulty",
    "synthesize_instance",
]
