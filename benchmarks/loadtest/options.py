"""Parsing the load test's option values (pure functions; each raises ValueError with what was expected)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from benchmarks.loadtest.traffic import KINDS

RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}


DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?")


def parse_duration(text: str, allow_zero: bool = False) -> float:
    """Time spans as locust writes them: 90, 90s, 2m, 1m30s, 1h, and fractions (2.5s) -> seconds.

    Not locust.util.timespan: importing locust monkey-patches the importing process with gevent."""
    found = DURATION.fullmatch(text.strip().lower())
    if not found or not any(found.groupdict().values()):
        raise ValueError(f"{text!r}: expected a duration such as 60s, 2m or 1m30s")
    seconds = sum(float(found[unit] or 0) * scale for unit, scale in (("h", 3600), ("m", 60), ("s", 1)))
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def parse_warmup(text: str) -> float:
    """A duration that may be 0 (no warm-up)."""
    return parse_duration(text, allow_zero=True)


def parse_size(text: str) -> tuple[int, int]:
    """'1643x1349' -> (rows, columns), at least 64 each."""
    rows, _, cols = text.lower().partition("x")
    try:
        size = int(rows), int(cols)
    except ValueError:
        raise ValueError(f"{text!r}: expected ROWSxCOLUMNS such as 1643x1349") from None
    if min(size) < 64:
        raise ValueError(f"{text!r}: at least 64 pixels each way")
    return size


def parse_levels(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8): concurrency levels (users), each a positive integer, run in the given order."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{text!r}: expected comma-separated whole numbers such as 1,2,4,8") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"{text!r}: every level needs at least one user")
    return levels


def parse_rate(text: str) -> float:
    """'30/min', '0.5/s', '1200/h' -> requests per second."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*([a-z]+)\s*", text.lower())
    if not found or found[2] not in RATE_UNITS or float(found[1]) <= 0:
        raise ValueError(f"{text!r}: expected a rate such as 30/min, 2/s or 1200/h")
    return float(found[1]) / RATE_UNITS[found[2]]


def parse_rates(text: str) -> tuple[float, ...]:
    """'30/min,60/min' -> one open-loop level per rate (requests per second)."""
    rates = tuple(parse_rate(part) for part in text.split(",") if part.strip())
    if not rates:
        raise ValueError(f"{text!r}: expected one or more rates such as 30/min,60/min")
    return rates


def rate_text(per_s: float) -> str:
    return f"{per_s * 60:g}/min"


def parse_think_time(text: str) -> tuple[float, float]:
    """'0', '2' or '1-3' (seconds, optionally with an s) -> (min, max) pause after each answer, drawn uniformly."""
    parts = [part.strip().removesuffix("s") for part in text.split("-")]
    try:
        low, high = (float(parts[0]), float(parts[0])) if len(parts) == 1 else (float(parts[0]), float(parts[1]))
    except (ValueError, IndexError):
        raise ValueError(f"{text!r}: expected seconds (2) or a range (1-3)") from None
    if len(parts) > 2 or low < 0 or high < low:
        raise ValueError(f"{text!r}: expected seconds (2) or a range (1-3) with 0 <= min <= max")
    return low, high


@dataclass(frozen=True)
class Slo:
    """The objective every level is held to: p99 latency per request kind, and a largest share of failed requests."""

    p99_ms: float | None = None  # every kind without its own limit
    p99_ms_by_kind: dict[str, float] = field(default_factory=dict)
    max_error_rate: float = 0.001  # failed / all requests

    def p99_limit(self, kind: str) -> float | None:
        return self.p99_ms_by_kind.get(kind, self.p99_ms)

    @property
    def has_latency_objective(self) -> bool:
        return self.p99_ms is not None or bool(self.p99_ms_by_kind)

    def describe(self) -> str:
        parts = []
        if self.p99_ms is not None:
            parts.append(
                f"p99 ≤ {self.p99_ms:g} ms"
                + (" for every request kind" if not self.p99_ms_by_kind else " for the other kinds")
            )
        parts += [f"{kind} p99 ≤ {limit:g} ms" for kind, limit in self.p99_ms_by_kind.items()]
        if not parts:
            parts.append("no latency objective (--slo-p99-ms not given)")
        return "; ".join(parts) + f"; at most {self.max_error_rate:.2%} of requests failed"


def parse_slo(p99_text: str | None, error_rate_percent: float) -> Slo:
    """'--slo-p99-ms 800' or '800,studies=3000' or 'predict=500,studies=3000'; the error rate in percent."""
    if not 0 <= error_rate_percent <= 100:
        raise ValueError(f"--slo-error-rate {error_rate_percent:g}: a percentage between 0 and 100")
    default, by_kind = None, {}
    for item in (part.strip() for part in (p99_text or "").split(",") if part.strip()):
        kind, sep, value = item.rpartition("=")
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"--slo-p99-ms entry {item!r}: expected MS or KIND=MS") from None
        if limit <= 0:
            raise ValueError(f"--slo-p99-ms entry {item!r}: the limit must be positive")
        if not sep:
            default = limit
        elif kind in KINDS:
            by_kind[kind] = limit
        else:
            raise ValueError(f"--slo-p99-ms entry {item!r}: the kind must be one of {', '.join(KINDS)}")
    return Slo(default, by_kind, error_rate_percent / 100)
