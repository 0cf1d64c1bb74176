"""Results of a benchmark run: the data kept, the targets checked, the markdown summary and the plots.

Everything here is pure (results in, text or files out), so it is tested on made-up measurements
(tests/test_benchmarks.py) without running any load. Every number a summary shows comes from the
`Results` it is given, which the run that measured them wrote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.inprocess import BatchRate, best_rate

OURS = "ours"
PIPELINE_RATIO_TARGET = 0.9


@dataclass(frozen=True)
class HttpLevel:
    service: str
    input_set: str
    users: int  # concurrency: closed-loop users, each with one request in flight
    requests: int  # in the measured window, failures included
    failures: int
    rps: float  # successful requests per second over the measured window
    p50_ms: float
    p95_ms: float
    p99_ms: float
    measured_s: float
    server_cpu_cores: float  # CPU time of the server's process tree / measured wall time
    locust_cpu_cores: float  # the load generator's own CPU use, on the same cores


@dataclass(frozen=True)
class Footprint:
    service: str
    cold_start_s: float  # process spawned -> first 200 from /readyz
    processes: int  # most processes seen in the tree at once
    ready_rss_mib: float  # right after ready, before any request (decode workers may start on the first one)
    ready_pss_mib: float
    peak_rss_mib: float  # largest sample while under load
    peak_pss_mib: float
    after_rss_mib: float  # after the last level, idle again
    after_pss_mib: float


@dataclass(frozen=True)
class TargetCheck:
    target: str
    input_set: str
    met: bool | None  # None: could not be evaluated (a measurement is missing)
    detail: str


@dataclass
class Results:
    command: str
    mode: str
    machine: dict[str, str]
    plan: dict
    input_sets: list[dict]
    services: dict[str, dict]  # name -> {"title", "configuration"}
    model_only: list[BatchRate] = field(default_factory=list)
    pipeline: list[BatchRate] = field(default_factory=list)
    http: list[HttpLevel] = field(default_factory=list)
    footprints: list[Footprint] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # service -> why it was not measured
    started_at: str = ""
    duration_s: float = 0.0
    rendered_commit: str = ""  # set by --rerender: the commit whose report code drew this summary from results.json


def results_from_json(data: dict) -> Results:
    """A Results back from its results.json (to render the summary and plots again without measuring)."""
    return Results(
        **(
            data
            | {
                "model_only": [BatchRate(**r) for r in data["model_only"]],
                "pipeline": [BatchRate(**r) for r in data["pipeline"]],
                "http": [HttpLevel(**level) for level in data["http"]],
                "footprints": [Footprint(**f) for f in data["footprints"]],
            }
        )
    )


# --- targets -------------------------------------------------------------------------------------


def levels_of(http: Sequence[HttpLevel], service: str, input_set: str) -> list[HttpLevel]:
    return sorted(
        (level for level in http if level.service == service and level.input_set == input_set),
        key=lambda level: level.users,
    )


ROUGH_MIN_REQUESTS = 30


def is_rough(level: HttpLevel) -> bool:
    """Too few answers in the window, or latencies near its length, for the rate to be more than a rough figure."""
    return level.requests < ROUGH_MIN_REQUESTS or level.p50_ms / 1e3 > level.measured_s / 3


def judged(levels: Sequence[HttpLevel], clean_only: bool) -> list[HttpLevel]:
    """The levels a verdict may use: answered, not rough (marked † in the tables) and, with `clean_only`, without any
    failed request. A rough level's rate is too uncertain to decide a target either way."""
    return [
        level
        for level in levels
        if level.requests > 0 and not is_rough(level) and (level.failures == 0 or not clean_only)
    ]


def peak(levels: Sequence[HttpLevel], clean_only: bool) -> HttpLevel | None:
    """The judged level (see `judged`) with the most successful requests/s."""
    candidates = judged(levels, clean_only)
    return max(candidates, key=lambda level: level.rps) if candidates else None


def check_pipeline_ratio(http: Sequence[HttpLevel], pipeline: Sequence[BatchRate], input_set: str) -> TargetCheck:
    """Our best HTTP throughput (levels without failures) against the in-process pipeline's best batch size."""
    target = f"HTTP throughput ≥ {PIPELINE_RATIO_TARGET:g} × in-process pipeline"
    ours, inprocess = peak(levels_of(http, OURS, input_set), clean_only=True), best_rate(pipeline, input_set)
    if ours is None or inprocess is None:
        return TargetCheck(target, input_set, None, "not measured (or only rough levels)")
    ratio = ours.rps / inprocess.images_per_s
    return TargetCheck(
        target,
        input_set,
        ratio >= PIPELINE_RATIO_TARGET,
        f"{ours.rps:.2f} req/s (concurrency {ours.users}) vs {inprocess.images_per_s:.2f} images/s "
        f"(batch {inprocess.batch_size}): ratio {ratio:.2f}",
    )


