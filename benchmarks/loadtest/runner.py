"""Running one load level with locust (headless): one process, or a master with local and remote workers.

Each level is its own locust run, so each gets its own CSVs and HTML report and its own measured window
(benchmarks/locust_window.py). In distributed mode the master sends no request itself; local workers are
started here per level, remote ones (`python -m benchmarks.loadtest --worker --master-host ...`) reconnect
to each level's master by themselves. Every locust process reads its own CPU time over the window
(benchmarks/locust_window.py), remote workers included, so the report shows what generating the load cost.
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import RUN_TIME_MARGIN_S, locust_command, parse_locust_stats, read_window, window_env
from benchmarks.loadtest.traffic import KINDS, parse_failure
from benchmarks.servers import free_port

# Counter names of benchmarks/locust_window.py (not imported: it imports locust, which would monkey-patch this
# process with gevent).
CPU_COUNTER, PROCESSES_COUNTER = "generator_cpu_s", "generator_processes"

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "benchmarks" / "loadtest" / "locustfile.py"
WORKER_EXIT_GRACE_S = 20.0
DONE_FILE_ENV = "CXR_LOADTEST_DONE_FILE"  # a worker writes it when its master says the sweep is over
FINAL_LEVEL_ENV = "CXR_LOADTEST_FINAL_LEVEL"  # the master of the last level tells its workers so


@dataclass(frozen=True)
class Level:
    index: int  # 1, 2, ... in the order run
    users: int  # closed loop: users; open loop: most requests in flight at once
    arrival_rate_per_s: float | None = None  # open loop when set

    @property
    def label(self) -> str:
        if self.arrival_rate_per_s is None:
            return f"{self.users} user{'s' * (self.users != 1)}"
        return f"{self.arrival_rate_per_s * 60:g}/min"

    @property
    def x(self) -> float:
        """Where the level sits on the plots' x axis: users, or the offered rate per minute."""
        return self.users if self.arrival_rate_per_s is None else self.arrival_rate_per_s * 60

    @property
    def slug(self) -> str:
        return f"level-{self.index:02d}"


@dataclass(frozen=True)
class Generator:
    """How the load is generated: traffic options for locust, the environment of its processes, the topology."""

    host: str
    locust_options: tuple[str, ...]  # --mix ... --think-time ... (custom options of the locustfile)
    env: dict[str, str]  # inputs folder, API key, TLS settings: never on a command line
    local_workers: int = 0
    remote_workers: int = 0
    master_bind_host: str = "127.0.0.1"
    master_bind_port: int | None = None  # None: a free port per level (local workers only)
    workers_wait_s: float = 120.0
    html: str = "all"  # which levels keep locust's HTML report: all or last

    @property
    def distributed(self) -> bool:
        return self.local_workers + self.remote_workers > 0

    @property
    def processes(self) -> int:
        return max(self.local_workers + self.remote_workers, 1)


@dataclass(frozen=True)
class KindStats:
    kind: str  # a request kind, or "all"
    requests: int
    failures: int
    rps: float  # successful requests per second over the measured window
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    average_ms: float


@dataclass(frozen=True)
class ErrorCount:
    kind: str
    status: str  # "429", or "no answer"
    code: str  # the service's error code, or the exception's name
    count: int
    example: str  # locust's failure text (ours: "HTTP 429 overloaded: <the service's message>")


@dataclass
class LevelResult:
    level: Level
    measured_from: float  # time.time() when the warm-up ended
    stopped_at: float
    total: KindStats
    kinds: list[KindStats]
    errors: list[ErrorCount]
    images_per_s: float  # instances in successful answers per second (a study carries several)
    generator_cpu_cores: float  # every locust process (remote workers too) over the window
    generator_processes: int
    counters: dict[str, float] = field(default_factory=dict)  # arrivals, late_arrivals, images:<kind>, generator_*
    max_lag_s: float = 0.0
    cpu_warning: bool = False  # locust saw one of its processes above 90% CPU
    workers: int = 0
    workers_flushed: int = 0
    server_cpu_cores: float | None = None  # only with --server-pid (the service runs on this machine)
    server_peak_rss_mib: float | None = None

    @property
    def measured_s(self) -> float:
        return self.stopped_at - self.measured_from

    @property
    def error_rate(self) -> float:
        return self.total.failures / self.total.requests if self.total.requests else 1.0


def kind_stats(stats_csv: str, name: str, measured_s: float) -> KindStats | None:
    try:
        stats = parse_locust_stats(stats_csv, name=name)
    except ValueError:
        return None
    return KindStats(
        kind="all" if name == "Aggregated" else name,
        requests=stats.requests,
        failures=stats.failures,
        rps=(stats.requests - stats.failures) / measured_s,
        p50_ms=stats.p50_ms,
        p95_ms=stats.p95_ms,
        p99_ms=stats.p99_ms,
        max_ms=stats.max_ms,
        average_ms=stats.average_ms,
    )


def parse_failures(failures_csv: str) -> list[ErrorCount]:
    """locust's `_failures.csv` (Method, Name, Error, Occurrences; read by header) as counts per kind, status
    and code; entries differing only in the service's message are added up, the first message kept."""
    counts: dict[tuple[str, str, str], ErrorCount] = {}
    for row in csv.DictReader(io.StringIO(failures_csv)):
        status, code = parse_failure(row["Error"])
        key = (row["Name"], status, code)
        previous = counts.get(key)
        count = int(row["Occurrences"]) + (previous.count if previous else 0)
        counts[key] = ErrorCount(row["Name"], status, code, count, previous.example if previous else row["Error"])
    return sorted(counts.values(), key=lambda e: (-e.count, e.kind, e.status, e.code))


