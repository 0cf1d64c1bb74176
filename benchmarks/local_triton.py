"""A real NVIDIA Triton server on this machine, for the tests and benchmarks (and for trying the Triton path
on a laptop): the `tritonserver` binary that the `nvidia-pytriton` wheel ships, on CPU, Python backend only.

    python -m benchmarks.local_triton --setup                          # create .triton-venv/ once (~1 min)
    python -m benchmarks.local_triton --repository /tmp/cxr-triton     # serve on 127.0.0.1:8000/8001/8002

nvidia-pytriton pins numpy<2, which the service cannot use, so the server gets its own virtual environment
(.triton-venv/ at the repository root, git-ignored, created once): numpy<2, the same onnxruntime version as the
service (so both compute the same numbers) and the wheel without its Python dependencies, of which the binary
and its Python backend need none. The Python-backend stub links libpython3.11 (Debian package `libpython3.11`).

Every server started here runs in its own process group, so that stopping it also stops the backend stub
processes it forked, and uses its own shared-memory prefix, whose /dev/shm regions are removed after it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import venv
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / ".triton-venv"
PYTRITON = "nvidia-pytriton==0.7.0"  # Triton 2.51 inside
MARKER = "cxr-triton-venv.json"
SHM = Path("/dev/shm")


def onnxruntime_version() -> str:
    """The service's ONNX Runtime version (the GPU build's numbers on CPU are the CPU build's)."""
    for distribution in ("onnxruntime-gpu", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    raise RuntimeError("onnxruntime is not installed in this environment")


def server_requirements() -> list[str]:
    return ["numpy>=1.26,<2", f"onnxruntime=={onnxruntime_version()}"]


@dataclass(frozen=True)
class TritonInstall:
    """Where the server's pieces are in a virtual environment made by `ensure_venv`."""

    venv: Path

    @property
    def site_packages(self) -> Path:
        return self.venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"

    @property
    def server_dir(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.venv / "triton-backends"

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The server's environment: the wheel's libraries and this Python's libpython on the loader path; the
        venv's bin first on PATH, which is how the backend stub finds its interpreter (it ignores PYTHONPATH)."""
        env = dict(os.environ if base is None else base)
        libraries = [str(self.site_packages / "nvidia_pytriton.libs"), str(sysconfig.get_config_var("LIBDIR"))]
        env["LD_LIBRARY_PATH"] = ":".join(libraries + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        return env

    def assemble_backends(self) -> None:
        """Triton wants <backend-directory>/python/{libtriton_python.so, triton_python_backend_utils.py, stub}; the
        wheel keeps one stub per Python version apart."""
        target = self.backends / "python"
        target.mkdir(parents=True, exist_ok=True)
        source = self.server_dir / "backends" / "python"
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(source / name, target / name)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(self.server_dir / "python_backend_stubs" / version / "triton_python_backend_stub", target)


def _pip(venv_dir: Path, *args: str) -> None:
    subprocess.run([str(venv_dir / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True)


def ensure_venv(venv_dir: Path = DEFAULT_VENV, log=print) -> TritonInstall:
    """The server's environment, created on first use (one process at a time; others wait for it)."""
    wanted = {"requirements": server_requirements(), "pytriton": PYTRITON, "python": sys.version.split()[0]}
    install = TritonInstall(venv_dir)
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    with (venv_dir.parent / f"{venv_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = venv_dir / MARKER
        with contextlib.suppress(OSError, ValueError):
            if json.loads(marker.read_text()) == wanted and install.binary.is_file():
                return install
        log(f"creating the Triton server environment in {venv_dir} ({PYTRITON}, {', '.join(wanted['requirements'])})")
        started = time.monotonic()
        shutil.rmtree(venv_dir, ignore_errors=True)
        venv.create(venv_dir, with_pip=True)
        _pip(venv_dir, *wanted["requirements"])
        # --no-deps: its Python dependencies (tritonclient, grpcio, pyzmq, ...) serve pytriton's own API only.
        _pip(venv_dir, "--no-deps", PYTRITON)
        install.assemble_backends()
        marker.write_text(json.dumps(wanted))
        log(f"Triton server environment ready after {time.monotonic() - started:.0f} s")
        return install


class TritonServer:
    """One tritonserver process on 127.0.0.1 serving `repository`: start, wait_ready, kill (crash), stop."""

    def __init__(
        self,
        install: TritonInstall,
        repository: Path,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        log_path: Path,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.install = install
        self.repository = repository
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_path = log_path
        self.extra_args = extra_args
        self.shm_prefix = f"cxr_triton_{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None  # start -> /v2/health/ready, once wait_ready has seen it

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backends}",
            f"--cache-directory={self.install.server_dir / 'caches'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # No GPU here: no pinned or CUDA memory pools to set up.
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--disable-auto-complete-config",  # serve the exported configs as written, nothing guessed
            "--exit-timeout-secs=5",
            # A prefix of its own, so that the regions of a killed server can be found and removed.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.install.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: the backend stubs stop with it
            )
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 120.0) -> TritonServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited before it was ready; its log:\n{self.log_tail()}")
            if self.ready():
                self.ready_s = time.monotonic() - self.started_at
                return self
            time.sleep(0.1)
        raise RuntimeError(f"tritonserver was not ready within {timeout_s:g} s; its log:\n{self.log_tail()}")

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash: no draining), then remove its shared memory."""
        self._signal_group(signal.SIGKILL)
        self._wait(10.0)
        self.remove_shared_memory()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Triton finishes what is in flight), SIGKILL for whatever is left; shared memory removed."""
        self._signal_group(signal.SIGTERM)
        if not self._wait(timeout_s):
            self._signal_group(signal.SIGKILL)
            self._wait(10.0)
        # Stubs outlive a server that exits on SIGTERM: whatever is left of the group goes too.
        self._signal_group(signal.SIGKILL)
        self.remove_shared_memory()

    def _signal_group(self, signum: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def _wait(self, timeout_s: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def remove_shared_memory(self) -> None:
        for region in SHM.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.local_triton",
        description="Run the nvidia-pytriton wheel's tritonserver on 127.0.0.1 (CPU, Python backend).",
    )
    parser.add_argument("--setup", action="store_true", help="only create the server's environment")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--repository", type=Path, help="model repository (python -m service.triton_repository)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "cxr-tritonserver.log")
    return parser


def main(args: argparse.Namespace) -> int:
    install = ensure_venv(args.venv)
    if args.setup:
        print(f"tritonserver: {install.binary}")
        return 0
    if args.repository is None:
        print("python -m benchmarks.local_triton: error: --repository is required (or --setup)", file=sys.stderr)
        return 2
    server = TritonServer(
        install, args.repository.resolve(), args.http_port, args.grpc_port, args.metrics_port, args.log.resolve()
    )
    # SIGTERM, and SIGINT even when started in the background (where the shell ignores it), stop the server
    # through the with block, so that its process group and shared memory go too.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt), server.start():
        server.wait_ready()
        print(f"Triton ready: {server.grpc_url} (gRPC), {server.http_url} (HTTP); log {args.log}; Ctrl-C stops it")
        server.process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
