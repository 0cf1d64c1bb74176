"""Soak run: the real server under locust for a while, mixed inputs, above the batcher's capacity.

    python -m benchmarks.soak --minutes 10 --users 48

Starts `python -m service` with the demo pack (small queue, so load is shed with 429), makes the
input files, runs locust headless (CSV kept under benchmarks/results/soak/), samples the resident
memory of the server and its decode workers every few seconds, and writes
benchmarks/results/reliability.md with the outcome: unexpected errors, answers by status, and memory
growth after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.machine import git_commit, load_average
from benchmarks.procfs import process_tree_rss_kib
from benchmarks.servers import free_port
from training.synthetic import dicom_bytes, synthesize_instance

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def make_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    variants = {
        "explicit.dcm": {"transfer_syntax": "explicit"},
        "rle.dcm": {"transfer_syntax": "rle"},
        "j2k.dcm": {"transfer_syntax": "j2k"},
        "monochrome1.dcm": {"photometric": "MONOCHROME1"},
    }
    for index, (name, options) in enumerate(variants.items()):
        ds, _ = synthesize_instance(seed=100 + index, rows=1643, cols=1349, difficulty="easy", **options)
        (folder / name).write_bytes(dicom_bytes(ds))
    explicit = (folder / "explicit.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(explicit[: len(explicit) // 3])
    colour, _ = synthesize_instance(seed=120, rows=64, cols=64)
    colour.PhotometricInterpretation, colour.SamplesPerPixel = "RGB", 3
    (folder / "colour.dcm").write_bytes(dicom_bytes(colour))
    parts = [(folder / "rle.dcm").read_bytes(), b"broken instance" * 30, explicit]
    body = b"".join(b"--soak-boundary\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    (folder / "stow.multipart").write_bytes(body + b"--soak-boundary--\r\n")


def main(args: argparse.Namespace) -> None:
    commit = git_commit()
    if "uncommitted" in commit:
        # The report says which commit produced it: that must be a commit, not a work tree.
        raise SystemExit("commit your changes first: a soak report names the commit it measured")
    started_load = load_average()
    inputs = ROOT / "benchmarks" / ".soak-inputs"
    make_inputs(inputs)
    port = free_port()
    env = os.environ | {
        "CXR_MAX_QUEUE_SIZE": str(args.queue_size),
        "CXR_MAX_BATCH_SIZE": str(args.max_batch),
        "SOAK_INPUTS": str(inputs),
    }
    base = f"http://127.0.0.1:{port}"
    server, cold_start_s = start_service(port, env, base)
    out = RESULTS / "soak"
    out.mkdir(parents=True, exist_ok=True)
    with rss_samples(server.pid, args.sample_s) as samples:
        locust = run_locust(base, args, env, out / "soak")
    alive = httpx.get(f"{base}/readyz", timeout=5).status_code
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)

    with (out / "memory.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seconds", "rss_kib"])
        writer.writerows(samples)
    report = soak_report(args, out, samples, cold_start_s, alive, commit=commit, load_at_start=started_load)
    (RESULTS / "reliability.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    if locust.returncode not in (0, 1):
        print(locust.stdout[-3000:], locust.stderr[-3000:], file=sys.stderr)


def start_service(port: int, env: dict[str, str], base: str) -> tuple[subprocess.Popen, float]:
    """`python -m service` on `port`, and the seconds until /readyz said ready (given up after 120 s)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT
    )
    started = time.time()
    while time.time() - started < 120:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    return server, time.time() - started


@contextlib.contextmanager
def rss_samples(pid: int, every_s: float) -> Iterator[list[tuple[float, int]]]:
    """(seconds since the start, resident KiB of the process tree) every `every_s` while the block runs."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.time()
        while not stop.is_set():
            samples.append((time.time() - t0, process_tree_rss_kib(pid)))
            stop.wait(every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join()


def run_locust(
    base: str, args: argparse.Namespace, env: dict[str, str], csv_prefix: Path
) -> subprocess.CompletedProcess:
    """Locust headless with benchmarks/soak_locustfile.py for --minutes, CSVs at `csv_prefix`*."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "benchmarks" / "soak_locustfile.py"),
            "--headless",
            "--host",
            base,
            "--users",
            str(args.users),
            "--spawn-rate",
            str(args.users),
            "--run-time",
            f"{args.minutes * 60:.0f}s",
            "--csv",
            str(csv_prefix),
            "--only-summary",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def soak_report(
    args: argparse.Namespace,
    out: Path,
    samples: list[tuple[float, int]],
    cold_start_s: float,
    alive: int,
    commit: str,
    load_at_start: str,
) -> list[str]:
    """reliability.md: the outcome (unexpected answers, throughput, latency) and the memory growth after warm-up."""
    rows = list(csv.DictReader(io.StringIO((out / "soak_stats.csv").read_text())))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    warm = [rss for t, rss in samples if t >= args.warmup_s]
    growth = (warm[-1] - warm[0]) / warm[0] * 100 if len(warm) >= 2 else float("nan")
    failures = (out / "soak_failures.csv").read_text() if (out / "soak_failures.csv").exists() else ""
    report = [
        "# Reliability: soak run",
        "",
        f"Command: `python -m benchmarks.soak --minutes {args.minutes:g} --users {args.users} "
        f"--queue-size {args.queue_size} "
        f"--max-batch {args.max_batch}` (demo pack, CPU).",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"load average at start (1/5/15 min) {load_at_start} (other work on the machine shares its cores).",
        "",
        f"Produced by commit {commit}.",
        "",
        f"- Duration {args.minutes:g} min, {args.users} concurrent users (no think time), "
        f"queue limited to {args.queue_size} images "
        "so the offered load exceeds capacity and must be shed with 429.",
        "- Mix per user: 12 valid 1643x1349 images (explicit VR, RLE, JPEG 2000, MONOCHROME1) : "
        "4 bad inputs (truncated, "
        "text, colour, empty) : 1 STOW-RS request (2 good + 1 broken instance).",
        f"- Requests: {total['Request Count']}, **unexpected answers: {total['Failure Count']}** "
        "(load shed with 429/503 + Retry-After counts as expected).",
        f"- Throughput {float(total['Requests/s']):.1f} requests/s; "
        f"latency p50 {total['50%']} ms, p95 {total['95%']} ms, "
        f"p99 {total['99%']} ms (all requests, including refusals).",
        f"- Cold start (process start to ready): {cold_start_s:.1f} s. `/readyz` after the run: {alive}.",
        f"- Resident memory, server + decode workers: {warm[0] / 1024:.0f} MiB at {args.warmup_s:g} s (after warm-up), "
        f"{warm[-1] / 1024:.0f} MiB at the end, peak {max(r for _, r in samples) / 1024:.0f} MiB: "
        f"**growth {growth:+.1f}%** after warm-up (target < 5%).",
        "",
        "Per request type (locust):",
        "",
        "| type | requests | unexpected | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    report += [
        f"| {row['Name']} | {row['Request Count']} | {row['Failure Count']} | {row['50%']} | {row['99%']} |"
        for row in rows
        if row["Name"] != "Aggregated"
    ]
    report += ["", "Raw data: `benchmarks/results/soak/` (locust CSVs, `memory.csv`)."]
    if failures.count("\n") > 1:
        report += ["", "Unexpected answers:", "", "```", failures.strip(), "```"]
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
