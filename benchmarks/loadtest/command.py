"""python -m benchmarks.loadtest: load-test a deployment of the service and judge it against an objective.

    python -m benchmarks.loadtest --host https://cxr.hospital.example --sweep 1,2,4,8 --duration 60s \\
        --slo-p99-ms 2000 [--dicoms DIR] [--mix predict=80,sr=10,studies=10] [--out DIR]

The API key comes from --api-key or CXR_LOADTEST_API_KEY (neither is ever printed or written to the report).
Checks first that the host answers, that TLS verifies (--ca-bundle FILE, or --insecure) and that the key is
accepted; then runs each level with locust (headless): warm-up discarded, then --duration measured.
Without --dicoms it sends generated phantoms. Results under --out: summary.md, CSVs, results.json, plots,
and locust's own CSVs and HTML report per level.

Exit status: 0 every level met the objective, 1 a level missed it, 2 the test could not run.

More load than one process can generate: --workers N starts N local locust worker processes under a master;
--master --expect-workers M waits for M workers started on other machines with
`python -m benchmarks.loadtest --worker --master-host THIS_HOST` (see the README, "Load-test your deployment").
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.loadtest import dicoms
from benchmarks.loadtest.options import (
    parse_duration,
    parse_levels,
    parse_rates,
    parse_size,
    parse_slo,
    parse_think_time,
    parse_warmup,
)
from benchmarks.loadtest.preflight import CannotRun, check_service, display_url, normalise_host, tls_verify
from benchmarks.loadtest.runner import DONE_FILE_ENV, ROOT, Generator, Level, LevelResult, run_level, worker_command
from benchmarks.loadtest.traffic import DEFAULT_MIX, mix_text, parse_mix
from benchmarks.machine import describe_host, load_average
from benchmarks.progress import Progress
from benchmarks.sampling import TreeSampler, cpu_cores_between

API_KEY_ENV = "CXR_LOADTEST_API_KEY"
DEFAULT_SWEEP = "1,2,4,8,16"
DEFAULT_OPEN_LOOP_USERS = 64
RESULTS = ROOT / "benchmarks" / "results" / "loadtest"
SECRET_OPTIONS = ("--api-key",)
REDACTED = "REDACTED"


def redacted_command(argv: list[str]) -> str:
    """The command line as run, with the value of --api-key replaced by REDACTED."""
    shown, hide_next = [], False
    for arg in argv:
        if hide_next:
            shown.append(REDACTED)
            hide_next = False
        elif arg in SECRET_OPTIONS:
            shown.append(arg)
            hide_next = True
        elif arg.startswith(tuple(f"{option}=" for option in SECRET_OPTIONS)):
            shown.append(arg.split("=", 1)[0] + "=" + REDACTED)
        else:
            shown.append(arg)
    return "python -m benchmarks.loadtest " + shlex.join(shown)


def plan_levels(args: argparse.Namespace) -> list[Level]:
    if args.arrival_rate:
        users = args.users or DEFAULT_OPEN_LOOP_USERS
        return [Level(n, users, rate) for n, rate in enumerate(parse_rates(args.arrival_rate), start=1)]
    counts = (args.users,) if args.users else parse_levels(args.sweep or DEFAULT_SWEEP)
    return [Level(n, users) for n, users in enumerate(counts, start=1)]


def locust_env(args: argparse.Namespace, inputs_folder: Path, api_key: str) -> dict[str, str]:
    """What every locust process of this machine reads from its environment (never from a command line)."""
    env = {dicoms.INPUTS_ENV: str(inputs_folder.resolve()), API_KEY_ENV: api_key}
    if args.ca_bundle:
        env["CXR_LOADTEST_CA_BUNDLE"] = str(Path(args.ca_bundle).resolve())
    if args.insecure:
        env["CXR_LOADTEST_INSECURE"] = "1"
    return env


def prepare_inputs(args: argparse.Namespace, progress) -> tuple[Path, str]:
    """(folder, description) of the DICOMs to send; raises CannotRun when a given folder has none."""
    if args.dicoms:
        folder = Path(args.dicoms)
        if not folder.is_dir():
            raise CannotRun(f"--dicoms {folder}: not a folder")
        paths = dicoms.dicom_files(folder)
        if not paths:
            raise CannotRun(f"--dicoms {folder}: no DICOM Part 10 file (with the DICM marker) in it or below it")
        mean = sum(path.stat().st_size for path in paths) / len(paths) / 2**20
        return folder, f"{len(paths)} DICOM files from `{folder}`, {mean:.1f} MiB on average"
    rows, cols = args.phantom_size
    spec = dicoms.phantom_set(args.phantoms, rows, cols)
    progress(f"{spec.count} phantom DICOMs, {rows}×{cols} (made once, cached in benchmarks/.bench-inputs/)")
    folder = dicoms.make_phantoms(spec)
    paths = dicoms.dicom_files(folder)
    mean = sum(path.stat().st_size for path in paths) / len(paths) / 2**20
    return folder, (
        f"{len(paths)} synthetic phantoms (`training.synthetic`, {rows}×{cols}, seeds {spec.first_seed}–"
        f"{spec.first_seed + spec.count - 1}, {spec.description}), {mean:.1f} MiB on average"
    )


def tls_text(host: str, args: argparse.Namespace) -> str:
    if not host.startswith("https://"):
        return "none (plain HTTP)"
    if args.insecure:
        return "HTTPS, certificate **not verified** (--insecure)"
    if args.ca_bundle:
        return f"HTTPS, certificate verified against `{args.ca_bundle}`"
    return "HTTPS, certificate verified against the system's trusted CAs"


def generator_text(args: argparse.Namespace) -> str:
    if not (args.workers or args.master):
        return "one locust process on this machine"
    parts = [f"{args.workers} local worker process{'es' * (args.workers != 1)}"] if args.workers else []
    if args.master:
        parts.append(f"{args.expect_workers} remote worker{'s' * (args.expect_workers != 1)}")
    return "locust master (sends nothing itself) + " + " + ".join(parts)


def load_table(args: argparse.Namespace, levels: list[Level], inputs_text: str) -> dict[str, str]:
    low, high = parse_think_time(args.think_time)
    think = "none" if high == 0 else (f"{low:g} s" if low == high else f"uniform {low:g}–{high:g} s")
    mode = (
        f"open loop: Poisson arrivals at each level's rate (all generator processes together), at most "
        f"{levels[0].users} requests in flight"
        if args.arrival_rate
        else f"closed loop: each user sends its next request when the answer has arrived; think time {think}"
    )
    return {
        "Mode": mode,
        "Mix": mix_text(parse_mix(args.mix)),
        "Instances per `studies` request": str(args.instances_per_study),
        "Inputs": inputs_text,
        "Users' first files": "user k starts at file k mod N and cycles through them",
        "Warm-up per level (discarded)": f"{args.warmup:g} s",
        "Measured per level": f"{args.duration:g} s",
        "Generator": generator_text(args),
    }


def service_table(host: str, args: argparse.Namespace, models: dict, api_key: str) -> dict[str, str]:
    sampled = (
        {
            "Process tree sampled": f"PID {args.server_pid} on this machine (--server-pid): CPU time and RSS "
            "summed over the server and its children, read from /proc every second"
        }
        if args.server_pid
        else {}
    )
    return sampled | {
        "URL": host,
        "Model pack": f"{models.get('pack', '?')} {models.get('version', '?')} (from /v1/models)",
        "ONNX Runtime providers in use": ", ".join(models.get("providers", [])) or "?",
        "Max batch size": str(models.get("max_batch_size", "?")),
        "TLS": tls_text(host, args),
        "API key": "sent as `Authorization: Bearer` (its value is not recorded)" if api_key else "none sent",
    }


def level_line(result: LevelResult, verdict) -> str:
    total = result.total
    server = f", server CPU {result.server_cpu_cores:.2f} cores" if result.server_cpu_cores is not None else ""
    return (
        f"  {result.level.label:>12}: {total.rps:7.2f} req/s, {result.images_per_s:7.2f} images/s, p50 "
        f"{total.p50_ms:.0f} ms, p99 {total.p99_ms:.0f} ms, {total.failures} failed, generator CPU "
        f"{result.generator_cpu_cores:.2f} cores{server} -> "
        f"{'met' if verdict.met else 'MISSED: ' + '; '.join(verdict.reasons)}"
    )


def attach_server_usage(result: LevelResult, sampler: TreeSampler) -> None:
    """Server CPU (cores) and peak RSS over the level's window, from the sampler of its process tree."""
    deadline = time.monotonic() + 3 * sampler.interval_s
    while not any(s.at >= result.stopped_at for s in sampler.samples) and time.monotonic() < deadline:
        time.sleep(0.1)  # cpu_cores_between needs a sample at or after the window's end
    samples = list(sampler.samples)
    result.server_cpu_cores = cpu_cores_between(samples, result.measured_from, result.stopped_at)
    inside = [s.rss_kib for s in samples if result.measured_from <= s.at <= result.stopped_at]
    result.server_peak_rss_mib = max(inside) / 1024 if inside else None


