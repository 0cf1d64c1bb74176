"""What the load test sends and how it judges each answer: pure functions, used by the locustfile.

Request kinds (the `--mix` names), all with the DICOM as the raw Part 10 body (the README's curl calls):

| kind      | request                                                          | a success is                     |
| --------- | ---------------------------------------------------------------- | -------------------------------- |
| `predict` | `POST /v1/predict`, `Accept: application/json`                   | 200 and the JSON prediction      |
| `sr`      | `POST /v1/predict?format=sr` (DICOM Comprehensive SR, TID 1500)  | 200 and a DICOM Part 10 file     |
| `gsps`    | `POST /v1/predict?format=gsps` (Grayscale Presentation State)    | 200 and a DICOM Part 10 file     |
| `png`     | `POST /v1/predict`, `Accept: image/png`                          | 200 and a PNG                    |
| `studies` | `POST /v1/studies`, multipart/related, several instances (STOW)  | 200 and one result per instance  |

Anything else is a failure whose message says what it was: the HTTP status and the service's JSON error
code (`HTTP 429 overloaded: ...`), so locust's failure table counts each kind of error separately.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KINDS = ("predict", "sr", "gsps", "png", "studies")
DEFAULT_MIX = "predict=80,sr=10,studies=10"
STOW_BOUNDARY = "cxr-loadtest-boundary"
DICOM_CONTENT_TYPE = {"Content-Type": "application/dicom"}
STOW_CONTENT_TYPE = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MESSAGE_CHARS = 120  # of the service's error message kept in a failure (the code says what it was)


@dataclass(frozen=True)
class RequestSpec:
    path: str
    headers: dict[str, str]


REQUESTS = {
    "predict": RequestSpec("/v1/predict", DICOM_CONTENT_TYPE | {"Accept": "application/json"}),
    "sr": RequestSpec("/v1/predict?format=sr", DICOM_CONTENT_TYPE | {"Accept": "application/dicom"}),
    "gsps": RequestSpec("/v1/predict?format=gsps", DICOM_CONTENT_TYPE | {"Accept": "application/dicom"}),
    "png": RequestSpec("/v1/predict", DICOM_CONTENT_TYPE | {"Accept": "image/png"}),
    # The predictions themselves (not the DICOMweb store response), so failed instances come with error codes.
    "studies": RequestSpec("/v1/studies", STOW_CONTENT_TYPE | {"Accept": "application/json"}),
}


def parse_mix(text: str) -> dict[str, float]:
    """'predict=80,sr=10,studies=10' -> {kind: share}; the weights are relative (they need not add up to 100)."""
    mix: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        kind, sep, weight = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise ValueError(f"mix entry {item!r}: expected KIND=WEIGHT with KIND one of {', '.join(KINDS)}")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"mix entry {item!r}: the weight is not a number") from None
        if value < 0 or kind in mix:
            raise ValueError(f"mix entry {item!r}: weights must be given once each and be >= 0")
        mix[kind] = value
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"mix {text!r} has no positive weight")
    return {kind: weight / total for kind, weight in mix.items() if weight > 0}


def mix_text(mix: Mapping[str, float]) -> str:
    return ", ".join(f"{kind} {share:.0%}" for kind, share in mix.items())


def stow_body(instances: Sequence[bytes], boundary: str = STOW_BOUNDARY) -> bytes:
    """A multipart/related body with one application/dicom part per instance (DICOMweb STOW-RS)."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + instance + b"\r\n" for instance in instances) + f"--{boundary}--\r\n".encode()


def first_file(user_number: int, file_count: int) -> int:
    """Where user `user_number` (0, 1, 2, ... over every load generator process) starts in the file list."""
    return user_number % file_count


def global_user_number(local_number: int, process_index: int, processes: int) -> int:
    """Numbers users across the generator processes (locust workers) without collisions: 0..N-1 overall."""
    return local_number * processes + process_index


def service_error(body: bytes) -> tuple[str, str]:
    """(code, message) of the service's JSON error `{"error": {"code", "message"}}`; ('-', '') when it is not one."""
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), " ".join(str(error.get("message", "")).split())[:MESSAGE_CHARS]
    except (ValueError, KeyError, TypeError):
        return "-", ""


def failure_message(status: int, body: bytes, content_type: str = "") -> str:
    """`HTTP <status> <code>: <message>` for an answer that is not the expected one."""
    code, message = service_error(body)
    if code == "-":
        return f"HTTP {status} - (not the service's JSON error; {content_type or 'no content type'})"
    return f"HTTP {status} {code}: {message}" if message else f"HTTP {status} {code}"


def judge(kind: str, status: int, body: bytes, content_type: str, instances: int = 1) -> str | None:
    """None when the answer is what `kind` should get, else the failure message to count it under."""
    if status == 200:
        if kind == "predict" and body.startswith(b"{") and b'"findings"' in body:
            return None
        if kind in ("sr", "gsps") and body[128:132] == b"DICM":
            return None
        if kind == "png" and body.startswith(PNG_MAGIC):
            return None
        if kind == "studies":
            results = _json(body).get("results")
            if isinstance(results, list) and len(results) == instances:
                return None
        return f"HTTP 200 - (unexpected body for {kind}: {content_type or 'no content type'})"
    if kind == "studies" and status in (202, 409):  # STOW-RS: some / none of the instances succeeded
        failures = _json(body).get("failures") or []
        codes = sorted({str(f.get("code", "-")) for f in failures if isinstance(f, dict)})
        return f"HTTP {status} {'+'.join(codes) or '-'}: {len(failures)} of {instances} instances failed"
    return failure_message(status, body, content_type)


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


FAILURE_PATTERN = re.compile(r"HTTP (?P<status>\d{3}) (?P<code>[a-z0-9_+]+|-)")  # codes: snake_case, '+'-joined


def parse_failure(error: str) -> tuple[str, str]:
    """(status, code) back from a failure message as locust's failures CSV shows it (repr of the exception);
    ('no answer', exception name) for connection errors and timeouts."""
    found = FAILURE_PATTERN.search(error)
    if found:
        return found["status"], found["code"]
    name = re.match(r"\s*([A-Za-z_][\w.]*)", error)
    return "no answer", name.group(1) if name else "-"


class KindPicker:
    """Draws request kinds with the mix's shares from the user's own seeded generator (reproducible)."""

    def __init__(self, mix: Mapping[str, float], seed: int) -> None:
        self.kinds, self.weights = list(mix), list(mix.values())
        self.rng = random.Random(seed)

    def __call__(self) -> str:
        return self.rng.choices(self.kinds, self.weights)[0]


class ArrivalSchedule:
    """Open loop: Poisson arrivals at `rate_per_s`, each handed to whichever user asks for one first.

    A free user claims the next arrival and waits for its time; when every user is busy an arrival is
    claimed late, and the lag (how late its request left) is what the report shows: requests then queue
    in the generator instead of the service, so the test is no longer open loop (give it more --users).
    """

    def __init__(self, rate_per_s: float, seed: int, start: float) -> None:
        if rate_per_s <= 0:
            raise ValueError("the arrival rate must be positive")
        self.rate_per_s = rate_per_s
        self.rng = random.Random(seed)
        self.next_at = start + self.rng.expovariate(rate_per_s)

    def claim(self) -> float:
        """The time (same clock as `start`) at which the caller's request is due."""
        due = self.next_at
        self.next_at += self.rng.expovariate(self.rate_per_s)
        return due
