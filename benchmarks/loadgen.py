"""Driving one load level with locust (headless, CSV) and reading its results back.

The CPU time locust itself used is measured (os.wait4 on its process) because on a small machine
the load generator competes with the server for the same cores.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
# The locustfile ends each level itself after warm-up + measuring; --run-time is only a safety bound this much later.
RUN_TIME_MARGIN_S = 15.0
# Read by benchmarks/locust_window.py in the locust processes. (Kept here: importing locust in this process
# would monkey-patch it with gevent.)
WARMUP_ENV, MEASURE_ENV, FILE_ENV = "BENCH_WARMUP_S", "BENCH_MEASURE_S", "BENCH_WINDOW_FILE"


@dataclass(frozen=True)
class LocustStats:
    """The "Aggregated" row of a locust `_stats.csv` (times in ms)."""

    requests: int
    failures: int
    requests_per_s: float  # locust's own rate (all requests, failures included)
    p50_ms: float
    p95_ms: float
    p99_ms: float
    average_ms: float
    max_ms: float


@dataclass(frozen=True)
class LocustRun:
    stats: LocustStats
    measured_from: float  # time.time() at the end of the warm-up (statistics reset)
    stopped_at: float  # time.time() at the end of the run
    cpu_s: float  # user + system CPU time of the locust process, its start-up included
    wall_s: float
    returncode: int

    @property
    def measured_s(self) -> float:
        return self.stopped_at - self.measured_from


def locust_command(
    host: str, users: int, run_time_s: float, csv_prefix: Path, locustfile: Path = LOCUSTFILE, extra: Sequence[str] = ()
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(users),
        "--run-time",
        f"{run_time_s:g}s",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--stop-timeout",
        "0",
        *extra,
    ]


def window_env(warmup_s: float, measure_s: float, window_file: Path) -> dict[str, str]:
    """The environment telling a locustfile's MeasurementWindow (benchmarks/locust_window.py) its window."""
    return {WARMUP_ENV: f"{warmup_s:g}", MEASURE_ENV: f"{measure_s:g}", FILE_ENV: str(window_file)}


def read_window(window_file: Path, log_name: str) -> dict:
    """The window a run measured; raises when locust stopped before measuring anything."""
    if not window_file.is_file():
        raise RuntimeError(f"locust wrote no results; see {log_name}")
    window = json.loads(window_file.read_text())
    if "measured_from" not in window:
        raise RuntimeError(f"locust stopped before the end of its warm-up; see {log_name}")
    return window


def _number(value: str) -> float:
    return float(value) if value not in ("", "N/A") else float("nan")


def parse_locust_stats(csv_text: str, name: str = "Aggregated") -> LocustStats:
    """The named row of a locust stats CSV; columns are read by header name, never by position."""
    row = next((r for r in csv.DictReader(io.StringIO(csv_text)) if r["Name"] == name), None)
    if row is None:
        raise ValueError(f"no {name!r} row in the locust stats")
    return LocustStats(
        requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]),
        requests_per_s=_number(row["Requests/s"]),
        p50_ms=_number(row["50%"]),
        p95_ms=_number(row["95%"]),
        p99_ms=_number(row["99%"]),
        average_ms=_number(row["Average Response Time"]),
        max_ms=_number(row["Max Response Time"]),
    )


def run_level(
    host: str, users: int, run_time_s: float, warmup_s: float, input_dir: Path, csv_prefix: Path
) -> LocustRun:
    """One closed-loop level: `users` users posting back to back for run_time_s, the first warmup_s discarded.

    The locustfile times the level from its own start (test_start) and stops it; locust's --run-time clock
    starts earlier, by up to seconds on a busy machine, and would cut the measured window short.
    """
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    window_file = csv_prefix.with_name(csv_prefix.name + "_window.json")
    stats_path = Path(f"{csv_prefix}_stats.csv")
    for stale in (window_file, stats_path):  # never read an earlier run's results as this one's
        stale.unlink(missing_ok=True)
    env = os.environ | {"BENCH_INPUT_DIR": str(input_dir)} | window_env(warmup_s, run_time_s - warmup_s, window_file)
    started = time.perf_counter()
    log_path = csv_prefix.with_name(csv_prefix.name + "_locust.log")
    with log_path.open("w") as log:
        command = locust_command(host, users, run_time_s + RUN_TIME_MARGIN_S, csv_prefix)
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4, not wait: it also returns the child's resource usage, i.e. locust's own CPU time.
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall_s = time.perf_counter() - started
    if not stats_path.is_file():
        raise RuntimeError(f"locust wrote no results (exit code {process.returncode}); see {log_path.name}")
    window = read_window(window_file, log_path.name)
    return LocustRun(
        stats=parse_locust_stats(stats_path.read_text()),
        measured_from=window["measured_from"],
        stopped_at=window["stopped_at"],
        cpu_s=usage.ru_utime + usage.ru_stime,
        wall_s=wall_s,
        returncode=process.returncode,
    )
