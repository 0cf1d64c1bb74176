"""Throughput and latency, in one run, on one machine, one model pack and one set of inputs:

    python -m benchmarks.throughput [--quick] [--out benchmarks/results/throughput]

1. in process, no HTTP: the service's pipeline (decode pool -> batch -> both models -> postprocess)
   and the models alone, per batch size;
2. over HTTP: our service under locust (headless, CSV) at each concurrency level;
3. the same load against two peers serving the same pack with the same decode and postprocess:
   a naive per-request FastAPI service and Ray Serve with `@serve.batch` (installed into its own venv,
   benchmarks/.venv-peers, by this command: the only download it makes);
4. summary.md (machine, targets met or not, tables), PNG plots and the raw data (JSON, CSV, locust CSVs);
5. cold start and memory of each server's process tree.

`--quick` is a smoke run (seconds per level, three levels, three batch sizes), written to
benchmarks/results/throughput-quick unless --out says otherwise: its numbers are not results.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path

from benchmarks.inprocess import decode_pool, model_only_rates, pipeline_rates
from benchmarks.inputs import INPUT_SETS, InputSet, input_set, make_input_set, read_bodies
from benchmarks.loadgen import run_level
from benchmarks.machine import describe_machine, git_commit, load_average
from benchmarks.peers.common import load_models, prepare_body
from benchmarks.progress import Progress
from benchmarks.report import (
    OURS,
    Footprint,
    HttpLevel,
    Results,
    plot_inprocess,
    plot_latency,
    plot_throughput,
    render_summary,
    results_from_json,
    target_checks,
    verdict,
)
from benchmarks.sampling import TreeSample, TreeSampler, cpu_cores_between
from benchmarks.servers import RunningServer, ServerSpec, served_providers, start_server, stop_server
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAIVE, RAY = "naive", "ray-serve"
SERVICES = (OURS, NAIVE, RAY)


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...]  # concurrency levels (locust users)
    run_time_s: float  # locust --run-time per level, warm-up included
    warmup_s: float  # discarded at the start of each level
    batch_sizes: tuple[int, ...]
    pipeline_s: float  # measuring time per batch size, in-process pipeline
    model_s: float  # measuring time per batch size, models only


# 3 services x 2 input sets x 7 levels x ~22 s plus in-process, start-ups and plots: ~20 min on 2 cores.
FULL = Plan(
    levels=(1, 2, 4, 8, 16, 32, 64),
    run_time_s=20,
    warmup_s=5,
    batch_sizes=(1, 2, 4, 8, 16, 32),
    pipeline_s=8,
    model_s=3,
)
QUICK = Plan(levels=(1, 4, 16), run_time_s=6, warmup_s=2, batch_sizes=(1, 4, 16), pipeline_s=2, model_s=1)


def estimated_minutes(plan: Plan, services: int, input_sets: int) -> float:
    """Rough duration: load levels (plus ~2 s of locust start-up each), in-process sweeps, server start-ups."""
    levels = services * input_sets * len(plan.levels) * (plan.run_time_s + 2)
    inprocess = len(plan.batch_sizes) * (plan.model_s + input_sets * (plan.pipeline_s + 4))
    return (levels + inprocess + services * 30) / 60


def service_specs(
    settings: Settings, models: Path, peer_python: Path | None, service_workers: int
) -> dict[str, ServerSpec]:
    """Our service and the peers, every peer given our batcher's and decode pool's settings."""
    threads = f"ONNX Runtime intra-op threads {settings.intra_op_threads or 'one per core'}"
    specs = {
        OURS: ours_spec(settings, str(models), service_workers, threads),
        NAIVE: ServerSpec(
            NAIVE,
            "naive FastAPI",
            [sys.executable, "-m", "benchmarks.peers.naive", "--port", "{port}", "--models", str(models)],
            "`benchmarks/peers/naive.py`: one uvicorn worker, a plain `def` endpoint (FastAPI's thread "
            "pool), per request `service.dicom.pipeline.prepare` + both models at batch 1; no batcher, no "
            f"decode processes; sessions loaded by the service's loader; {threads}; glibc's default "
            f"malloc (a process-level tuning of ours, not part of the shared decode code).",
        ),
    }
    if peer_python is not None:
        specs[RAY] = ray_serve_spec(settings, str(models), peer_python, threads)
    return specs


def ours_spec(settings: Settings, pack: str, service_workers: int, threads: str) -> ServerSpec:
    batching = (
        f"max batch {settings.max_batch_size}, max queue delay {settings.max_queue_delay_ms:g} ms, "
        f"queue {settings.max_queue_size}"
    )
    workers = ["--workers", str(service_workers)] if service_workers > 1 else []
    # With --workers N the service gives each HTTP process cores // N decode processes unless CXR_DECODE_WORKERS is set.
    decoders = (
        f"{settings.decode_workers} decode threads (uncompressed) and as many decode processes (compressed)"
        if not workers
        else "decode threads and processes per HTTP process as `--workers` assigns them"
    )
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "{port}", "--models", pack,
               "--log-level", "warning", *workers]  # fmt: skip
    return ServerSpec(
        OURS,
        "ours",
        command,
        f"`python -m service{' --workers ' + str(service_workers) if workers else ''}`: "
        f"{service_workers} uvicorn process(es), dynamic batcher ({batching}), "
        f"{decoders}, {threads}, glibc malloc keeping {settings.malloc_keep_mb} MiB of freed memory "
        f"for reuse (CXR_MALLOC_KEEP_MB).",
    )


def ray_serve_spec(settings: Settings, pack: str, peer_python: Path, threads: str) -> ServerSpec:
    command = [
        str(peer_python), "-m", "benchmarks.peers.ray_serve", "--port", "{port}", "--models", pack,
        "--decode-replicas", str(settings.decode_workers),
        "--max-batch-size", str(settings.max_batch_size),
        "--batch-wait-timeout-s", f"{settings.max_queue_delay_ms / 1e3:g}",
        "--max-ongoing-requests", str(settings.max_queue_size),
    ]  # fmt: skip
    return ServerSpec(
        RAY,
        "Ray Serve",
        command,
        "`benchmarks/peers/ray_serve.py` (ray[serve] 2.60 in benchmarks/.venv-peers): Ingress ×1 (FastAPI) → "
        f"Decoder ×{settings.decode_workers} (`service.dicom.pipeline.prepare`, ≤ 2 requests each) → Model ×1 with "
        f"`@serve.batch(max_batch_size={settings.max_batch_size}, batch_wait_timeout_s="
        f"{settings.max_queue_delay_ms / 1e3:g}, max_concurrent_batches=1)`; max_ongoing_requests "
        f"{settings.max_queue_size} for Ingress and Model; 0 logical CPUs reserved per replica; {threads}.",
        env={"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"},
    )


# --- 1. in process ------------------------------------------------------------------------------------


def measure_inprocess(
    results: Results, settings: Settings, sets: Sequence[InputSet], plan: Plan, progress: Callable[[str], None]
) -> list[str]:
    """Fill results.model_only and results.pipeline; returns the providers the sessions run on."""
    pack, models = load_models(settings)
    bodies = {spec.name: read_bodies(make_input_set(spec)) for spec in sets}
    tensors = [prepare_body(body, pack, settings).inputs for body in bodies[sets[0].name][:4]]
    results.model_only = model_only_rates(models, tensors, plan.batch_sizes, plan.model_s)
    for rate in results.model_only:
        progress(f"  models only batch {rate.batch_size:>2}: {rate.images_per_s:7.2f} images/s")
    workers = settings.decode_workers
    with decode_pool(workers, settings.decode_native_in_threads, settings.malloc_keep_mb) as pool:
        # Start every worker (and the forkserver) before anything is timed: the pool spawns them on demand.
        wait([pool.processes.submit(time.sleep, 0.2) for _ in range(workers)])
        for spec in sets:
            results.pipeline += pipeline_rates(
                spec.name,
                bodies[spec.name],
                pack,
                settings,
                models,
                pool,
                workers,
                plan.batch_sizes,
                plan.pipeline_s,
                progress,
            )
    return list(models.providers)


# --- 2 + 3. over HTTP -----------------------------------------------------------------------------------


def http_level(service: str, set_name: str, users: int, run, samples: Sequence[TreeSample]) -> HttpLevel:
    stats = run.stats
    successes = stats.requests - stats.failures
    return HttpLevel(
        service=service,
        input_set=set_name,
        users=users,
        requests=stats.requests,
        failures=stats.failures,
        rps=successes / run.measured_s,
        p50_ms=stats.p50_ms,
        p95_ms=stats.p95_ms,
        p99_ms=stats.p99_ms,
        measured_s=run.measured_s,
        server_cpu_cores=cpu_cores_between(samples, run.measured_from, run.stopped_at),
        locust_cpu_cores=run.cpu_s / run.wall_s,
    )


def footprint(server: RunningServer, samples: Sequence[TreeSample]) -> Footprint:
    ready, after = samples[0], samples[-1]
    return Footprint(
        service=server.spec.name,
        cold_start_s=server.cold_start_s,
        processes=max(s.processes for s in samples),
        ready_rss_mib=ready.rss_kib / 1024,
        ready_pss_mib=ready.pss_kib / 1024,
        peak_rss_mib=max(s.rss_kib for s in samples) / 1024,
        peak_pss_mib=max(s.pss_kib for s in samples) / 1024,
        after_rss_mib=after.rss_kib / 1024,
        after_pss_mib=after.pss_kib / 1024,
    )


def write_samples(samples: Sequence[TreeSample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["unix_time", "cpu_s", "rss_kib", "pss_kib", "processes"])
        writer.writerows(dataclasses.astuple(sample) for sample in samples)


@dataclass
class ServiceRun:
    levels: list[HttpLevel]
    footprint: Footprint
    providers: list[str]
    error: str | None  # why the levels stopped early, if they did (the ones measured are kept)


def measure_service(
    spec: ServerSpec, sets: Sequence[InputSet], plan: Plan, out: Path, progress: Callable[[str], None]
) -> ServiceRun:
    """Start the server, run every level of every input set against it, stop it. Raises if it never gets ready."""
    progress(f"starting {spec.title}")
    server = start_server(spec, out / "logs")
    providers = served_providers(server.base_url)
    progress(f"  {spec.title} ready after {server.cold_start_s:.1f} s, models on {', '.join(providers)}")
    sampler = TreeSampler(server.process.pid).start()
    runs, error = [], None
    try:
        for input_spec in sets:
            folder = make_input_set(input_spec)[0].parent
            for users in plan.levels:
                if server.process.poll() is not None:
                    raise RuntimeError(f"{spec.title} exited (code {server.process.returncode}); see {server.log_path}")
                prefix = out / "locust" / spec.name / input_spec.name / f"u{users:03d}"
                run = run_level(server.base_url, users, plan.run_time_s, plan.warmup_s, folder, prefix)
                runs.append((input_spec.name, users, run))
                stats = run.stats
                progress(
                    f"  {spec.title:>13} {input_spec.name:>12} concurrency {users:>2}: "
                    f"{(stats.requests - stats.failures) / run.measured_s:7.2f} req/s, p50 {stats.p50_ms:.0f} ms, "
                    f"p99 {stats.p99_ms:.0f} ms, {stats.failures} failed, locust CPU {run.cpu_s / run.wall_s:.2f} cores"
                )
    except RuntimeError as exc:
        error = str(exc)
        progress(f"  {spec.title} stopped early: {error}")
    finally:
        samples = sampler.stop()
        stop_server(server)
        write_samples(samples, out / "samples" / f"{spec.name}.csv")
    levels = [http_level(spec.name, name, users, run, samples) for name, users, run in runs]
    return ServiceRun(levels, footprint(server, samples), providers, error)


# --- 4. outputs -------------------------------------------------------------------------------------------


def to_jsonable(results: Results) -> dict:
    return dataclasses.asdict(results)


def write_rows(path: Path, rows: Sequence) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if rows:
            writer.writerow([f.name for f in dataclasses.fields(rows[0])])
            writer.writerows(dataclasses.astuple(row) for row in rows)


def write_outputs(results: Results, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(to_jsonable(results), indent=1))
    write_rows(out / "http.csv", results.http)
    write_rows(out / "inprocess.csv", results.model_only + results.pipeline)
    write_rows(out / "footprint.csv", results.footprints)
    plots = [
        plot_throughput(results, out / "throughput.png"),
        plot_latency(results, out / "latency.png"),
        plot_inprocess(results, out / "inprocess.png"),
    ]
    summary = out / "summary.md"
    summary.write_text(render_summary(results, [str(p) for p in plots]))
    return summary


# --- the run ------------------------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    overrides = {
        "levels": tuple(args.levels) if args.levels else None,
        "run_time_s": args.run_time,
        "warmup_s": args.warmup,
        "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None,
    }
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def rerender(out: Path) -> int:
    """Summary and plots again from out/results.json, measuring nothing (after a change to the report code)."""
    commit = git_commit()
    if "uncommitted" in commit:
        print("commit the report code first: a re-rendered summary names the commit that drew it", file=sys.stderr)
        return 2
    results = results_from_json(json.loads((out / "results.json").read_text()))
    results = dataclasses.replace(results, rendered_commit=commit)
    print(f"wrote {write_outputs(results, out)}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.rerender:
        return rerender(args.out or RESULTS / ("throughput-quick" if args.quick else "throughput"))
    load_before = load_average()
    progress = Progress()
    plan = make_plan(args)
    if plan.run_time_s <= plan.warmup_s:
        raise SystemExit("--run-time must be longer than --warmup")
    out = args.out or RESULTS / ("throughput-quick" if args.quick else "throughput")
    settings = Settings(**({"models": args.models} if args.models else {}))
    models = settings.models.resolve()
    sets = [input_set(name) for name in args.input_sets]
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    progress(
        f"{'quick' if args.quick else 'full'} run, results in {out}; about "
        f"{estimated_minutes(plan, len(args.services), len(sets)):.0f} min planned"
    )
    peer_python, skipped = ray_serve_python(args.services, progress)
    specs = service_specs(settings, models, peer_python, args.service_workers)

    progress("making the inputs (cached in benchmarks/.bench-inputs)")
    results = Results(
        command="python -m benchmarks.throughput " + shlex.join(sys.argv[1:]),
        mode="quick" if args.quick else "full",
        machine={},
        input_sets=describe_inputs(sets),
        plan=dataclasses.asdict(plan) | {"decode_workers": settings.decode_workers},
        services={
            name: {"title": spec.title, "configuration": spec.configuration}
            for name, spec in specs.items()
            if name in args.services or name in skipped
        },
        skipped=skipped,
        started_at=started_at,
    )

    progress("in-process throughput (no HTTP)")
    providers = measure_inprocess(results, settings, sets, plan, progress)
    pack_manifest = json.loads((models / "manifest.json").read_text())
    results.machine = describe_machine(pack_manifest, providers, load_before)
    for name in args.services:
        if name in specs:
            measure_over_http(results, name, specs[name], sets, plan, out, progress)

    results.duration_s = time.perf_counter() - progress.started
    summary = write_outputs(results, out)
    progress(f"wrote {summary.relative_to(ROOT) if summary.is_relative_to(ROOT) else summary}")
    for check in target_checks(results):
        print(f"  {check.target} [{check.input_set}]: {verdict(check.met).strip('*')} — {check.detail}")
    return 0


def ray_serve_python(services: list[str], progress: Callable[[str], None]) -> tuple[Path | None, dict[str, str]]:
    """The peers' venv Python when Ray Serve is asked for (set up on first use), and why it was skipped if not."""
    peer_python, skipped = None, {}
    if RAY in services:
        from benchmarks.peer_env import ensure_peer_venv

        try:
            peer_python = ensure_peer_venv(progress)
        except (RuntimeError, OSError) as exc:  # no network, say: the other measurements still stand
            skipped[RAY] = f"the peers' venv could not be set up ({exc})"
            progress(f"  Ray Serve skipped: {skipped[RAY]}")
    return peer_python, skipped


