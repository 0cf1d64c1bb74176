"""What the numbers were measured on: CPU, cores, memory, OS, Python, ONNX Runtime, model pack, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model(cpuinfo_text: str) -> str:
    """The first 'model name' of /proc/cpuinfo (x86) or 'Hardware'/'CPU part' lines elsewhere."""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        for line in cpuinfo_text.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or "unknown"


def memory_total_gib(meminfo_text: str) -> float:
    for line in meminfo_text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def os_name(os_release_text: str) -> str:
    for line in os_release_text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def git_commit(root: Path = ROOT) -> str:
    """HEAD's commit, with '+uncommitted changes' when the work tree differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


def load_average() -> str:
    """1, 5 and 15 minute load averages: anything else running on the machine shows up here."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def describe_host(load_at_start: str) -> dict[str, str]:
    """CPU, cores, memory, OS, Python, commit and load of this machine, as display strings in the summaries' order.

    `load_at_start` is taken before the benchmark's own work (load_average()), which would otherwise show in it.
    """
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu_model(_read("/proc/cpuinfo")),
        "Cores": f"{os.cpu_count()} logical ({usable_cores} usable by this process)",
        "Memory": f"{memory_total_gib(_read('/proc/meminfo')):.1f} GiB",
        "OS": f"{os_name(_read('/etc/os-release'))} ({platform.platform()})",
        "Python": f"{platform.python_version()} ({platform.python_implementation()})",
        "Git commit": git_commit(),
        "Load average at start (1/5/15 min)": load_at_start,
    }


def input_sizes(pack_manifest: dict) -> tuple[int, int]:
    """(detector, classifier) input size, read as the service reads it."""
    from service.inference.modelpack import MODELS, model_input_entry  # here: the other benchmarks need no ONNX Runtime

    detector, classifier = (int(model_input_entry(pack_manifest, model)["size"]) for model in MODELS)
    return detector, classifier


def describe_input_sizes(pack_manifest: dict) -> str:
    """'384²' when both models take one size, else '1024² detector / 512² classifier'."""
    detector, classifier = input_sizes(pack_manifest)
    return f"{detector}²" if detector == classifier else f"{detector}² detector / {classifier}² classifier"


def describe_machine(pack_manifest: dict, providers_in_use: list[str], load_at_start: str) -> dict[str, str]:
    """describe_host() with ONNX Runtime and the model pack the numbers were measured with, before the commit."""
    import onnxruntime as ort

    host = list(describe_host(load_at_start).items())
    models = [
        (
            "ONNX Runtime",
            f"{ort.__version__}; providers available: {', '.join(ort.get_available_providers())}; "
            f"in use: {', '.join(providers_in_use)}",
        ),
        (
            "Model pack",
            f"{pack_manifest['name']} {pack_manifest['version']} (detector sha256 "
            f"{pack_manifest['detector']['sha256'][:12]}…, classifier sha256 "
            f"{pack_manifest['classifier']['sha256'][:12]}…, input {describe_input_sizes(pack_manifest)})",
        ),
    ]
    at = [key for key, _ in host].index("Git commit")
    return dict(host[:at] + models + host[at:])
