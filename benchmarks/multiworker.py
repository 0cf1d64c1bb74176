"""Several HTTP workers on one machine: what sharing one inference server buys and costs.

    python -m benchmarks.multiworker            # about 3 minutes: three setups, 30 s of load each
    python -m benchmarks.multiworker --quick    # about 1 minute, indicative only

Three setups serve the same pack to the same load (`--concurrency` clients posting 1,643 x 1,349
uncompressed DICOMs back to back, a new connection per request so that requests spread over the workers):
  single   `python -m service`                      one process, in-process ONNX Runtime (the default)
  shared   `python -m service --workers N`          N HTTP workers + one inference server (one session pair)
  naive    `uvicorn service.api.app:create_app --factory --workers N`   N workers, each loading its own sessions
  triton   `python -m service` with CXR_INFERENCE_URL   one process; the models on a local Triton (gRPC)
  triton-workers   `python -m service --workers N` with CXR_INFERENCE_URL   N workers, each batching for Triton
The Triton setups start the nvidia-pytriton wheel's tritonserver (benchmarks/local_triton.py, Python backend
running ONNX Runtime on CPU, repository written by `python -m service.triton_repository --backend python`)
before the service; its processes' memory is sampled with the service's and added tick by tick.
For each: cold start (process start to /readyz 200, and until every worker answers ready), throughput,
p50/p99 latency, the median queue and inference times the service reports, resident memory of the whole
process tree (RSS, and PSS, which counts shared library pages once), GPU memory per tree (nvidia-smi,
when present) and the raw cost of the extra hop: one 1 x S x S float32 image to the inference server
and its outputs back, with no model in the way.

The decode processes are split the same way in `shared` and `naive` (max(1, cores // N) per worker, the
launcher's default), so the two differ only in where the models run. The load generator runs on the same
machine and takes CPU from the servers: compare setups within one run, not across machines.
Writes benchmarks/results/multiworker.{md,json} (`--quick`: multiworker-quick.{md,json}).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from benchmarks.inputs import input_set, make_input_set, read_bodies
from benchmarks.machine import describe_machine, input_sizes, load_average
from benchmarks.procfs import process_tree, tree_memory
from benchmarks.sampling import TreeSampler
from benchmarks.soak import free_port
from service.multiworker import default_decode_workers, usable_cores
from service.settings import DEFAULT_PACK

if TYPE_CHECKING:  # the service's inference modules are imported where they are used
    from service.inference.modelpack import ModelPack

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SETUPS = ("single", "shared", "naive", "triton", "triton-workers")
TRITON_SETUPS = ("triton", "triton-workers")
MIB = 1024


@dataclass
class SetupResult:
    name: str
    command: str
    providers: list[str] = field(default_factory=list)  # as /v1/models reports them
    first_ready_s: float = float("nan")  # process start -> the first /readyz 200
    all_ready_s: float = float("nan")  # -> 10 /readyz 200 in a row on new connections (every worker ready)
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    throughput_per_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    queue_p50_ms: float = float("nan")  # what the service reports: batch wait (+ the socket hop when shared)
    inference_p50_ms: float = float("nan")
    processes: int = 0
    rss_idle_mib: float = float("nan")
    pss_idle_mib: float = float("nan")
    rss_peak_mib: float = float("nan")
    pss_peak_mib: float = float("nan")
    gpu_mib: float | None = None
    pss_by_role_mib: dict[str, list[float]] = field(default_factory=dict)  # right after the load, per process
    stop_s: float = float("nan")
    triton_ready_s: float | None = None  # Triton setups: tritonserver start -> /v2/health/ready
    triton_pss_peak_mib: float | None = None  # Triton setups: Triton's processes alone (included in pss_peak_mib)


def setup_command(name: str, workers: int, port: int, models: Path) -> list[str]:
    common = ["--port", str(port), "--log-level", "warning"]
    if name in ("single", "triton"):
        return [sys.executable, "-m", "service", "--models", str(models), *common]
    if name in ("shared", "triton-workers"):
        return [sys.executable, "-m", "service", "--workers", str(workers), "--models", str(models), *common]
    # What users do without the shared server: uvicorn's own workers, each building the app (and its sessions).
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "service.api.app:create_app",
        "--factory",
        "--workers",
        str(workers),
        "--host",
        "127.0.0.1",
        "--no-access-log",
        *common,
    ]


def setup_environment(
    name: str, workers: int, models: Path, providers: str | None, max_batch: int, inference_url: str | None = None
) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    env |= {"CXR_MODELS": str(models), "CXR_MAX_BATCH_SIZE": str(max_batch)}
    if inference_url:
        env["CXR_INFERENCE_URL"] = inference_url
    if providers:
        env["CXR_PROVIDERS"] = providers
    if name == "naive":  # the launcher's split, so that only where the models run differs from "shared"
        env["CXR_DECODE_WORKERS"] = str(default_decode_workers(workers, usable_cores()))
    return env


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def wait_ready(base: str, process: subprocess.Popen, started: float, timeout_s: float) -> tuple[float, float]:
    """(first ready, all ready) seconds after `started`; a fresh connection per probe reaches any worker."""
    first, streak = float("nan"), 0
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            ok = httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok and math.isnan(first):
            first = time.monotonic() - started
        streak = streak + 1 if ok else 0
        if streak >= 10:
            return first, time.monotonic() - started
        time.sleep(0.05 if ok else 0.1)
    raise RuntimeError(f"server not ready within {timeout_s:g} s")


async def drive_load(base: str, bodies: list[bytes], concurrency: int, duration_s: float, keepalive: bool) -> dict:
    """`concurrency` clients posting back to back for `duration_s`: latencies, answers by status, timings.

    Without keep-alive every request opens a new connection, so the kernel spreads requests over the workers
    sharing the listening socket; 16 connections opened at once can otherwise all land on one worker.
    """
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    queue_ms: list[float] = []
    inference_ms: list[float] = []
    headers = {"Content-Type": "application/dicom"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency if keepalive else 0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        deadline = time.monotonic() + duration_s

        async def one_client(index: int) -> None:
            sent = index
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/predict", content=bodies[sent % len(bodies)], headers=headers)
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    response, status = None, type(exc).__name__
                latencies.append((time.perf_counter() - started) * 1e3)
                statuses[status] = statuses.get(status, 0) + 1
                if response is not None and response.status_code == 200:
                    timing = response.json()["timing_ms"]
                    queue_ms.append(timing["queue"])
                    inference_ms.append(timing["inference"])
                sent += concurrency

        began = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        elapsed = time.monotonic() - began
    return {
        "latencies": latencies,
        "statuses": statuses,
        "elapsed_s": elapsed,
        "queue_ms": queue_ms,
        "inference_ms": inference_ms,
    }


def process_role(pid: int, root: int) -> str:
    """What a process of a setup's tree is, from its command line (for the memory breakdown)."""

    def cmdline(of: int) -> str:
        try:
            return Path(f"/proc/{of}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    command = cmdline(pid)
    if pid == root:
        return "tritonserver" if "tritonserver" in command else "main"  # or the launcher / supervisor of N workers
    if "triton_python_backend_stub" in command:
        return "Triton Python-backend stub"
    if "service.inference.server" in command:
        return "inference server"
    if "multiprocessing.resource_tracker" in command:
        return "resource tracker"
    if "multiprocessing.spawn" in command:
        return "HTTP worker"
    if "multiprocessing.forkserver" in command:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            parent = 0
        return "decode worker" if "multiprocessing.forkserver" in cmdline(parent) else "forkserver"
    return "other"


def pss_by_role_mib(root: int) -> dict[str, list[float]]:
    roles: dict[str, list[float]] = {}
    for pid in process_tree(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        pss_kib = next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)
        roles.setdefault(process_role(pid, root), []).append(round(pss_kib / MIB, 1))
    return roles


def roles_text(roles: dict[str, list[float]]) -> str:
    return ", ".join(f"{role} {len(values)}×{statistics.mean(values):.0f}" for role, values in sorted(roles.items()))


def gpu_description() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none (no nvidia-smi)"
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return listing.stdout.strip().replace("\n", "; ") or "none"


def gpu_memory_mib(pids: list[int]) -> float | None:
    """GPU memory the given processes hold (nvidia-smi), or None without an NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    )
    if query.returncode != 0:
        return None
    used = 0.0
    for line in query.stdout.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids:
            used += float(mib)
    return used


def stop_tree(process: subprocess.Popen, timeout_s: float = 60) -> float:
    """SIGTERM the server, wait; kill whatever of its tree outlives it. Seconds until it exited."""
    tree = process_tree(process.pid)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    stopped = time.monotonic() - started
    time.sleep(1.0)
    for pid in tree[1:]:  # processes this run started: never anything else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return stopped


@contextlib.contextmanager
def local_triton(name: str, args: argparse.Namespace, logs: Path):
    """For the Triton setups: a local tritonserver hosting the pack (Python backend), ready; else None."""
    if name not in TRITON_SETUPS:
        yield None
        return
    from benchmarks.local_triton import TritonServer, ensure_venv
    from service.inference.modelpack import ModelPack
    from service.inference.triton.repository import ServingOptions, default_preferred_batch_sizes, write_repository

    repository = logs / f"{name}-repository"
    options = ServingOptions(
        max_batch_size=args.max_batch, preferred_batch_sizes=default_preferred_batch_sizes(args.max_batch)
    )
    write_repository(ModelPack.load(args.models), repository, "python", options)
    server = TritonServer(ensure_venv(), repository, free_port(), free_port(), free_port(), logs / f"{name}-triton.log")
    with server.start():
        server.wait_ready(args.startup_timeout)
        yield server


def run_setup(name: str, args: argparse.Namespace, bodies: list[bytes], logs: Path) -> SetupResult:
    with local_triton(name, args, logs) as triton:
        return _run_service(name, args, bodies, logs, triton)


def _run_service(name: str, args: argparse.Namespace, bodies: list[bytes], logs: Path, triton) -> SetupResult:
    port = free_port()
    command = setup_command(name, args.workers, port, args.models)
    result = SetupResult(
        name=name, command=" ".join(Path(command[0]).name if i == 0 else part for i, part in enumerate(command))
    )
    if triton is not None:
        result.command = f"CXR_INFERENCE_URL={triton.grpc_url} {result.command}"
        result.triton_ready_s = triton.ready_s
    roots = [] if triton is None else [triton.process.pid]
    base = f"http://127.0.0.1:{port}"
    log = (logs / f"{name}.log").open("w")
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        env=setup_environment(
            name, args.workers, args.models, args.providers, args.max_batch, triton.grpc_url if triton else None
        ),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    roots.insert(0, process.pid)
    try:
        result.first_ready_s, result.all_ready_s = wait_ready(base, process, started, args.startup_timeout)
        result.providers = httpx.get(f"{base}/v1/models", timeout=10).json()["providers"]
        idle = [tree_memory(root) for root in roots]
        result.rss_idle_mib = sum(m.rss_kib for m in idle) / MIB
        result.pss_idle_mib = sum(m.pss_kib for m in idle) / MIB
        asyncio.run(drive_load(base, bodies, args.concurrency, args.warmup, args.keepalive))  # arenas grown
        samplers = [TreeSampler(root, interval_s=0.5).start() for root in roots]
        load = asyncio.run(drive_load(base, bodies, args.concurrency, args.duration, args.keepalive))
        result.gpu_mib = gpu_memory_mib([pid for root in roots for pid in process_tree(root)])
        for root in roots:
            for role, values in pss_by_role_mib(root).items():
                result.pss_by_role_mib.setdefault(role, []).extend(values)
        series = [sampler.stop() for sampler in samplers]
        combined = list(zip(*series))  # the trees sampled at the same ticks, added up
        result.processes = max(sum(s.processes for s in tick) for tick in combined)
        result.rss_peak_mib = max(sum(s.rss_kib for s in tick) for tick in combined) / MIB
        result.pss_peak_mib = max(sum(s.pss_kib for s in tick) for tick in combined) / MIB
        if triton is not None:
            result.triton_pss_peak_mib = max(s.pss_kib for s in series[1]) / MIB
        result.requests = len(load["latencies"])
        result.errors = {status: count for status, count in load["statuses"].items() if status != "200"}
        result.throughput_per_s = load["statuses"].get("200", 0) / load["elapsed_s"]
        result.p50_ms, result.p99_ms = percentile(load["latencies"], 50), percentile(load["latencies"], 99)
        result.queue_p50_ms = percentile(load["queue_ms"], 50)
        result.inference_p50_ms = percentile(load["inference_ms"], 50)
    finally:
        result.stop_s = stop_tree(process)
        log.close()
    return result


def _stub_pack(size: int) -> ModelPack:
    """A pack manifest with nothing but what the hop needs: its identity and input size."""
    from service.inference.modelpack import ModelPack

    return ModelPack(
        path=Path("unused"),
        manifest={
            "name": "ipc",
            "version": "0",
            "input": {"size": size, "normalization": {"mean": 0.5, "std": 0.25}},
            "detector": {"sha256": "0" * 64, "labels": []},
            "classifier": {"sha256": "0" * 64, "labels": []},
        },
    )


def _stub_outputs(batch: np.ndarray) -> tuple[np.ndarray, ...]:
    """Outputs of the demo pack's shapes, instead of running a model."""
    n = len(batch)
    return np.zeros((n, 100, 4), np.float32), np.zeros((n, 100, 9), np.float32), np.zeros((n, 6), np.float32)


def ipc_round_trip_ms(size: int, images: int) -> dict[str, float]:
    """The hop alone: a 1 x size x size float32 image to an inference server over its socket and the outputs
    back, one at a time, the model replaced by a function returning outputs of the demo pack's shapes."""
    from service.inference.batcher import Batcher
    from service.inference.client import RemoteBatcher, RemoteModels
    from service.inference.protocol import pack_identity
    from service.inference.server import InferenceServer
    from service.inference.state import ServingState
    from service.settings import Settings

    pack = _stub_pack(size)

    async def measure(socket_path: Path) -> dict[str, float]:
        local = Batcher(_stub_outputs, max_batch_size=1, max_delay_s=0.0, max_queue_size=8)
        local.start()
        state = ServingState(pack=pack, models=RemoteModels(socket=socket_path), batcher=local, not_ready_reason="")
        server = InferenceServer(state, Settings(max_batch_size=1))
        listener = await asyncio.get_running_loop().create_unix_server(server.protocol, path=str(socket_path))
        ready = asyncio.Event()
        remote = RemoteBatcher(
            socket_path,
            pack_identity(pack),
            RemoteModels(socket=socket_path),
            lambda reason, _detail: ready.set() if reason == "" else None,
            max_batch_size=1,
        )
        remote.start()
        await asyncio.wait_for(ready.wait(), 10)
        image = np.random.default_rng(0).random((1, size, size), dtype=np.float32)
        timings = {"local": [], "remote": []}
        for _ in range(images):
            for name, batcher in (("local", local), ("remote", remote)):
                started = time.perf_counter()
                await batcher.submit(image)
                timings[name].append((time.perf_counter() - started) * 1e3)
        await remote.stop()
        listener.close()
        await local.stop()
        local_p50, remote_p50 = statistics.median(timings["local"]), statistics.median(timings["remote"])
        return {
            "size": size,
            "image_bytes": 4 * size * size,
            "local_p50_ms": local_p50,
            "remote_p50_ms": remote_p50,
            "hop_p50_ms": remote_p50 - local_p50,
        }

    with tempfile.TemporaryDirectory(prefix="cxr-ipc-", dir="/tmp") as folder:
        return asyncio.run(measure(Path(folder) / "inference.sock"))


def remote_batch_ms(args: argparse.Namespace, logs: Path, batch_sizes=(1, 4, 16)) -> list[dict]:
    """Both models on one batch, nothing else: ONNX Runtime in this process (as `single` runs them) vs the same
    batch sent to a local Triton by the service's own client (service/inference/kserve.py), gRPC and HTTP."""
    from service.inference.kserve import KServeModels
    from service.inference.modelpack import ModelPack, OnnxModels
    from service.settings import InferenceUrl, Settings

    pack = ModelPack.load(args.models)
    settings = Settings(models=args.models, max_batch_size=max(max(batch_sizes), args.max_batch))
    local = OnnxModels(pack, settings=settings)
    repeats = 5 if args.quick else 30
    # One batch per distinct model input size of the pack, as the service's batcher hands them over.
    batches = {
        n: [
            np.random.default_rng(n).standard_normal((n, 1, spec.size, spec.size)).astype(np.float32)
            for spec in pack.input_specs
        ]
        for n in batch_sizes
    }

    async def measure(urls: dict[str, str]) -> list[dict]:
        """Calls of the three ways alternate, so that load from elsewhere on the machine hits them alike."""
        clients = {
            name: KServeModels(InferenceUrl.parse(url), pack, settings, lambda _: None) for name, url in urls.items()
        }
        for client in clients.values():
            await client.start()
        try:
            deadline = time.monotonic() + 60
            while not all(client.ready for client in clients.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            rows = []
            for n, images in batches.items():
                times: dict[str, list[float]] = {"in_process": [], **{name: [] for name in clients}}
                for repeat in range(repeats + 1):  # the first round only warms up (arenas, connections)
                    started = time.perf_counter()
                    local.run(*images)
                    ran = {"in_process": time.perf_counter() - started}
                    for name, client in clients.items():
                        started = time.perf_counter()
                        await client.run(*images)
                        ran[name] = time.perf_counter() - started
                    if repeat:
                        for name, seconds in ran.items():
                            times[name].append(seconds * 1e3)
                rows.append({"batch": n, **{f"{name}_ms": statistics.median(t) for name, t in times.items()}})
            return rows
        finally:
            for client in clients.values():
                await client.stop()

    with local_triton("triton", args, logs) as triton:
        return asyncio.run(measure({"grpc": triton.grpc_url, "http": triton.http_url}))


def markdown_report(
    args: argparse.Namespace,
    machine: dict[str, str],
    results: list[SetupResult],
    ipc: dict,
    input_description: str,
    remote: list[dict] | None = None,
) -> str:
    by_name = {result.name: result for result in results}
    lines = [
        "# Several HTTP workers: shared inference server, one session per worker, or Triton"
        f"{' (quick run)' if args.quick else ''}",
        "",
        f"Command: `python -m benchmarks.multiworker {' '.join(sys.argv[1:])}`".rstrip(),
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += [
        "",
        f"Load: {args.concurrency} concurrent clients, back to back, "
        f"{'one kept-alive connection each' if args.keepalive else 'a new connection per request'}, "
        f"{args.duration:g} s measured after "
        f"{args.warmup:g} s of warm-up load; input: {input_description}. `--workers {args.workers}`, "
        f"max batch {args.max_batch}, providers {args.providers or 'service default'}. "
        "The load generator runs on the same machine.",
        "",
    ]
    header = (
        "| setup | processes | ready (first / all) s | images/s | p50 ms | p99 ms | queue p50 ms | "
        "inference p50 ms | RSS idle MiB | RSS peak MiB | PSS peak MiB | GPU MiB | errors |"
    )
    lines += [header, "| --- " + "| ---: " * 12 + "|"]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
        gpu = "n/a" if r.gpu_mib is None else f"{r.gpu_mib:.0f}"
        lines.append(
            f"| {r.name} | {r.processes} | {r.first_ready_s:.1f} / {r.all_ready_s:.1f} | "
            f"{r.throughput_per_s:.1f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.queue_p50_ms:.1f} | "
            f"{r.inference_p50_ms:.1f} | {r.rss_idle_mib:.0f} | {r.rss_peak_mib:.0f} | {r.pss_peak_mib:.0f} | "
            f"{gpu} | {errors} |"
        )
    tritons = [r for r in results if r.triton_ready_s is not None]
    if tritons:
        lines += ["", "Triton setups: the columns count the service and Triton together; Triton alone:", ""]
        lines += [
            f"- {r.name}: tritonserver ready {r.triton_ready_s:.1f} s after its start (before the service started), "
            f"PSS peak {r.triton_pss_peak_mib:.0f} MiB"
            for r in tritons
        ]
    lines += ["", "PSS by process right after the load (MiB, count × mean):", ""]
    lines += [f"- {r.name}: {roles_text(r.pss_by_role_mib)}" for r in results]
    lines += ["", "Commands (and the provider each reported in /v1/models):", ""]
    lines += [f"- {r.name}: `{r.command}` ({', '.join(r.providers[:1]) or '?'})" for r in results]
    lines += [
        "",
        "The extra hop alone (`shared` only): one float32 image to the inference server and its outputs back, "
        "one at a time, the model replaced by a stub (the pack's input size first, then larger packs' sizes):",
        "",
        "| input | image MiB | in-process p50 ms | over the socket p50 ms | hop p50 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {hop['size']}² | {hop['image_bytes'] / 2**20:.2f} | {hop['local_p50_ms']:.2f} | "
        f"{hop['remote_p50_ms']:.2f} | {hop['hop_p50_ms']:.2f} |"
        for hop in ipc
    ]
    if remote:
        lines += [
            "",
            "The remote path alone: both models on one batch of random 1 x S x S images, median of repeated calls: "
            "ONNX Runtime in the benchmark process vs the service's KServe client (service/inference/kserve.py) "
            "sending it to a local Triton (Python backend running the same ONNX Runtime on the same cores):",
            "",
            "| batch | in-process ms | Triton over gRPC ms | Triton over HTTP ms | gRPC extra per batch ms |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {row['batch']} | {row['in_process_ms']:.1f} | {row['grpc_ms']:.1f} | {row['http_ms']:.1f} | "
            f"{row['grpc_ms'] - row['in_process_ms']:.1f} |"
            for row in remote
        ]
    lines += ["", "## What is traded", "", *tradeoff_lines(by_name, ipc[0])]
    return "\n".join(lines) + "\n"


def tradeoff_lines(by_name: dict[str, SetupResult], ipc: dict) -> list[str]:
    shared, naive, single = by_name.get("shared"), by_name.get("naive"), by_name.get("single")
    lines = []
    if shared and naive:
        saved = naive.pss_peak_mib - shared.pss_peak_mib
        lines.append(
            f"- Memory: `shared` holds one set of ONNX Runtime sessions instead of one per worker, but runs "
            f"one more process: PSS peak {shared.pss_peak_mib:.0f} MiB vs {naive.pss_peak_mib:.0f} MiB for `naive` "
            f"({abs(saved):.0f} MiB {'less' if saved >= 0 else 'more'}; it saves memory once a session set "
            "outweighs one extra Python process with ONNX Runtime loaded)"
            + (
                f"; GPU memory {shared.gpu_mib:.0f} vs {naive.gpu_mib:.0f} MiB."
                if shared.gpu_mib and naive.gpu_mib
                else ". On a GPU the saving is one CUDA context and memory arena per extra worker."
            )
        )
        lines.append(
            f"- Throughput: {shared.throughput_per_s:.1f} vs {naive.throughput_per_s:.1f} images/s; "
            f"p50 {shared.p50_ms:.0f} vs {naive.p50_ms:.0f} ms, p99 {shared.p99_ms:.0f} vs {naive.p99_ms:.0f} ms. "
            "One batcher sees every worker's images, so batches fill better than N half-empty ones; "
            "but one inference process is also one serialisation point."
        )
        lines.append(
            f"- Cold start: {shared.all_ready_s:.1f} s vs {naive.all_ready_s:.1f} s until every worker is "
            "ready (shared: the server warms up first, then the workers start)."
        )
    if shared and single:
        lines.append(
            f"- Against one process: {shared.throughput_per_s:.1f} vs {single.throughput_per_s:.1f} images/s, "
            f"p50 {shared.p50_ms:.0f} vs {single.p50_ms:.0f} ms; memory PSS {shared.pss_peak_mib:.0f} vs "
            f"{single.pss_peak_mib:.0f} MiB (each worker repeats the interpreter, FastAPI, pydicom and the "
            "decode pool's forkserver)."
        )
    lines += triton_tradeoff_lines(by_name)
    lines.append(
        f"- Price per image: one copy of the preprocessed tensor into the socket and out again "
        f"({ipc['image_bytes'] / 2**20:.2f} MiB here), and one more hop: {ipc['hop_p50_ms']:.2f} ms p50, "
        "counted in the `queue` stage the service reports."
    )
    return lines


def triton_tradeoff_lines(by_name: dict[str, SetupResult]) -> list[str]:
    lines = []
    single, triton = by_name.get("single"), by_name.get("triton")
    shared, workers = by_name.get("shared"), by_name.get("triton-workers")
    if single and triton:
        lines.append(
            f"- The remote path (`triton` vs `single`, one HTTP process either way): {triton.throughput_per_s:.1f} vs "
            f"{single.throughput_per_s:.1f} images/s; p50 {triton.p50_ms:.0f} vs {single.p50_ms:.0f} ms, p99 "
            f"{triton.p99_ms:.0f} vs {single.p99_ms:.0f} ms; inference stage p50 {triton.inference_p50_ms:.1f} vs "
            f"{single.inference_p50_ms:.1f} ms (a gRPC round trip to Triton's Python backend, two models at once); "
            f"memory PSS {triton.pss_peak_mib:.0f} vs {single.pss_peak_mib:.0f} MiB."
        )
    if shared and workers:
        lines.append(
            f"- N workers + local Triton vs `--workers N` (`triton-workers` vs `shared`): "
            f"{workers.throughput_per_s:.1f} vs {shared.throughput_per_s:.1f} images/s; p50 {workers.p50_ms:.0f} vs "
            f"{shared.p50_ms:.0f} ms, p99 {workers.p99_ms:.0f} vs {shared.p99_ms:.0f} ms; PSS peak "
            f"{workers.pss_peak_mib:.0f} vs {shared.pss_peak_mib:.0f} MiB (Triton {workers.triton_pss_peak_mib:.0f}); "
            f"{workers.processes} vs {shared.processes} processes; ready {workers.all_ready_s:.1f} s after Triton's "
            f"{workers.triton_ready_s:.1f} s vs {shared.all_ready_s:.1f} s."
        )
    return lines


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.duration, args.warmup = min(args.duration, 5.0), min(args.warmup, 2.0)
    out = args.out or RESULTS / ("multiworker-quick" if args.quick else "multiworker")
    manifest = json.loads((args.models / "manifest.json").read_text())
    spec = input_set("uncompressed")
    bodies = read_bodies(make_input_set(spec))[: 4 if args.quick else None]
    load_at_start = load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="cxr-multiworker-") as logs:
        for name in args.setups:
            print(f"[multiworker] {name} ...", flush=True)
            try:
                results.append(run_setup(name, args, bodies, Path(logs)))
            except RuntimeError as exc:
                print(
                    f"[multiworker] {name} failed: {exc}\n{(Path(logs) / f'{name}.log').read_text()[-3000:]}",
                    file=sys.stderr,
                )
                raise
            print(f"[multiworker] {name}: {json.dumps(asdict(results[-1]))}", flush=True)
    pack_size = max(input_sizes(manifest))
    machine = describe_machine(manifest, sorted({p for r in results for p in r.providers[:1]}), load_at_start)
    machine["GPU"] = gpu_description()
    ipc = [
        ipc_round_trip_ms(size, images=50 if args.quick else 300)
        for size in [pack_size] + [size for size in (512, 1024) if size > pack_size]
    ]
    remote = None
    if any(name in TRITON_SETUPS for name in args.setups):
        with tempfile.TemporaryDirectory(prefix="cxr-remote-") as logs:
            remote = remote_batch_ms(args, Path(logs))
    report = markdown_report(
        args, machine, results, ipc, f"{len(bodies)} x {spec.description}, {spec.rows} x {spec.cols}", remote
    )
    machine["Load average at end (1/5/15 min)"] = load_average()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "machine": machine,
                "settings": {key: str(value) for key, value in vars(args).items()},
                "setups": [asdict(result) for result in results],
                "ipc_hop": ipc,
                "remote_batch_ms": remote,
            },
            indent=2,
        )
        + "\n"
    )
    print(report)
    print(f"written: {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.multiworker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="5 s of load per setup, 4 input files: a smoke run")
    parser.add_argument("--workers", type=int, default=2, help="HTTP workers in the shared and naive setups")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of measured load per setup")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of unmeasured load first")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--keepalive", action="store_true", help="reuse each client's connection (one worker may then get most of them)"
    )
    parser.add_argument("--models", type=Path, default=DEFAULT_PACK)
    parser.add_argument(
        "--providers",
        default=None,
        help="CXR_PROVIDERS for every setup, e.g. '[\"CPUExecutionProvider\"]' (default: the service's)",
    )
    parser.add_argument(
        "--setups",
        type=lambda text: text.split(","),
        default=list(SETUPS),
        help="comma-separated subset of " + ",".join(SETUPS),
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
