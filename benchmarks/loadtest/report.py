"""The load test's verdict and report: every level against the objective, markdown, CSVs, JSON and plots.

Pure (results in, text or files out), so tests/test_loadtest.py checks it on made-up results. Every number
a report shows comes from the LevelResults the run measured. Nothing here ever sees the API key.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadtest.options import Slo
from benchmarks.loadtest.runner import ErrorCount, KindStats, Level, LevelResult
from benchmarks.report import log_axes, number, pyplot, save_figure, table

LATE_ARRIVALS_LIMIT = 0.01  # open loop: above this share of late arrivals the rate was not really offered
GENERATOR_BUSY_SHARE = 0.7  # of this machine's usable cores: the load generator may have limited the load


@dataclass(frozen=True)
class Verdict:
    met: bool
    reasons: tuple[str, ...]  # why not, one per objective missed (empty when met)


def check_level(result: LevelResult, slo: Slo) -> Verdict:
    """The level meets the objective when every request kind's p99 is within its limit, the share of failed
    requests is at most the allowed one, some request succeeded, and (open loop) the rate was really offered."""
    reasons = []
    if result.total.requests - result.total.failures <= 0:
        reasons.append("no request succeeded")
    for stats in result.kinds:
        limit = slo.p99_limit(stats.kind)
        if limit is not None and not stats.p99_ms <= limit:  # a NaN p99 (no answer at all) misses too
            reasons.append(f"{stats.kind} p99 {number(stats.p99_ms, 0)} ms > {limit:g} ms")
    if result.error_rate > slo.max_error_rate:
        reasons.append(f"{result.error_rate:.2%} of requests failed (> {slo.max_error_rate:.2%})")
    arrivals = result.counters.get("arrivals", 0)
    if result.level.arrival_rate_per_s is not None and arrivals:
        late = result.counters.get("late_arrivals", 0) / arrivals
        if late > LATE_ARRIVALS_LIMIT:
            reasons.append(
                f"{late:.1%} of arrivals waited for a free user (max {result.max_lag_s:.1f} s): the service "
                f"held all {result.level.users} in flight; raise --users to keep the loop open"
            )
    return Verdict(not reasons, tuple(reasons))


@dataclass
class Report:
    command: str  # as run, the API key replaced by REDACTED
    host: str  # without credentials
    started_at: str
    slo: Slo
    levels: list[LevelResult] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    service: dict[str, str] = field(default_factory=dict)  # display strings: pack, providers, TLS, auth
    load: dict[str, str] = field(default_factory=dict)  # display strings: mix, inputs, warm-up, generator
    warnings: list[str] = field(default_factory=list)
    stopped_early: str = ""  # why fewer levels ran than planned
    planned_levels: int = 0
    duration_s: float = 0.0
    open_loop: bool = False

    def verdicts(self) -> list[Verdict]:
        return [check_level(result, self.slo) for result in self.levels]

    @property
    def passed(self) -> bool:
        return bool(self.levels) and not self.stopped_early and all(v.met for v in self.verdicts())


def best_within_slo(report: Report) -> LevelResult | None:
    """The level with the most successful requests per second among those meeting the objective."""
    met = [result for result, verdict in zip(report.levels, report.verdicts(), strict=True) if verdict.met]
    return max(met, key=lambda result: result.total.rps) if met else None


# --- markdown -------------------------------------------------------------------------------------------


def verdict_text(verdict: Verdict) -> str:
    return "**met**" if verdict.met else "**missed**: " + "; ".join(verdict.reasons)


def level_heading(report: Report) -> str:
    return "arrival rate (users)" if report.open_loop else "users"


def level_cell(report: Report, level: Level) -> str:
    return f"{level.label} ({level.users})" if report.open_loop else str(level.users)


def arrivals_cell(result: LevelResult) -> str:
    """Open loop: arrivals per minute that left, and how many of them late (waiting for a free user)."""
    arrivals = result.counters.get("arrivals", 0)
    return f"{arrivals / result.measured_s * 60:.0f} ({int(result.counters.get('late_arrivals', 0))} late)"


def levels_table(report: Report) -> list[str]:
    server = any(r.server_cpu_cores is not None for r in report.levels)
    rows = [
        [
            level_cell(report, r.level),
            *([arrivals_cell(r)] if report.open_loop else []),
            f"{r.total.rps:.2f}",
            f"{r.images_per_s:.2f}",
            number(r.total.p50_ms, 0),
            number(r.total.p95_ms, 0),
            number(r.total.p99_ms, 0),
            number(r.total.max_ms, 0),
            f"{r.total.failures} ({r.error_rate:.2%})" if r.total.requests else "–",
            f"{number(r.generator_cpu_cores, 2)}" + (" ⚠" if r.cpu_warning else ""),
            *([number(r.server_cpu_cores, 2), number(r.server_peak_rss_mib, 0)] if server else []),
            verdict_text(v),
        ]
        for r, v in zip(report.levels, report.verdicts(), strict=True)
    ]
    header = [
        level_heading(report),
        *(["sent/min"] if report.open_loop else []),
        "requests/s",
        "images/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "failed",
        "generator CPU (cores)",
        *(["server CPU (cores)", "server RSS peak MiB"] if server else []),
        "objective",
    ]
    return table(header, rows, "l" + "r" * (len(header) - 2) + "l")


def kinds_table(report: Report) -> list[str]:
    rows = [
        [
            level_cell(report, r.level),
            k.kind,
            str(k.requests),
            f"{k.rps:.2f}",
            number(k.p50_ms, 0),
            number(k.p95_ms, 0),
            number(k.p99_ms, 0),
            number(k.max_ms, 0),
            str(k.failures),
            "–" if report.slo.p99_limit(k.kind) is None else f"{report.slo.p99_limit(k.kind):g}",
        ]
        for r in report.levels
        for k in r.kinds
    ]
    return table(
        [
            level_heading(report),
            "kind",
            "requests",
            "successful/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "failed",
            "p99 limit ms",
        ],
        rows,
        "llrrrrrrrr",
    )


def errors_section(report: Report) -> list[str]:
    rows = [
        [level_cell(report, r.level), e.kind, e.status, f"`{e.code}`", str(e.count), e.example.replace("|", "\\|")]
        for r in report.levels
        for e in r.errors
    ]
    if not rows:
        return ["## Errors", "", "No request failed in any measured window.", ""]
    return [
        "## Errors",
        "",
        "By HTTP status and the service's error code (`no answer`: the connection failed or timed out; the "
        "code is then the exception). The example is locust's failure text for the first one.",
        "",
        *table([level_heading(report), "kind", "HTTP", "code", "count", "example"], rows, "llllrl"),
        "",
    ]


def capacity_line(report: Report) -> str:
    best = best_within_slo(report)
    if best is None:
        return "No level met the objective."
    return (
        f"Most throughput within the objective: **{best.total.rps:.2f} requests/s** ({best.images_per_s:.2f} "
        f"images/s) at {best.level.label}, p99 {number(best.total.p99_ms, 0)} ms."
    )


def generator_notes(report: Report) -> list[str]:
    notes = []
    for result in report.levels:
        if result.cpu_warning:
            notes.append(
                f"- {result.level.label}: locust saw a load generator process above 90% CPU; the generator "
                'may have limited the load (add workers, README "Load-test your deployment").'
            )
        if result.workers and result.workers_flushed < result.workers:
            notes.append(
                f"- {result.level.label}: only {result.workers_flushed} of {result.workers} workers sent "
                "their last report in time; their last seconds are missing from the counts."
            )
    return [*notes, ""] if notes else []


def summary_header(report: Report) -> list[str]:
    verdicts = report.verdicts()
    missed = sum(not v.met for v in verdicts)
    stopped = f" Stopped early: {report.stopped_early}." if report.stopped_early else ""
    if report.passed:
        headline = "**PASS**: " + (
            "the level met the objective." if len(verdicts) == 1 else f"all {len(verdicts)} levels met the objective."
        )
    elif missed:
        headline = f"**FAIL**: {missed} of {len(verdicts)} levels missed the objective.{stopped}"
    else:
        headline = f"**INCOMPLETE**: {len(verdicts)} of {report.planned_levels} planned levels ran.{stopped}"
    return [
        f"# Load test of {report.host}",
        "",
        headline,
        "",
        f"Objective: {report.slo.describe()}.  ",
        capacity_line(report),
        "",
        f"Command: `{report.command}`  ",
        f"Started {report.started_at}, took {report.duration_s / 60:.1f} min. Every number below was measured by "
        "this run; the raw data is beside this file.",
        "",
    ]


def render_summary(report: Report, plots: Sequence[Path] = ()) -> str:
    lines = summary_header(report)
    if report.warnings:
        lines += ["Warnings:", "", *(f"- {warning}" for warning in report.warnings), ""]
    lines += [
        "## Levels",
        "",
        "Successful requests and images per second over the measured window (warm-up excluded); latencies "
        "of every request, failed ones included (locust rounds those above 100 ms to two significant "
        "digits). Generator CPU: the CPU time of every locust process (remote workers too) over the window, "
        "in cores; ⚠ locust saw one of them above 90% CPU.",
        "",
        *levels_table(report),
        "",
        *generator_notes(report),
        "## Per request kind",
        "",
        *kinds_table(report),
        "",
        *errors_section(report),
    ]
    if plots:
        lines += ["## Plots", "", *(f"![{path.stem}]({path.name})" for path in plots), ""]
    lines += [
        "## Service under test",
        "",
        *table(["", ""], [[k, v] for k, v in report.service.items()], "ll"),
        "",
        "## Load",
        "",
        *table(["", ""], [[k, v] for k, v in report.load.items()], "ll"),
        "",
        "## Load generator machine",
        "",
        *table(["", ""], [[k, v] for k, v in report.machine.items()], "ll"),
        "",
        "## Files",
        "",
        "- `levels.csv`, `requests.csv`, `errors.csv`: the tables above; `results.json`: everything",
        "- `locust/level-NN_stats.csv`, `_failures.csv`, `_exceptions.csv`, `_stats_history.csv`: locust's own, "
        "per level; `level-NN.html`: locust's HTML report; `_window.json`: the measured window; `_locust.log`",
        "",
    ]
    return "\n".join(lines) + "\n"


# --- CSV and JSON ------------------------------------------------------------------------------------------


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def optional(value: float | None, digits: int) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def level_columns(level: Level) -> list:
    return [level.index, level.users, "" if level.arrival_rate_per_s is None else f"{level.arrival_rate_per_s * 60:g}"]


LEVEL_HEADER = ["level", "users", "arrival_rate_per_min"]
STATS_FIELDS = [f.name for f in dataclasses.fields(KindStats)]
ERROR_FIELDS = [f.name for f in dataclasses.fields(ErrorCount)]


def write_tables(report: Report, out: Path) -> None:
    verdicts = report.verdicts()
    write_csv(
        out / "levels.csv",
        [
            *LEVEL_HEADER,
            "measured_s",
            *STATS_FIELDS[1:],
            "error_rate",
            "images_per_s",
            "generator_cpu_cores",
            "arrivals",
            "late_arrivals",
            "max_lag_s",
            "server_cpu_cores",
            "server_peak_rss_mib",
            "objective_met",
            "reasons",
        ],
        [
            [
                *level_columns(r.level),
                f"{r.measured_s:.3f}",
                *dataclasses.astuple(r.total)[1:],
                f"{r.error_rate:.6f}",
                f"{r.images_per_s:.4f}",
                f"{r.generator_cpu_cores:.3f}",
                r.counters.get("arrivals", ""),
                r.counters.get("late_arrivals", ""),
                f"{r.max_lag_s:.3f}",
                optional(r.server_cpu_cores, 3),
                optional(r.server_peak_rss_mib, 1),
                v.met,
                "; ".join(v.reasons),
            ]
            for r, v in zip(report.levels, verdicts, strict=True)
        ],
    )
    write_csv(
        out / "requests.csv",
        [*LEVEL_HEADER, *STATS_FIELDS],
        [[*level_columns(r.level), *dataclasses.astuple(k)] for r in report.levels for k in [r.total, *r.kinds]],
    )
    write_csv(
        out / "errors.csv",
        [*LEVEL_HEADER, *ERROR_FIELDS],
        [[*level_columns(r.level), *dataclasses.astuple(e)] for r in report.levels for e in r.errors],
    )
    record = dataclasses.asdict(report) | {
        "verdicts": [dataclasses.asdict(v) for v in verdicts],
        "passed": report.passed,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1, default=str))


# --- plots ---------------------------------------------------------------------------------------------------


def x_label(report: Report) -> str:
    return "offered arrival rate (requests/min)" if report.open_loop else "concurrency (users)"


def plot_throughput(report: Report, path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    xs = [r.level.x for r in report.levels]
    axis.plot(xs, [r.total.rps for r in report.levels], marker="o", label="successful requests/s")
    axis.plot(xs, [r.images_per_s for r in report.levels], marker="s", label="images/s (a study carries several)")
    if report.open_loop:
        axis.plot(xs, [x / 60 for x in xs], linestyle="--", color="grey", label="offered requests/s")
    for result, verdict in zip(report.levels, report.verdicts(), strict=True):
        if not verdict.met:
            axis.plot([result.level.x], [result.total.rps], marker="x", color="red", markersize=10)
    axis.plot([], [], marker="x", color="red", linestyle="none", label="objective missed")
    log_axes(axis, xs, log_y=False)
    axis.set(xlabel=x_label(report), ylabel="per second", title=f"Throughput, {report.host}")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    return save_figure(plt, figure, path)


def plot_latency(report: Report, path: Path) -> Path:
    """p50 / p95 / p99 per request kind against the level, the objective's limits drawn on the p99 panel."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    xs = [r.level.x for r in report.levels]
    series = ["all", *dict.fromkeys(k.kind for r in report.levels for k in r.kinds)]
    for axis, (attribute, title) in zip(axes, (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")), strict=True):
        for kind in series:
            points = [
                (r.level.x, getattr(stats, attribute))
                for r in report.levels
                for stats in [r.total, *r.kinds]
                if stats.kind == kind and not math.isnan(getattr(stats, attribute))
            ]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=kind, linewidth=2.5 if kind == "all" else 1.2)
        if attribute == "p99_ms":
            limits = ([("p99 limit", report.slo.p99_ms)] if report.slo.p99_ms is not None else []) + [
                (f"{kind} p99 limit", limit) for kind, limit in report.slo.p99_ms_by_kind.items()
            ]
            for (label, limit), style in zip(
                limits, ("--", ":", "-.", (0, (5, 5)), (0, (1, 3)), (0, (3, 1, 1, 1))), strict=False
            ):
                axis.axhline(limit, linestyle=style, color="red", alpha=0.6, label=label)
        log_axes(axis, xs, log_y=True)
        axis.set(xlabel=x_label(report), ylabel="latency (ms)", title=f"{title} latency")
        axis.legend(fontsize=8)
    return save_figure(plt, figure, path)


def write_report(report: Report, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_tables(report, out)
    plots = (
        [plot_throughput(report, out / "throughput.png"), plot_latency(report, out / "latency.png")]
        if report.levels
        else []
    )
    summary = out / "summary.md"
    summary.write_text(render_summary(report, plots))
    return summary
