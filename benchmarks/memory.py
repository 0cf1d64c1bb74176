"""Memory stability: many requests against our service, the resident memory of its process tree
(server + decode workers) recorded every few requests.

    python -m benchmarks.memory --requests 10000 [--concurrency 8] [--every 100] [--out benchmarks/results/memory]

Starts `python -m service` with the model pack, posts the benchmark's inputs (both sets, in turn) to
POST /v1/predict from `--concurrency` client threads, and writes memory.csv, memory.png and
memory.md. The report states whether memory grows: the median RSS of the last quarter of the samples
against the first quarter's (growth above GROWTH_LIMIT_PERCENT counts as growing). The verdict is in
the report, not in a test: it is a measurement of this machine, not a property of the code.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import shlex
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.inputs import INPUT_SETS, input_set, make_input_set, read_bodies
from benchmarks.machine import describe_machine, load_average
from benchmarks.procfs import tree_memory
from benchmarks.report import save_figure, table
from benchmarks.servers import start_server, stop_server
from benchmarks.throughput import OURS, service_specs
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
GROWTH_LIMIT_PERCENT = 5.0  # the soak run's target (benchmarks/results/reliability.md), kept the same


@dataclass(frozen=True)
class MemorySample:
    requests: int  # requests answered when the sample was taken
    seconds: float  # since the first request
    rss_kib: int
    pss_kib: int


@dataclass(frozen=True)
class Growth:
    first_quarter_median_mib: float
    last_quarter_median_mib: float
    percent: float
    grows: bool


def quarter_growth(values_kib: Sequence[float], limit_percent: float = GROWTH_LIMIT_PERCENT) -> Growth:
    """Median of the last quarter of the samples against the first quarter's (at least one sample each)."""
    if len(values_kib) < 4:
        raise ValueError("need at least 4 samples to compare quarters")
    quarter = len(values_kib) // 4
    first, last = statistics.median(values_kib[:quarter]), statistics.median(values_kib[-quarter:])
    percent = (last - first) / first * 100
    return Growth(first / 1024, last / 1024, percent, percent > limit_percent)


class Recorder:
    """Counts answers and samples the server's memory every `every` of them (from the client threads)."""

    def __init__(self, pid: int, every: int) -> None:
        self.pid, self.every = pid, every
        self.statuses: Counter[int | str] = Counter()
        self.samples: list[MemorySample] = []
        self.started = time.perf_counter()
        self._lock = threading.Lock()

    def sample(self, answered: int) -> MemorySample:
        memory = tree_memory(self.pid)
        sample = MemorySample(answered, time.perf_counter() - self.started, memory.rss_kib, memory.pss_kib)
        self.samples.append(sample)
        return sample

    def answered(self, status: int | str) -> MemorySample | None:
        with self._lock:
            self.statuses[status] += 1
            count = sum(self.statuses.values())
            return self.sample(count) if count % self.every == 0 else None


def drive(base_url: str, bodies: Sequence[bytes], requests: int, concurrency: int, recorder: Recorder) -> None:
    """`requests` posts from `concurrency` threads, each with its own connection, back to back."""
    numbers = itertools.count()
    numbers_lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=120) as http:
            while True:
                with numbers_lock:
                    number = next(numbers)
                if number >= requests:
                    return
                try:
                    status: int | str = http.post(
                        "/v1/predict",
                        content=bodies[number % len(bodies)],
                        headers={"Content-Type": "application/dicom"},
                    ).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                sample = recorder.answered(status)
                if sample is not None and sample.requests % (recorder.every * 10) == 0:
                    rate = sample.requests / sample.seconds
                    print(
                        f"  {sample.requests:>6} requests, {rate:5.1f}/s, RSS {sample.rss_kib / 1024:6.0f} MiB, "
                        f"about {(requests - sample.requests) / rate / 60:4.1f} min left",
                        flush=True,
                    )

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()