def describe_inputs(sets: Sequence[InputSet]) -> list[dict]:
    """Each input set as the results record it, made (or found in the cache) on the way."""
    described = []
    for spec in sets:
        paths = make_input_set(spec)
        described.append(
            dataclasses.asdict(spec)
            | {"files": len(paths), "mean_mib": sum(p.stat().st_size for p in paths) / len(paths) / 2**20}
        )
    return described


def measure_over_http(
    results: Results,
    name: str,
    spec: ServerSpec,
    sets: Sequence[InputSet],
    plan: Plan,
    out: Path,
    progress: Callable[[str], None],
) -> None:
    """One service's HTTP levels into `results`; a service that never gets ready is recorded as skipped."""
    try:
        run = measure_service(spec, sets, plan, out, progress)
    except RuntimeError as exc:  # never got ready: nothing measured
        results.skipped[name] = str(exc).splitlines()[0]
        progress(f"  {spec.title} failed: {exc}")
        return
    results.http += run.levels
    results.footprints.append(run.footprint)
    results.services[name]["providers"] = run.providers
    if run.error:
        results.skipped[name] = f"stopped after {len(run.levels)} levels: {run.error.splitlines()[0]}"
    progress(
        f"  {spec.title}: cold start {run.footprint.cold_start_s:.1f} s, {run.footprint.processes} "
        f"processes, PSS at ready {run.footprint.ready_pss_mib:.0f} MiB, peak {run.footprint.peak_pss_mib:.0f} MiB"
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: a few seconds per level, fewer levels")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results/throughput, or throughput-quick with --quick)",
    )
    parser.add_argument("--models", type=Path, default=None, help="model pack (default: the service's, CXR_MODELS)")
    parser.add_argument("--services", nargs="+", choices=SERVICES, default=list(SERVICES))
    parser.add_argument(
        "--input-sets", nargs="+", choices=[s.name for s in INPUT_SETS], default=[s.name for s in INPUT_SETS]
    )
    parser.add_argument("--levels", type=int, nargs="+", help="concurrency levels (default: the mode's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="in-process batch sizes (default: the mode's)")
    parser.add_argument("--run-time", type=float, help="seconds per level, warm-up included (default: the mode's)")
    parser.add_argument(
        "--warmup", type=float, help="seconds discarded at the start of each level (default: the mode's)"
    )
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="only write summary.md and the plots again from the --out folder's results.json",
    )
    parser.add_argument("--service-workers", type=int, default=1, help="our service's --workers (HTTP processes)")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
