"""Locust users for the throughput benchmark: each posts DICOMs to POST /v1/predict, back to back.

    BENCH_INPUT_DIR=benchmarks/.bench-inputs/<set> BENCH_WARMUP_S=5 BENCH_MEASURE_S=15 \
        BENCH_WINDOW_FILE=window.json \
        locust -f benchmarks/locustfile.py --headless -u 8 -r 8 --run-time 30s --csv PREFIX --host URL

The body is the raw Part 10 file as `application/dicom` (the README's curl call). Users start at
different images of the set and cycle through it. Anything but a 200 with a JSON body is a failure.
Warm-up: the statistics are reset BENCH_WARMUP_S seconds after the test starts, so the CSV covers
only the measured window; the test then stops itself BENCH_MEASURE_S seconds later (locust's
--run-time is only a safety bound: its clock starts before the users do, by up to seconds on a busy
machine). The window's exact start and end are written to BENCH_WINDOW_FILE.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import FastHttpUser, constant, events, task

from benchmarks.locust_window import MeasurementWindow

INPUT_DIR = Path(os.environ.get("BENCH_INPUT_DIR", "benchmarks/.bench-inputs"))
BODIES = [path.read_bytes() for path in sorted(INPUT_DIR.glob("*.dcm"))]
HEADERS = {"Content-Type": "application/dicom", "Accept": "application/json"}
MeasurementWindow.from_environ().install(events)
_user_numbers = itertools.count()


class ClinicalApp(FastHttpUser):
    wait_time = constant(0)  # closed loop: the next request leaves as soon as the answer arrives

    def on_start(self) -> None:
        if not BODIES:
            raise RuntimeError(f"no .dcm files in {INPUT_DIR}")
        self.next_index = next(_user_numbers) % len(BODIES)

    @task
    def predict(self) -> None:
        body = BODIES[self.next_index]
        self.next_index = (self.next_index + 1) % len(BODIES)
        with self.client.post(
            "/v1/predict", data=body, headers=HEADERS, name="predict", catch_response=True
        ) as response:
            if response.status_code == 200 and response.text.startswith("{"):
                response.success()
            else:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