def plot_memory(samples: Sequence[MemorySample], compared: Sequence[MemorySample], growth: Growth, path: Path) -> Path:
    """RSS and PSS over requests (all samples), with the quarter medians drawn over the samples compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    counts = [s.requests for s in samples]
    axis.plot(counts, [s.rss_kib / 1024 for s in samples], label="RSS (sum over the tree)")
    axis.plot(counts, [s.pss_kib / 1024 for s in samples], label="PSS (sum over the tree)")
    quarter = len(compared) // 4
    axis.hlines(
        growth.first_quarter_median_mib,
        compared[0].requests,
        compared[quarter - 1].requests,
        colors="black",
        linestyles="--",
        label="RSS median, first / last quarter",
    )
    axis.hlines(
        growth.last_quarter_median_mib,
        compared[-quarter].requests,
        compared[-1].requests,
        colors="black",
        linestyles="--",
    )
    axis.set(
        xlabel="requests answered",
        ylabel="MiB",
        title=f"Memory of server + decode workers ({growth.percent:+.1f}% RSS)",
    )
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(plt, figure, path)


def render_memory_report(
    command: str,
    machine: dict[str, str],
    started_at: str,
    requests: int,
    concurrency: int,
    sets: Sequence[str],
    statuses: dict,
    samples: Sequence[MemorySample],
    rss: Growth,
    pss: Growth,
    configuration: str,
) -> str:
    ok = statuses.get(200, 0)
    duration = samples[-1].seconds if samples else 0.0
    status_text = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items(), key=str))
    return "\n".join(
        [
            "# Memory stability",
            "",
            f"Command: `{command}`  ",
            f"Started {started_at}; {requests} requests in {duration / 60:.1f} min "
            f"({requests / duration if duration else 0:.1f}/s) from {concurrency} client threads; inputs: "
            f"{', '.join(sets)} (in turn). Every number below was measured by this run.",
            "",
            *table(["", ""], [[key, value] for key, value in machine.items()], "ll"),
            "",
            f"Server: {configuration}",
            "",
            f"Answers: {status_text} ({requests - ok} not 200).",
            "",
            f"**Memory {'grows' if rss.grows else 'does not grow'}**: median RSS of the server's process tree "
            f"{rss.first_quarter_median_mib:.0f} MiB over the first quarter of the samples, "
            f"{rss.last_quarter_median_mib:.0f} MiB over the last: {rss.percent:+.1f}% "
            f"(growing means more than +{GROWTH_LIMIT_PERCENT:g}%). PSS: {pss.first_quarter_median_mib:.0f} → "
            f"{pss.last_quarter_median_mib:.0f} MiB ({pss.percent:+.1f}%).",
            "",
            f"{len(samples)} samples, one every "
            f"{samples[1].requests - samples[0].requests if len(samples) > 1 else '?'} "
            "requests; RSS summed over the server and its decode workers, read from /proc. Raw data: `memory.csv`.",
            "",
            "![memory](memory.png)",
            "",
        ]
    )


def main(args: argparse.Namespace) -> int:
    if args.requests < 8 * args.every:
        raise SystemExit("--requests must be at least 8 x --every (two samples per quarter, at the least)")
    settings = Settings(**({"models": args.models} if args.models else {}))
    models = settings.models.resolve()
    sets = [input_set(name) for name in args.input_sets]
    bodies = [
        body for group in zip(*(read_bodies(make_input_set(spec)) for spec in sets), strict=True) for body in group
    ]
    spec = service_specs(settings, models, None, args.service_workers)[OURS]
    out: Path = args.out
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_before = load_average()
    print(
        f"starting {spec.title}; {args.requests} requests, concurrency {args.concurrency}, a sample every {args.every}",
        flush=True,
    )
    server = start_server(spec, out / "logs")
    try:
        providers = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["providers"]
        machine = describe_machine(json.loads((models / "manifest.json").read_text()), providers, load_before)
        recorder = Recorder(server.process.pid, args.every)
        recorder.sample(0)
        drive(server.base_url, bodies, args.requests, args.concurrency, recorder)
    finally:
        stop_server(server)
    samples = [s for s in recorder.samples if s.requests > 0]  # the one at 0 is before any decode worker exists
    rss = quarter_growth([s.rss_kib for s in samples])
    pss = quarter_growth([s.pss_kib for s in samples])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "memory.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["requests", "seconds", "rss_kib", "pss_kib"])
        writer.writerows((s.requests, f"{s.seconds:.2f}", s.rss_kib, s.pss_kib) for s in recorder.samples)
    plot_memory(recorder.samples, samples, rss, out / "memory.png")
    report = render_memory_report(
        "python -m benchmarks.memory " + shlex.join(sys.argv[1:]),
        machine,
        started_at,
        args.requests,
        args.concurrency,
        [s.name for s in sets],
        dict(recorder.statuses),
        samples,
        rss,
        pss,
        spec.configuration,
    )
    (out / "memory.md").write_text(report)
    print(report)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8, help="client threads, each one request in flight")
    parser.add_argument("--every", type=int, default=100, help="record memory every this many answers")
    parser.add_argument(
        "--input-sets", nargs="+", choices=[s.name for s in INPUT_SETS], default=[s.name for s in INPUT_SETS]
    )
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--service-workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