def check_peer(http: Sequence[HttpLevel], peer: str, input_set: str, peer_title: str) -> TargetCheck:
    """Met when some level of ours (without failures) delivers at least the peer's peak throughput at a
    p99 no worse than the peer's p99 at that peak. The peer's peak may include failed requests (its
    rate counts only successes): lenient to the peer, strict to us."""
    target = f"throughput ≥ {peer_title} at equal or better p99"
    peer_peak = peak(levels_of(http, peer, input_set), clean_only=False)
    ours = judged(levels_of(http, OURS, input_set), clean_only=True)
    if peer_peak is None or not ours:
        return TargetCheck(target, input_set, None, "not measured (or only rough levels)")
    eligible = [level for level in ours if level.p99_ms <= peer_peak.p99_ms]
    best = max(eligible, key=lambda level: level.rps) if eligible else None
    peer_text = (
        f"{peer_title} peak {peer_peak.rps:.2f} req/s at p99 {peer_peak.p99_ms:.0f} ms (concurrency {peer_peak.users})"
    )
    if best is None:
        return TargetCheck(target, input_set, False, f"{peer_text}; no level of ours has a p99 that low")
    return TargetCheck(
        target,
        input_set,
        best.rps >= peer_peak.rps,
        f"{peer_text}; ours {best.rps:.2f} req/s at p99 {best.p99_ms:.0f} ms (concurrency {best.users}): "
        f"{best.rps / peer_peak.rps:.2f}× the peer",
    )


def target_checks(results: Results) -> list[TargetCheck]:
    checks = []
    for spec in results.input_sets:
        name = spec["name"]
        checks.append(check_pipeline_ratio(results.http, results.pipeline, name))
        for service, info in results.services.items():
            if service != OURS:
                checks.append(check_peer(results.http, service, name, info["title"]))
    return checks


# --- markdown --------------------------------------------------------------------------------------


def verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not evaluated"}[met]


