"""Where our service's CPU goes under HTTP load: per-thread CPU from /proc and a py-spy profile of the GIL.

    python -m benchmarks.profile [--users 32] [--seconds 15] [--input-set uncompressed]
                                 [--out benchmarks/results/profile]

Starts `python -m service` with the demo pack, drives it with locust (as benchmarks.throughput does), and
while it is under load takes, over the same window:
  * each thread's CPU time from /proc/PID/task (native ONNX Runtime threads included),
  * `py-spy record --gil`: which Python thread holds the GIL, in which frames (needs py-spy:
    `pip install py-spy`; the dev extra installs it).
Writes `<input set>.md` (tables) and `<input set>.pyspy.txt` (py-spy's raw, collapsed stacks) to --out.
The profiler slows the server down, so the request rate in the report is below the benchmark's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.inputs import INPUT_SETS, input_set, make_input_set
from benchmarks.loadgen import run_level
from benchmarks.machine import describe_machine, load_average
from benchmarks.procfs import cpu_ticks, process_tree
from benchmarks.servers import ServerSpec, served_providers, start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
TICKS_PER_S = 100  # os.sysconf("SC_CLK_TCK") on Linux
SAMPLE_RATE = 100  # py-spy samples per second
_THREAD = re.compile(r"^thread \((\d+)\): (.*)$")


def find_py_spy() -> str:
    beside_python = Path(sys.executable).parent / "py-spy"
    found = str(beside_python) if beside_python.is_file() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: `pip install py-spy` (or `pip install -e '.[dev]'`).")
    return found


def images_predicted(base_url: str) -> float:
    """The server's own count of answered images (Prometheus counter on /metrics)."""
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("cxr_images_predicted_total "):
            return float(line.split()[1])
    raise RuntimeError("no cxr_images_predicted_total on /metrics")


def thread_ticks(pids: list[int]) -> dict[tuple[int, int], int]:
    """CPU clock ticks of every thread of the given processes, keyed by (pid, tid)."""
    ticks = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError, IndexError):  # the thread ended meanwhile
                ticks[(pid, int(task.name))] = cpu_ticks((task / "stat").read_text())
    return ticks


@dataclass
class GilProfile:
    samples_by_thread: collections.Counter  # tid -> samples holding the GIL
    names: dict[int, str]  # tid -> Python thread name
    inclusive: dict[str, collections.Counter]  # thread name -> frame -> samples it is on the stack of


def read_collapsed(text: str) -> GilProfile:
    """py-spy's raw output: one `thread (TID): NAME;frame;frame... COUNT` line per distinct stack."""
    samples, names, inclusive = collections.Counter(), {}, collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        match = _THREAD.match(frames[0])
        if not match or not count.isdigit():
            continue
        tid, name = int(match.group(1)), re.sub(r"_\d+$", "", match.group(2).strip('"'))
        samples[tid] += int(count)
        names[tid] = name
        for frame in dict.fromkeys(re.sub(r":\d+\)$", ")", frame) for frame in frames[1:]):
            inclusive[name][frame] += int(count)
    return GilProfile(samples, names, inclusive)


def render(
    profile: GilProfile,
    cpu: dict[tuple[int, int], int],
    seconds: float,
    requests: float,
    users: int,
    spec_name: str,
    main_pid: int,
    started: str,
    machine: dict[str, str],
) -> str:
    rate = requests / seconds
    lines = [
        f"# Where the CPU goes: our service under HTTP load ({spec_name} inputs)",
        "",
        f"Command: `python -m benchmarks.profile --users {users} --seconds {seconds:g} --input-set {spec_name}`, "
        f"run {started}. Locust drives `python -m service` (demo pack) with {users} closed-loop users; over "
        f"{seconds:g} s under load, each thread's CPU time is read from /proc and `py-spy record --gil` samples "
        f"{SAMPLE_RATE}×/s the thread holding the GIL. Served {requests:.0f} images in that window "
        f"({rate:.1f}/s, the server's own count on /metrics); the profiler costs throughput, see "
        f"throughput/summary.md for the unprofiled rate.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in machine.items()],
        "",
        *thread_table(per_thread_usage(profile, cpu, seconds, main_pid), seconds, requests),
        *frame_tables(profile, requests),
    ]
    return "\n".join(lines)


def per_thread_usage(
    profile: GilProfile, cpu: dict[tuple[int, int], int], seconds: float, main_pid: int
) -> dict[str, list[float]]:
    """Thread name -> [CPU cores, GIL seconds]; threads of one name summed, unnamed ones grouped by process."""
    per_thread: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for (pid, tid), ticks in cpu.items():
        name = profile.names.get(tid) or ("native (ONNX Runtime, uvloop)" if pid == main_pid else "decode processes")
        per_thread[name][0] += ticks / TICKS_PER_S / seconds
    for tid, samples in profile.samples_by_thread.items():
        per_thread[profile.names[tid]][1] += samples / SAMPLE_RATE
    return per_thread


