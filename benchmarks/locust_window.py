"""The measured window of a locust run: a warm-up whose requests are discarded, then a fixed measuring time.

    BENCH_WARMUP_S=5 BENCH_MEASURE_S=15 BENCH_WINDOW_FILE=window.json locust -f <a locustfile calling
        MeasurementWindow.from_environ().install(events)> --headless ...

The statistics are reset when the warm-up ends and the run stops itself when the measuring time is over
(locust's --run-time is only a safety bound: its clock starts before the users do, by up to seconds on a
busy machine). The window's start and end, and any counters the locustfile kept over it, are written to
BENCH_WINDOW_FILE as JSON. Without BENCH_MEASURE_S (interactive use in locust's web UI) nothing stops the run.

Distributed runs (`--master` plus `--worker` processes) need more than `stats.reset_all()` on the master:
a worker sends its statistics every 3 s, so a report carrying warm-up requests can reach the master after
its reset, and the requests of the last seconds would reach it after it quit. So the window is a protocol:

- outside the measured window a worker zeroes its statistics just before each report is serialised (its
  reports then carry nothing), so no warm-up request reaches the master whenever the report arrives;
- at the end of the warm-up the master resets its statistics and tells every worker `window:measure`;
  each worker resets its own (dropping warm-up requests not reported yet) and reports from then on;
- at the end the master tells every worker `window:flush`; each sends its last measured report at once,
  stops reporting, and answers `window:flushed` (after the report, on the same ordered connection), and
  the master quits once every worker has answered: the statistics it writes cover exactly the window.

Counters the locustfile keeps (`count`, `record_max`) travel in the same reports and are summed on the master;
every process also adds its own CPU time over the window (`generator_cpu_s`), so the window file says what
generating the load cost, remote workers included.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import Counter
from pathlib import Path

import gevent
from locust.runners import MasterRunner, WorkerRunner

from benchmarks.loadgen import FILE_ENV, MEASURE_ENV, WARMUP_ENV

MEASURE, FLUSH, FLUSHED = "window:measure", "window:flush", "window:flushed"
FLUSH_TIMEOUT_S = 15.0  # a worker that has not answered by then is given up on (the window file says so)
COUNTERS_KEY = "window_counters"  # in a worker's report: its counters since its last report
WARMUP, MEASURING, DONE = "warm-up", "measuring", "done"
# Counters every process adds at the end of the window: the load generator's own CPU time over it, and how
# many processes it ran in (a remote worker's included: its CPU is read by itself, on its machine).
CPU_COUNTER, PROCESSES_COUNTER = "generator_cpu_s", "generator_processes"


def refresh_loop_clock() -> None:
    """gevent's timers count from the event loop's cached time, which stands still while Python blocks without
    yielding (an import generating test files, say): refresh it, or a timer set now fires that much too early."""
    gevent.get_hub().loop.update_now()


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class MeasurementWindow:
    """Install once per locustfile; `count` and `record_max` keep extra numbers over the measured window only."""

    def __init__(self, warmup_s: float, measure_s: float, window_file: str | None) -> None:
        self.warmup_s, self.measure_s, self.window_file = warmup_s, measure_s, window_file
        self.phase = WARMUP
        self.times: dict[str, float] = {}
        self.counters: Counter[str] = Counter()
        self.maxima: dict[str, float] = {}
        self.flushed: set[str] = set()  # master: workers that sent their last report
        self.cpu_at_start = 0.0
        self.environment = None

    @classmethod
    def from_environ(cls) -> MeasurementWindow:
        return cls(
            float(os.environ.get(WARMUP_ENV, "0")),
            float(os.environ.get(MEASURE_ENV, "0")),
            os.environ.get(FILE_ENV) or None,
        )

    # --- what the locustfile calls ------------------------------------------------------------------

    @property
    def measuring(self) -> bool:
        return self.phase == MEASURING

    def count(self, name: str, amount: int = 1) -> None:
        if self.measuring:
            self.counters[name] += amount

    def record_max(self, name: str, value: float) -> None:
        if self.measuring:
            self.maxima[name] = max(value, self.maxima.get(name, value))

    def install(self, events) -> MeasurementWindow:
        """Register the listeners. Call it when the locustfile is imported: the report listener must run
        before the one locust adds when it creates the runner, which serialises the statistics."""
        events.init.add_listener(self._on_init)
        events.test_start.add_listener(self._on_test_start)
        events.test_stop.add_listener(self._on_test_stop)
        events.report_to_master.add_listener(self._on_report_to_master)
        events.worker_report.add_listener(self._on_worker_report)
        return self

    # --- every process --------------------------------------------------------------------------------

    def _on_init(self, environment, runner=None, **_kwargs) -> None:
        self.environment = environment
        if isinstance(runner, WorkerRunner):
            runner.register_message(MEASURE, self._start_measuring_on_worker)
            runner.register_message(FLUSH, self._flush_on_worker)
        elif isinstance(runner, MasterRunner):
            runner.register_message(FLUSHED, lambda environment, msg, **_kw: self.flushed.add(msg.node_id))

    def _on_test_start(self, environment, **_kwargs) -> None:
        self.environment = environment
        self.phase, self.counters, self.maxima = WARMUP, Counter(), {}
        if isinstance(environment.runner, WorkerRunner):
            return  # the master says when to measure
        self.times = {"started_at": time.time()}
        refresh_loop_clock()
        gevent.spawn_later(self.warmup_s, self._start_measuring)

    def _on_test_stop(self, environment, **_kwargs) -> None:
        if isinstance(environment.runner, WorkerRunner):
            return
        self.times.setdefault("stopped_at", time.time())
        if self.window_file:
            runner = environment.runner
            record = self.times | {
                "counters": dict(self.counters),
                "maxima": self.maxima,
                "workers": runner.worker_count if isinstance(runner, MasterRunner) else 0,
                "workers_flushed": len(self.flushed),
                # locust's own warning: some load generator process ran above 90% CPU (it may have limited the load)
                "cpu_warning": bool(runner.cpu_warning_emitted or getattr(runner, "worker_cpu_warning_emitted", False)),
            }
            Path(self.window_file).write_text(json.dumps(record))

    # --- master, or a single process -------------------------------------------------------------------

    def _start_measuring(self) -> None:
        environment = self.environment
        environment.stats.reset_all()
        self.counters, self.maxima = Counter(), {}
        self.phase = MEASURING
        self.times["measured_from"] = time.time()
        self.cpu_at_start = process_cpu_s()
        if isinstance(environment.runner, MasterRunner):
            environment.runner.send_message(MEASURE)
        if self.measure_s > 0:
            refresh_loop_clock()
            gevent.spawn_later(self.measure_s, self._stop)

    def _stop(self) -> None:
        runner = self.environment.runner
        self.times["stopped_at"] = time.time()
        self._count_own_cpu()
        if isinstance(runner, MasterRunner):
            expected = runner.worker_count
            runner.send_message(FLUSH)
            deadline = time.monotonic() + FLUSH_TIMEOUT_S
            while len(self.flushed) < expected and time.monotonic() < deadline:
                gevent.sleep(0.05)
        self.phase = DONE
        runner.quit()

    def _count_own_cpu(self) -> None:
        self.count(CPU_COUNTER, process_cpu_s() - self.cpu_at_start)
        self.count(PROCESSES_COUNTER)

    def _on_worker_report(self, client_id: str, data: dict, **_kwargs) -> None:
        for name, amount in data.get(COUNTERS_KEY, {}).get("counters", {}).items():
            self.counters[name] += amount
        for name, value in data.get(COUNTERS_KEY, {}).get("maxima", {}).items():
            self.maxima[name] = max(value, self.maxima.get(name, value))

    # --- worker ------------------------------------------------------------------------------------------

    def _on_report_to_master(self, client_id: str, data: dict, **_kwargs) -> None:
        if self.environment is None:
            return
        if not self.measuring:
            self.environment.stats.reset_all()  # this report then carries no request from outside the window
            return
        data[COUNTERS_KEY] = {"counters": dict(self.counters), "maxima": self.maxima}
        self.counters, self.maxima = Counter(), {}

    def _start_measuring_on_worker(self, environment, msg, **_kwargs) -> None:
        environment.stats.reset_all()
        self.counters, self.maxima = Counter(), {}
        self.phase = MEASURING
        self.cpu_at_start = process_cpu_s()

    def _flush_on_worker(self, environment, msg, **_kwargs) -> None:
        runner = environment.runner
        self._count_own_cpu()
        data: dict = {}
        environment.events.report_to_master.fire(client_id=runner.client_id, data=data)
        runner.send_message("stats", data)  # locust's own report message: the master merges it as usual
        self.phase = DONE
        runner.send_message(FLUSHED)