def number(value: float, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """A markdown table; `align` holds one 'l' or 'r' per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(rule) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def inprocess_table(results: Results) -> list[str]:
    sets = [spec["name"] for spec in results.input_sets]
    batch_sizes = sorted({rate.batch_size for rate in results.model_only + results.pipeline})
    best = {name: best_rate(results.pipeline, name) for name in sets}
    best_model = best_rate(results.model_only, "model-only")

    def cell(rates: Sequence[BatchRate], name: str, batch_size: int, winner: BatchRate | None) -> str:
        rate = next((r for r in rates if r.input_set == name and r.batch_size == batch_size), None)
        if rate is None:
            return "–"
        text = f"{rate.images_per_s:.2f}"
        return f"**{text}**" if winner is not None and rate == winner else text

    rows = [
        [
            str(size),
            cell(results.model_only, "model-only", size, best_model),
            *(cell(results.pipeline, name, size, best[name]) for name in sets),
        ]
        for size in batch_sizes
    ]
    return table(["batch size", "model only (images/s)", *(f"pipeline, {name} (images/s)" for name in sets)], rows)


def http_table(results: Results, input_set: str) -> list[str]:
    services = [name for name in results.services if levels_of(results.http, name, input_set)]
    users = sorted({level.users for level in results.http if level.input_set == input_set})
    rows = []
    for count in users:
        row = [str(count)]
        for service in services:
            level = next((lv for lv in levels_of(results.http, service, input_set) if lv.users == count), None)
            row.append(
                "–"
                if level is None
                else f"{level.rps:.2f} ({number(level.p50_ms, 0)} / {number(level.p95_ms, 0)} / "
                f"{number(level.p99_ms, 0)})"
                + (" †" if is_rough(level) else "")
                + (f" ⚠ {level.failures} failed" if level.failures else "")
            )
        rows.append(row)
    return table(["concurrency", *(results.services[s]["title"] for s in services)], rows)


def http_details_table(results: Results, input_set: str) -> list[str]:
    rows = [
        [
            results.services[level.service]["title"],
            str(level.users),
            str(level.requests),
            str(level.failures),
            f"{level.measured_s:.1f}",
            f"{level.server_cpu_cores:.2f}",
            f"{level.locust_cpu_cores:.2f}",
        ]
        for service in results.services
        for level in levels_of(results.http, service, input_set)
    ]
    return table(
        ["service", "concurrency", "requests", "failed", "measured s", "server CPU (cores)", "locust CPU (cores)"],
        rows,
        "lrrrrrr",
    )


def footprint_table(results: Results) -> list[str]:
    rows = [
        [
            results.services[f.service]["title"],
            number(f.cold_start_s),
            str(f.processes),
            *(
                f"{number(ready, 0)} / {number(peak, 0)} / {number(after, 0)}"
                for ready, peak, after in (
                    (f.ready_rss_mib, f.peak_rss_mib, f.after_rss_mib),
                    (f.ready_pss_mib, f.peak_pss_mib, f.after_pss_mib),
                )
            ),
        ]
        for f in results.footprints
    ]
    return table(
        ["service", "cold start (s)", "processes", "RSS MiB (ready / peak / after)", "PSS MiB (ready / peak / after)"],
        rows,
    )


def header_section(results: Results) -> list[str]:
    lines = [
        f"# Throughput and latency ({results.mode} run)",
        "",
        f"Command: `{results.command}`  ",
        f"Started {results.started_at}, took {results.duration_s / 60:.1f} min. Every number below was measured "
        "by this run; the raw data is beside this file (results.json, CSVs, locust/).",
        "",
    ]
    if results.rendered_commit:
        lines += [
            f"Re-rendered (`--rerender`, nothing measured again) by commit {results.rendered_commit}, with that "
            "commit's verdict rules; the numbers are the run's, at the commit under Machine.",
            "",
        ]
    if results.mode == "quick":
        lines += [
            "> **Smoke run** (`--quick`: a few seconds per level): it checks that everything runs; its numbers "
            "are too short-lived to be results.",
            "",
        ]
    return lines


def machine_section(results: Results) -> list[str]:
    return [
        "## Machine",
        "",
        *table(["", ""], [[key, value] for key, value in results.machine.items()], "ll"),
        "",
        "The load generator (locust) runs on the same machine and competes for the same cores; the CPU it used "
        "(start-up included) is in the details tables beside the server's.",
        "",
    ]


def inputs_section(results: Results) -> list[str]:
    return [
        "## Inputs",
        "",
        *(
            f"- **{spec['name']}**: {spec['count']} distinct {spec['rows']}×{spec['cols']} phantoms "
            f"(`training.synthetic`, seeds {spec['first_seed']}–{spec['first_seed'] + spec['count'] - 1}), "
            f"{spec['description']}, {spec['mean_mib']:.1f} MiB per file on average."
            for spec in results.input_sets
        ),
        "",
    ]


def targets_section(results: Results) -> list[str]:
    lines = [
        "## Targets",
        "",
        *table(
            ["target", "input set", "result", "measured"],
            [[c.target, c.input_set, verdict(c.met), c.detail] for c in target_checks(results)],
            "llll",
        ),
        "",
        "Rules: our HTTP throughput is the best successful requests/s over the concurrency levels that had no "
        "failed request; the pipeline's is its best batch size. Against a peer, the target is met when some level "
        "of ours (no failures) serves at least the peer's peak throughput with a p99 no higher than the peer's p99 "
        "at that peak (the peer's peak may include failed requests). Rough levels (marked †: fewer than "
        f"{ROUGH_MIN_REQUESTS} answers in the window, or a p50 above a third of it) count for no verdict.",
        "",
    ]
    for service, reason in results.skipped.items():
        title = results.services.get(service, {}).get("title", service)
        lines += [f"- **{title} was not (fully) measured**: {reason}", ""]
    return lines


def inprocess_section(results: Results) -> list[str]:
    return [
        "## In-process throughput (no HTTP)",
        "",
        *inprocess_table(results),
        "",
        "Pipeline = `service.dicom.pipeline.prepare` routed as the service routes it "
        f"({results.plan.get('decode_workers', '?')} "
        "threads for uncompressed pixel data, as many worker processes for compressed syntaxes) "
        "→ batch → both models → postprocess to the JSON answer; models only = both models on ready-made "
        "tensors. Best batch size in bold.",
        "",
    ]


def http_section(results: Results, input_set: str) -> list[str]:
    return [
        f"## HTTP, {input_set} inputs",
        "",
        "Successful requests/s (p50 / p95 / p99 latency in ms) per concurrency:",
        "",
        *http_table(results, input_set),
        "",
        f"† rough: fewer than {ROUGH_MIN_REQUESTS} answers in the measured window, or a median latency above a "
        "third of it. ⚠ requests that got no 200 (not counted in the rate). The rate is successful answers over "
        "the measured window (warm-up excluded), not locust's own Requests/s column.",
        "",
        *http_details_table(results, input_set),
        "",
    ]


def footprint_section(results: Results) -> list[str]:
    return [
        "## Cold start and memory",
        "",
        *footprint_table(results),
        "",
        "Cold start: process spawned → first 200 from `/readyz`. Memory at ready (before any request), peak "
        "while under load (sampled every 5 s), and after the last level, summed over the server's whole process "
        "tree (server, decode workers, a framework's daemons and replicas), read from /proc. RSS counts shared "
        "pages once per process; PSS splits them, so it adds up to what the tree occupies.",
        "",
    ]


def configuration_section(results: Results) -> list[str]:
    plan = results.plan
    return [
        "## Configurations",
        "",
        *(
            f"- **{info['title']}**: {info['configuration']}"
            + (f" Models ran on {', '.join(info['providers'])}." if info.get("providers") else "")
            for info in results.services.values()
        ),
        "",
        "Load: locust headless, closed loop (no think time), each user posts the set's files in turn to "
        f"`POST /v1/predict` as `application/dicom`; {plan['run_time_s']:g} s per level, statistics reset after "
        f"the first {plan['warmup_s']:g} s (warm-up). Locust rounds latencies above 100 ms to two significant "
        "digits. Server CPU is the CPU time of its process tree over the measured window, in cores.",
        "",
    ]


def render_summary(results: Results, plots: Sequence[str] = ()) -> str:
    lines = [
        *header_section(results),
        *machine_section(results),
        *inputs_section(results),
        *targets_section(results),
        *inprocess_section(results),
    ]
    for spec in results.input_sets:
        lines += http_section(results, spec["name"])
    lines += [*footprint_section(results), *configuration_section(results)]
    if plots:
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({Path(p).name})" for p in plots), ""]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def log_axes(axis, x_ticks: Sequence[int], log_y: bool) -> None:
    """Log axes labelled with plain numbers (1, 2, 5 × 10^n on y) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda value, _position: f"{value:g}")
    axis.set_xscale("log")
    axis.set_xticks(list(x_ticks) or [1])
    axis.xaxis.set_major_formatter(plain)
    axis.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(NullFormatter())
    axis.grid(alpha=0.3, which="both")


