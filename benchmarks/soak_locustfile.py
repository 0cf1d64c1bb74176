"""Locust users for the soak run: mixed valid and invalid inputs, each checked for its expected answer.

An answer counts as a failure only when it is not what the input deserves: valid images must get 200
(or 429/503 with Retry-After when the service sheds load); each kind of bad input must get its own 4xx.
Inputs are made once by benchmarks/soak.py and read from SOAK_INPUTS.
"""

from __future__ import annotations

import os
from pathlib import Path

from locust import HttpUser, between, task

INPUTS = Path(os.environ.get("SOAK_INPUTS", "benchmarks/.soak-inputs"))
SHED = (429, 503)


def _read(name: str) -> bytes:
    return (INPUTS / name).read_bytes()


class ClinicalApp(HttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.valid = [_read(name) for name in ("explicit.dcm", "rle.dcm", "j2k.dcm", "monochrome1.dcm")]
        self.bad = {
            "truncated": (_read("truncated.dcm"), (400,)),
            "text": (b"hello, not a dicom" * 40, (400,)),
            "colour": (_read("colour.dcm"), (422,)),
            "empty": (b"", (400,)),
        }
        self.stow = _read("stow.multipart")
        self.index = 0

    def _post(self, name: str, body: bytes, expected: tuple[int, ...], **kwargs) -> None:
        headers = kwargs.pop("headers", {"Content-Type": "application/dicom"})
        with self.client.post(
            "/v1/predict", data=body, headers=headers, name=name, catch_response=True, **kwargs
        ) as response:
            if response.status_code in expected:
                response.success()
            elif response.status_code in SHED and "Retry-After" in response.headers:
                response.success()  # load shedding is an answer, not an error
            else:
                response.failure(f"unexpected {response.status_code}: {response.text[:200]}")

    @task(12)
    def valid_image(self) -> None:
        self.index += 1
        self._post("valid", self.valid[self.index % len(self.valid)], (200,))

    @task(4)
    def bad_input(self) -> None:
        self.index += 1
        kind = list(self.bad)[self.index % len(self.bad)]
        body, expected = self.bad[kind]
        self._post(f"bad:{kind}", body, expected)

    @task(1)
    def study(self) -> None:
        headers = {
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=soak-boundary',
            "Accept": "application/json",
        }
        with self.client.post(
            "/v1/studies", data=self.stow, headers=headers, name="stow", catch_response=True
        ) as response:
            # Two good instances and one broken one. The broken one (index 1) must fail, as not DICOM,
            # or shed before it was even parsed; any instance may be shed (overloaded, DICOMweb 0xA700).
            body = response.json() if response.status_code in (202, 409) else {}
            failures = {f["index"]: f["code"] for f in body.get("failures", [])}
            shed = ("overloaded", "not_ready")
            good_ok = all(code in shed for index, code in failures.items() if index != 1)
            broken_ok = failures.get(1) in ("not_dicom", *shed)
            if (broken_ok and good_ok and len(body["results"]) + len(failures) == 3) or (
                response.status_code in SHED and "Retry-After" in response.headers
            ):
                response.success()
            else:
                response.failure(f"unexpected {response.status_code}: {response.text[:200]}")