def thread_table(per_thread: dict[str, list[float]], seconds: float, requests: float) -> list[str]:
    lines = [
        "## Threads",
        "",
        "| thread | CPU (cores) | CPU per request (ms) | GIL held (s) | GIL per request (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (cores, gil_s) in sorted(per_thread.items(), key=lambda item: -item[1][0]):
        if cores < 0.005 and gil_s < 0.05:
            continue
        lines.append(
            f"| {name} | {cores:.2f} | {cores * seconds / requests * 1e3:.1f} | {gil_s:.1f} | "
            f"{gil_s / requests * 1e3:.1f} |"
        )
    total = sum(cores for cores, _ in per_thread.values())
    return [
        *lines,
        f"| **all** | **{total:.2f}** | **{total * seconds / requests * 1e3:.1f}** | | |",
        "",
        "Threads with the same name are summed (decode-native = both decode threads). Native threads "
        "(ONNX Runtime's intra-op pool, uvloop's) hold no GIL and are invisible to py-spy. CPU is time on a "
        "core; GIL held is wall time holding the GIL, on a core or not (on two busy cores a thread is often "
        "preempted while it holds it), so it can exceed the CPU time.",
        "",
    ]


def frame_tables(profile: GilProfile, requests: float) -> list[str]:
    """The busiest frames holding the GIL, per thread that matters for a request."""
    lines: list[str] = []
    for name in ("MainThread", "decode-native", "inference"):
        frames = profile.inclusive.get(name)
        if not frames:
            continue
        lines += [
            f"## {name}: frames holding the GIL (inclusive)",
            "",
            "| seconds | ms per request | frame |",
            "| ---: | ---: | --- |",
        ]
        everywhere = max(frames.values())  # the thread's entry frames are on every sample: not worth a row
        busiest = [(frame, samples) for frame, samples in frames.most_common() if samples < everywhere]
        for frame, samples in busiest[: 30 if name == "MainThread" else 15]:
            lines.append(f"| {samples / SAMPLE_RATE:.2f} | {samples / SAMPLE_RATE / requests * 1e3:.2f} | `{frame}` |")
        lines.append("")
    return lines


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0, help="profiled window under load")
    parser.add_argument("--input-set", choices=[spec.name for spec in INPUT_SETS], default="uncompressed")
    parser.add_argument("--models", type=Path, default=ROOT / "models" / "demo-synthetic")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    py_spy = find_py_spy()
    spec = input_set(args.input_set)
    inputs = make_input_set(spec)
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_at_start = load_average()
    server = start_server(service_spec(args.models), args.out)
    warmup_s = 8.0
    raw_path = args.out / f"{spec.name}.pyspy.txt"
    try:
        load: dict = {}
        driver = threading.Thread(
            target=lambda: load.setdefault(
                "run",
                run_level(
                    server.base_url,
                    args.users,
                    warmup_s + args.seconds + 4,
                    warmup_s,
                    inputs[0].parent,
                    args.out / f"{spec.name}_locust",
                ),
            )
        )
        driver.start()
        time.sleep(warmup_s + 2)
        pids = process_tree(server.process.pid)
        count_before, before = images_predicted(server.base_url), thread_ticks(pids)
        print(f"profiling pid {server.process.pid} for {args.seconds:g} s ...", flush=True)
        record_gil(py_spy, server.process.pid, args.seconds, raw_path)
        after, count_after = thread_ticks(pids), images_predicted(server.base_url)
        machine = describe_machine(
            json.loads((args.models / "manifest.json").read_text()), served_providers(server.base_url), load_at_start
        )
        driver.join()
    finally:
        stop_server(server)
    if "run" not in load:
        raise SystemExit(f"the load generator failed; see {args.out}/{spec.name}_locust_locust.log")
    cpu = {key: after[key] - before.get(key, 0) for key in after}
    report = render(
        read_collapsed(raw_path.read_text()),
        cpu,
        args.seconds,
        count_after - count_before,
        args.users,
        spec.name,
        server.process.pid,
        started,
        machine,
    )
    (args.out / f"{spec.name}.md").write_text(report + "\n")
    print(f"wrote {args.out / (spec.name + '.md')}")


def service_spec(models: Path) -> ServerSpec:
    """Our service as `benchmarks.servers` starts it: `python -m service` with the pack, quiet logs."""
    command = [sys.executable, "-m", "service", "--port", "{port}", "--models", str(models), "--log-level", "warning"]
    return ServerSpec("ours", "ours", command, "")


def record_gil(py_spy: str, pid: int, seconds: float, raw_path: Path) -> None:
    """`py-spy record --gil` of every thread of `pid` for `seconds`, as raw collapsed stacks."""
    options = f"record --gil --threads -r {SAMPLE_RATE} -d {seconds:g} -f raw --pid {pid} -o"
    subprocess.run([py_spy, *shlex.split(options), str(raw_path)], check=True, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
