"""Host memory of training does not grow with the dataset: one epoch on 500 and on 4,000 phantoms at 512².

    nice -n 10 .venv/bin/python -m benchmarks.training_memory --phantom-size 1024x840   (~35 min on a 2-core CPU)
    .venv/bin/python -m benchmarks.training_memory --sizes 40 80 --input-size 128 --quick   (a smoke run)

Generates the phantoms once (training.synthetic, default size spread around the VinDr-PCXR median), then runs
`python -m training.train --limit N --epochs 1 --input-size 512` for each N as a child process (the cpu-demo
recipe: MobileNetV3 models, augmentation, DataLoader workers decoding each DICOM on demand, no cache) and samples
the memory of its whole process tree (the trainer and its DataLoader workers) every half second: RSS summed over
the processes, and PSS (shared pages split among the processes that map them, so it adds up to what the tree
really occupies). Target: the peak for 4,000 images within 15% of the peak for 500.

Writes benchmarks/results/training_memory.json and .md, with the machine and the commit that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import ROOT, cpu_model, git_commit, load_average, memory_total_gib
from benchmarks.sampling import TreeSampler

TARGET_RATIO = 1.15


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 4000], help="training images per run")
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the training runs")
    parser.add_argument("--data", type=Path, default=None, help="phantom dataset to reuse (default: generated)")
    parser.add_argument("--phantom-size", default=None, help="ROWSxCOLS of generated phantoms (default: varied)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_memory.json")
    parser.add_argument("--quick", action="store_true", help="a smoke run: results go to a temporary folder")
    return parser


def generate(data: Path, count: int, phantom_size: str | None) -> None:
    """The phantoms of the largest run (smaller runs use its first images: train --limit)."""
    command = [sys.executable, "-m", "training.synthetic", "--out", str(data), "--n-train", str(count)]
    command += ["--n-test", "0", "--seed", "0", "--workers", "2"]
    if phantom_size:
        command += ["--size", phantom_size]
    subprocess.run(command, cwd=ROOT, check=True)


def train_once(data: Path, out: Path, images: int, args: argparse.Namespace) -> dict:
    """One epoch on the first `images` training images; the tree's memory peak and the training rate."""
    # 2% validation keeps rank 0's validation pass (also streamed) short beside the epoch being measured.
    command = [sys.executable, "-m", "training.train", "--data", str(data), "--out", str(out)]
    command += ["--limit", str(images), "--epochs", "1", "--input-size", str(args.input_size)]
    command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--val-fraction", "0.02"]
    command += ["--min-examples", "1", "--seed", "0"]
    started = time.perf_counter()
    with (out.parent / f"train-{images}.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(process.pid, interval_s=0.5, memory_every=1)
        sampler.start()
        returncode = process.wait()
        sampler.stop()
    if returncode != 0:
        raise SystemExit(f"training on {images} images failed (exit {returncode}); see {out.parent}/train-{images}.log")
    epoch = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    samples = [s for s in sampler.samples if s.processes]
    peak_rss = max(samples, key=lambda s: s.rss_kib)
    peak_pss = max(samples, key=lambda s: s.pss_kib)
    return {
        "images": images,
        "train_images": epoch["train"]["images"],
        "peak_rss_mib": round(peak_rss.rss_kib / 1024, 1),
        "peak_pss_mib": round(peak_pss.pss_kib / 1024, 1),
        "processes_at_peak_rss": peak_rss.processes,
        "train_seconds": epoch["train"]["seconds"],
        "images_per_s": epoch["train"]["images_per_s"],
        "epoch_seconds_with_validation": epoch["seconds"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "samples": len(samples),
    }


def summary_markdown(result: dict) -> str:
    lines = [
        "# Training memory over dataset size",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['memory_gib']:.1f} GiB; load average at start {result['machine']['load_at_start']}, "
        f"at end {result['machine']['load_at_end']}; niceness {result['machine']['niceness']}, "
        f"OMP_NUM_THREADS={result['machine']['omp_num_threads']}",
        "",
        f"One epoch of `python -m training.train` (cpu-demo recipe, {result['input_size']}² inputs, batch "
        f"{result['batch_size']}, {result['workers']} DataLoader workers decoding each DICOM on demand, no cache). "
        "Peak memory of the trainer's whole process tree, sampled every 0.5 s.",
        "",
        "| training images | peak RSS (MiB, summed) | peak PSS (MiB) | images/s | epoch (s) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {run['train_images']} | {run['peak_rss_mib']:.0f} | {run['peak_pss_mib']:.0f} | "
        f"{run['images_per_s']:.2f} | {run['train_seconds']:.0f} |"
        for run in result["runs"]
    ]
    verdict = "met" if result["met"] else "NOT met"
    lines += [
        "",
        f"Largest over smallest peak: RSS {result['rss_ratio']:.3f}, PSS {result['pss_ratio']:.3f} "
        f"(target: at most {TARGET_RATIO:.2f}; {verdict}).",
    ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix="training-memory-")) / "training_memory.json" if args.quick else args.out
    load_at_start = load_average()
    with tempfile.TemporaryDirectory(prefix="training-memory-") as scratch:
        work = Path(scratch)
        data = args.data or work / "phantoms"
        if args.data is None:
            generate(data, max(args.sizes), args.phantom_size)
        runs = [train_once(data, work / f"run-{n}", n, args) for n in sorted(args.sizes)]
    rss_ratio = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    pss_ratio = runs[-1]["peak_pss_mib"] / runs[0]["peak_pss_mib"]
    result = {
        "command": " ".join(["python -m benchmarks.training_memory", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": {
            "cpu": cpu_model(Path("/proc/cpuinfo").read_text()),
            "cores": os.cpu_count(),
            "memory_gib": memory_total_gib(Path("/proc/meminfo").read_text()),
            "load_at_start": load_at_start,
            "load_at_end": load_average(),
            # What the runs were given: intra-op threads and scheduling priority change the rate, not the memory.
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "niceness": os.nice(0),
        },
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "runs": runs,
        "rss_ratio": round(rss_ratio, 3),
        "pss_ratio": round(pss_ratio, 3),
        "target_ratio": TARGET_RATIO,
        "met": rss_ratio <= TARGET_RATIO,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(summary_markdown(result))
    print(summary_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