def plot_throughput(results: Results, path: Path) -> Path:
    plt = pyplot()
    sets = [spec["name"] for spec in results.input_sets]
    figure, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), squeeze=False)
    for axis, name in zip(axes[0], sets, strict=True):
        for service, info in results.services.items():
            levels = levels_of(results.http, service, name)
            if levels:
                axis.plot([lv.users for lv in levels], [lv.rps for lv in levels], marker="o", label=info["title"])
        best = best_rate(results.pipeline, name)
        if best is not None:
            axis.axhline(
                best.images_per_s, linestyle="--", color="grey", label=f"in-process pipeline (batch {best.batch_size})"
            )
        log_axes(axis, sorted({lv.users for lv in results.http if lv.input_set == name}), log_y=False)
        axis.set(xlabel="concurrency (users)", ylabel="successful requests/s", title=f"{name} inputs")
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
    return save_figure(plt, figure, path)


def save_figure(plt, figure, path: Path) -> Path:
    """Write a finished figure as PNG and free it (pyplot keeps every open figure alive)."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_latency(results: Results, path: Path) -> Path:
    plt = pyplot()
    sets = [spec["name"] for spec in results.input_sets]
    percentiles = (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))
    figure, axes = plt.subplots(len(sets), 3, figsize=(15, 4 * len(sets)), squeeze=False)
    for row, name in zip(axes, sets, strict=True):
        for axis, (attribute, title) in zip(row, percentiles, strict=True):
            for service, info in results.services.items():
                levels = levels_of(results.http, service, name)
                if levels:
                    axis.plot(
                        [lv.users for lv in levels],
                        [getattr(lv, attribute) for lv in levels],
                        marker="o",
                        label=info["title"],
                    )
            log_axes(axis, sorted({lv.users for lv in results.http if lv.input_set == name}), log_y=True)
            axis.set(xlabel="concurrency (users)", ylabel="latency (ms)", title=f"{title}, {name} inputs")
            axis.legend(fontsize=8)
    return save_figure(plt, figure, path)


def plot_inprocess(results: Results, path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in ["model-only", *(spec["name"] for spec in results.input_sets)]:
        rates = sorted(
            (r for r in results.model_only + results.pipeline if r.input_set == name), key=lambda r: r.batch_size
        )
        if rates:
            axis.plot(
                [r.batch_size for r in rates],
                [r.images_per_s for r in rates],
                marker="o",
                label="models only" if name == "model-only" else f"pipeline, {name}",
            )
    log_axes(axis, sorted({r.batch_size for r in results.model_only + results.pipeline}), log_y=True)
    axis.set(xlabel="batch size", ylabel="images/s", title="In-process throughput")
    axis.legend(fontsize=8)
    return save_figure(plt, figure, path)