def run_levels(
    report,
    generator: Generator,
    levels: list[Level],
    args: argparse.Namespace,
    progress,
    sampler: TreeSampler | None = None,
) -> None:
    """Fill report.levels, one level after the other; a level without any success ends the sweep."""
    from tqdm import tqdm

    from benchmarks.loadtest.report import check_level

    for level in levels:
        progress(f"level {level.index}/{len(levels)}: {level.label} ({args.warmup:g} s warm-up + {args.duration:g} s)")
        with tqdm(total=round(args.warmup + args.duration), unit="s", leave=False, disable=None) as bar:

            def tick(elapsed: float) -> None:
                bar.update(max(0, min(round(elapsed), bar.total) - bar.n))

            try:
                result = run_level(
                    generator, level, args.warmup, args.duration, args.out, final=level is levels[-1], tick=tick
                )
            except RuntimeError as exc:
                if not report.levels:
                    raise CannotRun(str(exc)) from None
                report.stopped_early = str(exc)
                progress(f"  stopped: {exc}")
                return
        if sampler is not None:
            attach_server_usage(result, sampler)
        report.levels.append(result)
        verdict = check_level(result, report.slo)
        progress(level_line(result, verdict))
        if result.total.requests == result.total.failures:
            report.stopped_early = f"no request succeeded at {level.label}; the higher levels were not run"
            progress(f"  {report.stopped_early}")
            return


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    try:
        if args.worker:
            return run_worker(args)
        return run(args, sys.argv[1:] if argv is None else argv)
    except CannotRun as exc:
        print(f"loadtest: cannot run: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr, flush=True)
        return 2


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from benchmarks.loadtest.report import Report, write_report

    load_before = load_average()
    progress = Progress()
    host = normalise_host(args.host)
    api_key = args.api_key or os.environ.get(API_KEY_ENV, "")
    levels = plan_levels(args)
    slo = parse_slo(args.slo_p99_ms, args.slo_error_rate)
    args.out = args.out or RESULTS / datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    minutes = len(levels) * (args.warmup + args.duration + 4) / 60
    progress(
        f"load test of {display_url(host)}: {len(levels)} level(s), about {minutes:.0f} min; results in {args.out}"
    )

    inputs_folder, inputs_text = prepare_inputs(args, progress)
    first = dicoms.dicom_files(inputs_folder)[0]
    progress("checking the service (reachable, TLS, API key, ready, accepts the first DICOM)")
    service = check_service(
        host, api_key, tls_verify(args.ca_bundle, args.insecure), args.ready_timeout, first.read_bytes(), first.name
    )
    for warning in service.warnings:
        progress(f"  warning: {warning}")

    report = Report(
        command=redacted_command(argv),
        host=display_url(host),
        started_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        slo=slo,
        machine=describe_host(load_before),
        service=service_table(display_url(host), args, service.models, api_key),
        load=load_table(args, levels, inputs_text),
        warnings=service.warnings,
        open_loop=bool(args.arrival_rate),
        planned_levels=len(levels),
    )
    generator = Generator(
        host=host,
        env=locust_env(args, inputs_folder, api_key),
        locust_options=(
            "--mix",
            args.mix,
            "--think-time",
            args.think_time,
            "--instances-per-study",
            str(args.instances_per_study),
        ),
        local_workers=args.workers,
        remote_workers=args.expect_workers if args.master else 0,
        master_bind_host=args.master_bind_host if args.master else "127.0.0.1",
        master_bind_port=args.master_bind_port if args.master else None,
        workers_wait_s=args.expect_workers_max_wait,
        html=args.html,
    )
    sampler = TreeSampler(args.server_pid, interval_s=1.0, memory_every=2).start() if args.server_pid else None
    try:
        run_levels(report, generator, levels, args, progress, sampler)
    except KeyboardInterrupt:
        report.stopped_early = "interrupted (Ctrl-C)"
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        report.duration_s = time.perf_counter() - progress.started
        if report.levels:
            summary = write_report(report, args.out)
            progress(f"wrote {summary}")
    progress(
        ("PASS: every level met the objective" if report.passed else "FAIL: the objective was missed")
        + f" ({slo.describe()})"
    )
    return 0 if report.passed else 1


def run_worker(args: argparse.Namespace) -> int:
    """Act as a locust worker for a master elsewhere, one locust run per level, until the master says it is done."""
    progress = Progress()
    api_key = args.api_key or os.environ.get(API_KEY_ENV, "")
    inputs_folder, inputs_text = prepare_inputs(args, progress)
    done_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"cxr-loadtest-worker-{os.getpid()}.done"
    done_file.unlink(missing_ok=True)
    env = os.environ | locust_env(args, inputs_folder, api_key) | {DONE_FILE_ENV: str(done_file)}
    progress(f"worker: sending {inputs_text}; waiting for the master at {args.master_host}:{args.master_port}")
    runs = 0
    while True:
        finished = subprocess.run(worker_command(args.master_host, args.master_port), cwd=ROOT, env=env)
        runs += 1
        if done_file.is_file():
            done_file.unlink()
            progress(f"worker: the master finished its sweep ({runs} level(s))")
            return 0
        if finished.returncode != 0:
            raise CannotRun(
                f"the locust worker exited with status {finished.returncode} after {runs - 1} level(s) "
                f"(no master at {args.master_host}:{args.master_port} for 5 minutes?)"
            )
        progress(f"worker: level {runs} done, waiting for the next one")


def argument_type(parse, keep_text: bool = False):
    """An argparse type from one of the options.py parsers: its ValueError becomes a usage error (exit status 2).
    `keep_text`: the option keeps the text (it is passed on to locust as typed), the parser only checks it."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text if keep_text else value

    convert.__name__ = parse.__name__
    return convert


seconds = argument_type(parse_duration)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = parser.add_argument_group("service under test")
    target.add_argument(
        "--host", metavar="URL", help="the service's base URL, http://… or https://… (required, except with --worker)"
    )
    target.add_argument(
        "--api-key", metavar="KEY", default=None, help=f"API key (default: ${API_KEY_ENV}); never printed or recorded"
    )
    target.add_argument(
        "--ca-bundle", metavar="FILE", default=None, help="PEM file of the CA(s) that signed the server's certificate"
    )
    target.add_argument("--insecure", action="store_true", help="do not verify the server's TLS certificate")
    target.add_argument(
        "--ready-timeout", metavar="TIME", type=seconds, default=60.0, help="wait this long for /readyz (default 60s)"
    )
    target.add_argument(
        "--server-pid",
        metavar="PID",
        type=int,
        default=None,
        help="when the service runs on this machine: its PID, to report its CPU and memory per level",
    )

    load = parser.add_argument_group("load")
    levels = load.add_mutually_exclusive_group()
    levels.add_argument(
        "--users",
        metavar="N",
        type=int,
        default=None,
        help="one level of N users (closed loop); with --arrival-rate: most requests in flight "
        f"(default {DEFAULT_OPEN_LOOP_USERS})",
    )
    levels.add_argument(
        "--sweep",
        metavar="N,N,...",
        type=argument_type(parse_levels, keep_text=True),
        default=None,
        help=f"levels of users, run in turn, e.g. 1,2,4,8 (default {DEFAULT_SWEEP})",
    )
    load.add_argument(
        "--arrival-rate",
        metavar="RATE,...",
        type=argument_type(parse_rates, keep_text=True),
        default=None,
        help="open loop instead: levels of request rates, e.g. 30/min,60/min (Poisson arrivals)",
    )
    load.add_argument(
        "--duration", metavar="TIME", type=seconds, default=60.0, help="measured time per level (default 60s)"
    )
    load.add_argument(
        "--warmup",
        metavar="TIME",
        type=argument_type(parse_warmup),
        default=10.0,
        help="discarded start of each level (default 10s)",
    )
    load.add_argument(
        "--mix",
        metavar="KIND=W,...",
        type=argument_type(parse_mix, keep_text=True),
        default=DEFAULT_MIX,
        help=f"request kinds and shares: predict, sr, gsps, png, studies (default {DEFAULT_MIX})",
    )
    load.add_argument(
        "--instances-per-study", metavar="N", type=int, default=3, help="instances per `studies` request (default 3)"
    )
    load.add_argument(
        "--think-time",
        metavar="S|MIN-MAX",
        type=argument_type(parse_think_time, keep_text=True),
        default="0",
        help="seconds each user pauses after an answer: 2, or a range 1-3 (default 0)",
    )
    load.add_argument(
        "--dicoms",
        metavar="DIR",
        default=None,
        help="folder of DICOMs to send (searched recursively); default: generated phantoms",
    )
    load.add_argument(
        "--phantoms", metavar="N", type=int, default=dicoms.PHANTOMS.count, help="how many phantoms without --dicoms"
    )
    load.add_argument(
        "--phantom-size",
        metavar="ROWSxCOLS",
        type=argument_type(parse_size),
        default=(dicoms.PHANTOMS.rows, dicoms.PHANTOMS.cols),
        help="phantom ROWSxCOLUMNS (default the VinDr-PCXR median, 1643x1349)",
    )

    verdict = parser.add_argument_group("objective and results")
    verdict.add_argument(
        "--slo-p99-ms",
        metavar="MS[,KIND=MS]",
        default=None,
        help="p99 latency limit in ms for every request kind, and/or per kind: 800,studies=3000",
    )
    verdict.add_argument(
        "--slo-error-rate",
        metavar="PERCENT",
        type=float,
        default=0.1,
        help="largest share of failed requests, in percent (default 0.1)",
    )
    verdict.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results/loadtest/<UTC time>)",
    )
    verdict.add_argument(
        "--html",
        choices=("all", "last"),
        default="all",
        help="levels that keep locust's HTML report (~1 MB each, mostly its inlined web UI)",
    )

    distributed = parser.add_argument_group("distributed load (locust master and workers)")
    distributed.add_argument(
        "--workers", metavar="N", type=int, default=0, help="start N local locust worker processes"
    )
    distributed.add_argument("--master", action="store_true", help="also accept workers from other machines")
    distributed.add_argument(
        "--expect-workers", metavar="N", type=int, default=1, help="with --master: remote workers to wait for"
    )
    distributed.add_argument(
        "--expect-workers-max-wait",
        metavar="TIME",
        type=seconds,
        default=120.0,
        help="give up when the workers are not all connected after this long (default 120s)",
    )
    distributed.add_argument(
        "--master-bind-host", metavar="ADDRESS", default="0.0.0.0", help="with --master: interface to listen on"
    )
    distributed.add_argument(
        "--master-bind-port", metavar="PORT", type=int, default=5557, help="with --master: port (default 5557)"
    )
    distributed.add_argument("--worker", action="store_true", help="act as a worker of a master on another machine")
    distributed.add_argument(
        "--master-host", metavar="ADDRESS", default="127.0.0.1", help="with --worker: the master's address"
    )
    distributed.add_argument(
        "--master-port", metavar="PORT", type=int, default=5557, help="with --worker: the master's port"
    )
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.worker:
        return
    if not args.host:
        parser.error("--host is required (the service's base URL, e.g. https://cxr.hospital.example)")
    if args.arrival_rate and args.sweep:
        parser.error("--arrival-rate takes its own levels (30/min,60/min); drop --sweep")
    if args.arrival_rate and parse_think_time(args.think_time)[1] > 0:
        parser.error("--think-time applies to the closed loop only (with --arrival-rate requests leave on schedule)")
    if args.users is not None and args.users < 1:
        parser.error("--users must be at least 1")
    if args.workers < 0 or (args.master and args.expect_workers < 1):
        parser.error("--workers must be >= 0, and --master needs --expect-workers >= 1")
    if args.instances_per_study < 1:
        parser.error("--instances-per-study must be at least 1")
    if args.server_pid is not None and not Path(f"/proc/{args.server_pid}").is_dir():
        parser.error(f"--server-pid {args.server_pid}: no such process on this machine")
    if args.ca_bundle and not Path(args.ca_bundle).is_file():
        parser.error(f"--ca-bundle {args.ca_bundle}: no such file")
    try:
        parse_slo(args.slo_p99_ms, args.slo_error_rate)
    except ValueError as exc:
        parser.error(str(exc))


def entry(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    return main(args, argv)
