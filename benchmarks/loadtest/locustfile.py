"""Locust users for load-testing a deployment of the service: `python -m benchmarks.loadtest` runs this headless;
run it yourself to watch in locust's web UI (from the repository root):

    CXR_LOADTEST_API_KEY=... .venv/bin/locust -f benchmarks/loadtest/locustfile.py --host https://cxr.example

Each user is one clinical app: it posts a DICOM, waits for the answer, optionally thinks, and posts the next
(closed loop). Kinds of request are drawn from --mix (see traffic.py); users start at different files and
cycle through them; a `studies` request carries the next --instances-per-study files. With --arrival-rate
the users instead take requests from one Poisson arrival stream (open loop, "N requests per minute").

Settings that differ per machine come from the environment (a remote worker has its own):
CXR_LOADTEST_API_KEY (sent as `Authorization: Bearer`), CXR_LOADTEST_INPUTS (a folder of DICOMs; default
the generated phantoms), CXR_LOADTEST_CA_BUNDLE (PEM file of the CA that signed the server's certificate),
CXR_LOADTEST_INSECURE=1 (do not verify it). The traffic settings are locust options (web UI: "Custom
parameters"), sent by the master to its workers: --mix, --think-time, --instances-per-study, --arrival-rate.
The key is never a locust option: locust would show options in its web UI and reports.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import ClassVar

import gevent
from locust import FastHttpUser, between, events, task
from locust.runners import MasterRunner, WorkerRunner

from benchmarks.loadtest.dicoms import Inputs, inputs_folder_from_environ
from benchmarks.loadtest.options import parse_rate, parse_think_time
from benchmarks.loadtest.runner import DONE_FILE_ENV, FINAL_LEVEL_ENV
from benchmarks.loadtest.traffic import (
    DEFAULT_MIX,
    REQUESTS,
    ArrivalSchedule,
    KindPicker,
    first_file,
    global_user_number,
    judge,
    parse_mix,
    stow_body,
)
from benchmarks.locust_window import MeasurementWindow, refresh_loop_clock

API_KEY_ENV, CA_BUNDLE_ENV, INSECURE_ENV = "CXR_LOADTEST_API_KEY", "CXR_LOADTEST_CA_BUNDLE", "CXR_LOADTEST_INSECURE"
LATE_S = 0.1  # an arrival claimed this much after its time had waited for a free user
SWEEP_DONE = "loadtest:sweep-done"  # master -> workers after the last level: `--worker` commands may exit

WINDOW = MeasurementWindow.from_environ().install(events)
INPUTS_FOLDER = inputs_folder_from_environ()  # run by hand without CXR_LOADTEST_INPUTS: may generate phantoms (~6 s)
refresh_loop_clock()  # else locust's --run-time timer, set next, would count those seconds as run


@events.init_command_line_parser.add_listener
def add_traffic_options(parser) -> None:
    parser.add_argument(
        "--mix", default=DEFAULT_MIX, help="request kinds and their shares, e.g. predict=80,sr=10,studies=10"
    )
    parser.add_argument("--think-time", default="0", help="seconds a user pauses after each answer: 2, or a range 1-3")
    parser.add_argument("--instances-per-study", type=int, default=3, help="DICOM instances in each `studies` request")
    parser.add_argument(
        "--arrival-rate",
        default="",
        help="open loop: requests arrive at this rate, e.g. 30/min (all load generators together); empty: closed loop",
    )


@events.init.add_listener
def listen_for_sweep_end(environment, runner=None, **_kwargs) -> None:
    if isinstance(runner, WorkerRunner):  # a local worker (no done file) just ignores the news
        runner.register_message(SWEEP_DONE, lambda **_kw: mark_sweep_done(os.environ.get(DONE_FILE_ENV)))


def mark_sweep_done(done_file: str | None) -> None:
    if done_file:
        Path(done_file).touch()


@events.test_stop.add_listener
def announce_sweep_end(environment, **_kwargs) -> None:
    if isinstance(environment.runner, MasterRunner) and os.environ.get(FINAL_LEVEL_ENV):
        environment.runner.send_message(SWEEP_DONE)  # before locust's own "quit", on the same ordered connection


class Traffic:
    """What every user of this process shares, set when a test starts (the master's options are known then)."""

    inputs: Inputs | None = None
    mix: ClassVar[dict[str, float]] = {}
    instances_per_study = 3
    schedule: ArrivalSchedule | None = None
    process_index, processes = 0, 1
    user_numbers = itertools.count()


@events.test_start.add_listener
def prepare_traffic(environment, **_kwargs) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # the master sends nothing itself
    options = environment.parsed_options
    if Traffic.inputs is None:
        Traffic.inputs = Inputs.load(INPUTS_FOLDER)
    Traffic.mix = parse_mix(options.mix)
    Traffic.instances_per_study = max(1, int(options.instances_per_study))
    if isinstance(environment.runner, WorkerRunner):  # users are numbered across every worker (the master's count)
        Traffic.process_index = max(environment.runner.worker_index, 0)
        Traffic.processes = max(int(getattr(options, "expect_workers", 1) or 1), 1)
    Traffic.user_numbers = itertools.count()
    low, high = parse_think_time(options.think_time)
    ClinicalApp.wait_time = between(low, high)
    Traffic.schedule = None
    if options.arrival_rate:
        # Each process takes its share; the sum of independent Poisson streams is the Poisson stream of the total.
        Traffic.schedule = ArrivalSchedule(
            parse_rate(options.arrival_rate) / Traffic.processes, seed=Traffic.process_index, start=time.time()
        )


def auth_headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV, "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def tls_context_factory(cafile: str | None = None):
    """Verify the server against the CA bundle when one is given, else against the client library's default CAs."""
    import gevent.ssl

    return gevent.ssl.create_default_context(cafile=os.environ.get(CA_BUNDLE_ENV) or cafile)


class ClinicalApp(FastHttpUser):
    insecure = os.environ.get(INSECURE_ENV, "") not in ("", "0")
    ssl_context_factory = None if insecure else staticmethod(tls_context_factory)
    network_timeout = connection_timeout = 120.0  # a saturated service answers slowly; that is a measurement

    def on_start(self) -> None:
        self.number = global_user_number(next(Traffic.user_numbers), Traffic.process_index, Traffic.processes)
        self.cursor = first_file(self.number, len(Traffic.inputs))
        self.pick = KindPicker(Traffic.mix, seed=self.number)
        self.auth = auth_headers()

    def next_bodies(self, count: int) -> list[bytes]:
        bodies = [Traffic.inputs.body(self.cursor + offset) for offset in range(count)]
        self.cursor = (self.cursor + count) % len(Traffic.inputs)
        return bodies

    @task
    def send(self) -> None:
        if Traffic.schedule is not None:
            self.wait_for_arrival()
        kind = self.pick()
        instances = Traffic.instances_per_study if kind == "studies" else 1
        bodies = self.next_bodies(instances)
        body = stow_body(bodies) if kind == "studies" else bodies[0]
        spec = REQUESTS[kind]
        with self.client.post(
            spec.path, data=body, headers=spec.headers | self.auth, name=kind, catch_response=True
        ) as response:
            if response.status_code == 0:  # no HTTP answer: refused, reset, TLS failure, timeout
                error = response.error
                response.failure(f"{type(error).__name__}: {error}")
                return
            problem = judge(
                kind,
                response.status_code,
                response.content or b"",
                (response.headers or {}).get("content-type", ""),
                instances,
            )
            if problem is None:
                response.success()
                WINDOW.count(f"images:{kind}", instances)
            else:
                response.failure(problem)

    def wait_for_arrival(self) -> None:
        claimed_at = time.time()
        due = Traffic.schedule.claim()
        WINDOW.count("arrivals")
        # Late: it was due before this user was free to take it (every user busy). A wake-up a little after
        # its time on a busy generator is not counted here; it shows in the largest lag.
        if claimed_at - due > LATE_S:
            WINDOW.count("late_arrivals")
        gevent.sleep(max(0.0, due - claimed_at))
        WINDOW.record_max("max_lag_s", time.time() - due)
