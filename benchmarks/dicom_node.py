"""The DICOM node against the HTTP path on the same machine: ingest throughput and time to result.

    python -m benchmarks.dicom_node            # about 5 minutes on 2 cores
    python -m benchmarks.dicom_node --quick    # about 2 minutes, indicative only

One service process (`python -m service --dicom-port D`, the demo pack) serves both ways in; dcmtk's
`storescp` is the destination the node sends its SRs to. For each input set (1,643 x 1,349 phantoms,
uncompressed and JPEG 2000 lossless), on images nobody sent before (fresh SOP Instance UIDs, so the
node's duplicate check never short-cuts):

  burst       DICOM: `--senders` storescu processes send `--images` images at once; the ingest rate is
              images acknowledged per second (acknowledged = durably spooled), the completion rate images
              whose SR the destination confirmed per second, and time to result, per image, from its
              C-STORE acknowledgement to the destination's confirmation of its SR (from /v1/jobs).
              HTTP: `--senders` clients post the same number of images with format=sr, back to back; the
              rate is answers per second and time to result is the request's latency.
  one by one  each image sent only after the previous one's result is in: the time to result without
              a queue (DICOM: acknowledgement -> SR confirmed; HTTP: latency of POST /v1/predict?format=sr).

The load generators run on the same machine and take CPU from the service. Results:
benchmarks/results/dicom_node.{md,json} (`--quick`: dicom_node-quick.*), with the commit that produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from benchmarks.inputs import input_set, make_input_set
from benchmarks.machine import describe_machine, load_average
from benchmarks.servers import free_port, log_tail, stop_server_process, wait_until_ready
from service.settings import DEFAULT_PACK

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
AE = "PCXR-AI"


def fresh_copies(sources: list[Path], count: int, folder: Path) -> list[Path]:
    """`count` files cycling through `sources`, each with a new SOP Instance UID (pixel data untouched)."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for index in range(count):
        ds = dcmread(sources[index % len(sources)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        copies.append(path)
    return copies


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan")}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


class Service:
    """The service with its node, and a storescp sink for the node's SRs."""

    def __init__(self, models: Path, folder: Path) -> None:
        self.folder = folder
        self.http_port, self.dicom_port, sink_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.sink = subprocess.Popen(
            ["storescp", "--ignore", "-aet", "SINK", str(sink_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        destinations = [
            {"kind": "dimse", "ae_title": "SINK", "host": "127.0.0.1", "port": sink_port, "outputs": ["sr"]}
        ]
        env = os.environ | {
            "CXR_DICOM_DESTINATIONS": json.dumps(destinations),
            "CXR_DICOM_SPOOL_DIR": str(folder / "spool"),
        }
        command = [sys.executable, "-m", "service", "--port", str(self.http_port), "--models", str(models)]
        command += ["--dicom-port", str(self.dicom_port), "--log-level", "warning"]
        self.command = " ".join(["python", *command[1:]])
        self.log = folder / "service.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if not wait_until_ready(self.url, self.process, 300):
            self.stop()
            raise RuntimeError(f"the service did not start; log:\n{log_tail(self.log)}")

    def stop(self) -> None:
        stop_server_process(self.process)
        self.sink.terminate()
        self.sink.wait(10)

    def jobs(self) -> list[dict]:
        return httpx.get(f"{self.url}/v1/jobs", params={"limit": 1000}, timeout=60).json()["jobs"]

    def wait_delivered(self, count: int, timeout_s: float = 900) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            jobs = self.jobs()
            delivered = [job for job in jobs if job["state"] == "delivered"]
            if len(delivered) >= count:
                return delivered
            if any(job["state"] in ("dead", "failed") for job in jobs):
                raise RuntimeError(f"a job failed: {[j for j in jobs if j['state'] in ('dead', 'failed')][:1]}")
            time.sleep(0.1)
        raise RuntimeError("results did not arrive in time")

    def storescu(self, files: list[Path]) -> subprocess.Popen:
        # storescu offers only uncompressed syntaxes by default and cannot transcode: offer JPEG 2000 lossless too.
        proposal = (
            ["-xv"] if dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed else []
        )
        command = ["storescu", *proposal, "-aet", "MODALITY", "-aec", AE, "127.0.0.1", str(self.dicom_port)]
        command += map(str, files)
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def node_burst(service: Service, files: list[Path], senders: int) -> dict:
    done_before = {job["job_id"] for job in service.jobs()}
    slices = [files[index::senders] for index in range(senders)]
    started = time.time()
    processes = [service.storescu(part) for part in slices if part]
    for process in processes:
        _, errors = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {errors[-2000:]}")
    acknowledged = time.time()
    delivered = [j for j in service.wait_delivered(len(done_before) + len(files)) if j["job_id"] not in done_before]
    finished = max(job["deliveries"][0]["delivered_at"] for job in delivered)
    return {
        "images": len(files),
        "ingest_per_s": len(files) / (acknowledged - started),
        "results_per_s": len(files) / (finished - started),
        "time_to_result_s": percentiles(
            [job["deliveries"][0]["delivered_at"] - job["received_at"] for job in delivered]
        ),
    }


def node_one_by_one(service: Service, files: list[Path]) -> dict:
    times = []
    for path in files:
        before = {job["job_id"] for job in service.jobs()}
        process = service.storescu([path])
        if process.wait() != 0:
            raise RuntimeError("storescu failed")
        job = next(j for j in service.wait_delivered(len(before) + 1) if j["job_id"] not in before)
        times.append(job["deliveries"][0]["delivered_at"] - job["received_at"])
    return {"images": len(files), "time_to_result_s": percentiles(times)}


async def http_run(url: str, bodies: list[bytes], concurrency: int) -> dict:
    latencies: list[float] = []
    headers = {"Content-Type": "application/dicom", "Accept": "application/dicom"}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        queue = list(range(len(bodies)))

        async def one_client() -> None:
            while queue:
                body = bodies[queue.pop()]
                began = time.perf_counter()
                response = await client.post("/v1/predict", params={"format": "sr"}, content=body, headers=headers)
                response.raise_for_status()
                latencies.append(time.perf_counter() - began)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"images": len(bodies), "results_per_s": len(bodies) / elapsed, "time_to_result_s": percentiles(latencies)}


def run_input_set(service: Service, name: str, args: argparse.Namespace, work: Path) -> dict:
    sources = make_input_set(input_set(name))
    warm = fresh_copies(sources, 2, work / f"{name}-warm")
    node_burst(service, warm, 1)  # first images through the node: pools and codecs warm
    burst = fresh_copies(sources, args.images, work / f"{name}-burst")
    single = fresh_copies(sources, args.one_by_one, work / f"{name}-single")
    bodies = [path.read_bytes() for path in fresh_copies(sources, args.images, work / f"{name}-http")]
    result = {
        "dicom_burst": node_burst(service, burst, args.senders),
        "dicom_one_by_one": node_one_by_one(service, single),
        "http_burst": asyncio.run(http_run(service.url, bodies, args.senders)),
        "http_one_by_one": asyncio.run(http_run(service.url, bodies[: args.one_by_one], 1)),
    }
    for folder in work.glob(f"{name}-*"):
        shutil.rmtree(folder)
    return result


def markdown(results: dict, machine: dict[str, str], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# DICOM node vs HTTP: ingest throughput and time to result",
        "",
        f"Command: `python -m benchmarks.dicom_node{' --quick' if args.quick else ''}`",
        "",
        *[f"- {key}: {value}" for key, value in machine.items()],
        "",
        f"Service: `{command}`, one process serving both ways in; the node's destination is dcmtk `storescp "
        "--ignore` on loopback (outputs: SR). Inputs: 1,643 x 1,349 16-bit phantoms, each sent once with a fresh "
        f"SOP Instance UID. Burst: {args.images} images from {args.senders} senders at once (storescu processes, "
        f"or HTTP clients posting format=sr back to back); one by one: {args.one_by_one} images, each after the "
        "previous result. DICOM time to result: C-STORE acknowledged -> the destination confirmed the SR "
        "(/v1/jobs); HTTP: the request's latency (the SR is the answer).",
        "",
        "| input | path | mode | images | acknowledged/s | results/s | time to result p50 s | p95 s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        for key, row in result.items():
            path, mode = key.split("_", 1)
            ingest = f"{row['ingest_per_s']:.1f}" if "ingest_per_s" in row else "–"
            rate = f"{row['results_per_s']:.2f}" if "results_per_s" in row else "–"
            ttr = row["time_to_result_s"]
            lines.append(
                f"| {name} | {'DICOM (C-STORE)' if path == 'dicom' else 'HTTP'} | {mode.replace('_', ' ')} | "
                f"{row['images']} | {ingest} | {rate} | {ttr['p50']:.2f} | {ttr['p95']:.2f} |"
            )
    lines += [
        "",
        "Reading it: the node acknowledges an image once it is on disk, so its ingest rate is bounded by the "
        "network and fsync, not by the model; the results then come at the pipeline's rate, the same one HTTP "
        "gets (both share the decode pool and the batcher). In a burst the DICOM time to result includes the "
        "wait behind the images acknowledged before it; one by one it is the pipeline plus rendering, spooling "
        "the SR and one C-STORE association to the destination.",
    ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        raise SystemExit("dcmtk's storescu and storescp are needed (Debian: apt-get install dcmtk)")
    load_at_start = load_average()
    manifest = json.loads((args.models / "manifest.json").read_text())
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-dicom-node-") as tmp:
        work = Path(tmp)
        service = Service(args.models, work)
        try:
            providers = httpx.get(f"{service.url}/v1/models", timeout=30).json()["providers"]
            for name in args.input_sets:
                print(f"{name}: sending…", flush=True)
                results[name] = run_input_set(service, name, args, work)
                print(json.dumps(results[name], indent=1), flush=True)
        finally:
            service.stop()
    machine = describe_machine(manifest, providers[:1], load_at_start)
    out = args.out or RESULTS / ("dicom_node-quick" if args.quick else "dicom_node")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(results, machine, args, service.command.replace(str(ROOT) + "/", "")))
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "machine": machine,
                "args": vars(args) | {"models": str(args.models), "out": str(out)},
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out.with_suffix('.md')}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dicom_node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_PACK)
    parser.add_argument("--input-sets", nargs="+", default=["uncompressed", "j2k"], choices=["uncompressed", "j2k"])
    parser.add_argument("--images", type=int, default=48, help="images per burst")
    parser.add_argument("--senders", type=int, default=4, help="storescu processes / HTTP clients in a burst")
    parser.add_argument("--one-by-one", type=int, default=10, help="images sent one at a time")
    parser.add_argument("--quick", action="store_true", help="16 images per burst, 4 one by one")
    parser.add_argument("--out", type=Path, default=None, help="results path without suffix")
    return parser


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    if arguments.quick:
        arguments.images, arguments.one_by_one = 16, 4
    main(arguments)