def read_level(level: Level, prefix: Path, window: dict) -> LevelResult:
    measured_s = window["stopped_at"] - window["measured_from"]
    stats_csv = Path(f"{prefix}_stats.csv").read_text()
    failures_path = Path(f"{prefix}_failures.csv")
    counters = window.get("counters", {})
    # A kind locust saw only in the warm-up keeps an empty row after the reset: nothing of it to judge.
    kinds = [stats for kind in KINDS if (stats := kind_stats(stats_csv, kind, measured_s)) and stats.requests]
    images = sum(value for name, value in counters.items() if name.startswith("images:"))
    return LevelResult(
        level=level,
        measured_from=window["measured_from"],
        stopped_at=window["stopped_at"],
        total=kind_stats(stats_csv, "Aggregated", measured_s),
        kinds=kinds,
        errors=parse_failures(failures_path.read_text()) if failures_path.is_file() else [],
        images_per_s=images / measured_s,
        counters=counters,
        generator_cpu_cores=counters.get(CPU_COUNTER, float("nan")) / measured_s,
        generator_processes=int(counters.get(PROCESSES_COUNTER, 0)),
        max_lag_s=window.get("maxima", {}).get("max_lag_s", 0.0),
        cpu_warning=window.get("cpu_warning", False),
        workers=window.get("workers", 0),
        workers_flushed=window.get("workers_flushed", 0),
    )


def level_command(
    generator: Generator,
    level: Level,
    warmup_s: float,
    duration_s: float,
    prefix: Path,
    master_port: int | None,
    final: bool,
) -> list[str]:
    extra = ["--loglevel", "INFO", *generator.locust_options]
    if level.arrival_rate_per_s is not None:
        extra += ["--arrival-rate", f"{level.arrival_rate_per_s * 60:g}/min"]
    if generator.html == "all" or final:
        extra += ["--html", f"{prefix}.html"]
    if generator.distributed:
        extra += [
            "--master",
            "--expect-workers",
            str(generator.processes),
            "--expect-workers-max-wait",
            f"{generator.workers_wait_s:g}",
            "--master-bind-host",
            generator.master_bind_host,
            "--master-bind-port",
            str(master_port),
        ]
    # The safety bound also covers the wait for workers, which locust counts in --run-time only once they are there.
    return locust_command(
        generator.host,
        level.users,
        warmup_s + duration_s + RUN_TIME_MARGIN_S,
        prefix,
        locustfile=LOCUSTFILE,
        extra=extra,
    )


def worker_command(master_host: str, master_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--worker",
        "--master-host",
        master_host,
        "--master-port",
        str(master_port),
        "--loglevel",
        "INFO",
    ]


def spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("w") as log:
        # Own session: a level's processes can be ended together by their group, never anything else.
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen, grace_s: float) -> None:
    """Wait up to grace_s for the process to exit, then end its process group (TERM, then KILL)."""
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)  # the group start_new_session made: only this process and its children
                process.wait(timeout=5)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


ERROR_LINE = re.compile(r"/(ERROR|CRITICAL)/|^\w*(Error|Exception)\b")


def log_reason(log_path: Path) -> str:
    """The last error line of a locust log (a logged error, or a traceback's last line), for the one-line message."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    errors = [line for line in lines if ERROR_LINE.search(line)]
    return (errors or lines or ["(empty log)"])[-1].strip()


def run_level(
    generator: Generator,
    level: Level,
    warmup_s: float,
    duration_s: float,
    out: Path,
    final: bool,
    tick: Callable[[float], None] = lambda _elapsed: None,
) -> LevelResult:
    """Run one level; raises RuntimeError (with the reason from locust's log) when it measured nothing."""
    folder = out / "locust"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / level.slug
    window_file = folder / f"{level.slug}_window.json"
    for stale in folder.glob(f"{level.slug}*"):  # never read an earlier run's results as this one's
        stale.unlink()
    master_port = generator.master_bind_port or (free_port() if generator.distributed else None)
    env = os.environ | generator.env | window_env(warmup_s, duration_s, window_file)
    if final:
        env[FINAL_LEVEL_ENV] = "1"
    log_path = folder / f"{level.slug}_locust.log"
    master = spawn(level_command(generator, level, warmup_s, duration_s, prefix, master_port, final), env, log_path)
    workers = [
        spawn(worker_command("127.0.0.1", master_port), env, folder / f"{level.slug}_worker-{n}.log")
        for n in range(1, generator.local_workers + 1)
    ]
    interrupted = True
    try:
        started = time.monotonic()
        while master.poll() is None:
            time.sleep(0.5)
            tick(time.monotonic() - started)
        interrupted = False
    finally:  # on Ctrl-C (interrupted) every process of the level is ended at once
        for process in (master, *workers):
            stop(process, grace_s=0 if interrupted else WORKER_EXIT_GRACE_S)
    try:
        window = read_window(window_file, log_path.name)
    except RuntimeError:
        raise RuntimeError(f"{level.label}: locust measured nothing ({log_reason(log_path)}); see {log_path}") from None
    return read_level(level, prefix, window)
