"""python -m training.synthetic: write a phantom dataset (README.md)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from training.synthetic.dataset import generate_dataset
from training.synthetic.difficulty import DIFFICULTIES
from training.synthetic.encoding import TRANSFER_SYNTAXES
from training.synthetic.instance import DISCLAIMER


def _parse_size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like ROWSxCOLS, not {text!r}") from None
    if rows < 64 or cols < 64:
        raise argparse.ArgumentTypeError("size must be at least 64x64")
    return rows, cols


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description=f"Write a synthetic VinDr-PCXR-layout phantom dataset ({DISCLAIMER}).",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument(
        "--n-validation",
        type=int,
        default=0,
        help="also write a validation split (validation/, annotations_validation.csv, image_labels_validation.csv)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default="default")
    p.add_argument(
        "--size",
        type=_parse_size,
        default=None,
        help="force ROWSxCOLS (default: drawn around the paper's median 1643x1349)",
    )
    p.add_argument(
        "--transfer-syntax",
        default=None,
        help=f"force one of {sorted(TRANSFER_SYNTAXES)} (or its UID); default: a mix of explicit, implicit and rle",
    )
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    generate_dataset(
        args.out,
        args.n_train,
        args.n_test,
        args.seed,
        n_validation=args.n_validation,
        difficulty=args.difficulty,
        size=args.size,
        transfer_syntax=args.transfer_syntax,
        workers=args.workers,
    )
