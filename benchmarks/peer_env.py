"""The peers' own virtual environment (benchmarks/.venv-peers, git-ignored), made by the benchmark itself.

The serving framework a peer needs (Ray Serve) is installed there, never into the project's .venv,
so the project's dependencies stay untouched. The repository is installed into it editable (the
peers import `service`), and the packages on the compute path (ONNX Runtime, numpy, the DICOM
codecs, ...) are pinned to the versions of the environment running the benchmark, so peer and
service decode and infer with the same code. This is the only step of the benchmark that downloads
anything (pip packages, on the first run or after a version change).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / "benchmarks" / ".venv-peers"
FRAMEWORK_REQUIREMENTS = ("ray[serve]==2.60.0",)
# Same versions as the benchmark's own environment: these decide decode and inference speed and the JSON.
PINNED_FROM_HERE = (
    "onnxruntime-gpu",
    "onnxruntime",
    "numpy",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "imagecodecs",
    "pillow",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
)
STAMP = ".bench-requirements.json"


def pinned_versions(names: tuple[str, ...] = PINNED_FROM_HERE) -> list[str]:
    """`name==version` for each of `names` installed here (the ones not installed are left out)."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def requirements_key(requirements: list[str], constraints: list[str]) -> str:
    """What the venv was built from; any change (versions, pyproject.toml, the checkout's path) means installing
    again."""
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return json.dumps(
        {"requirements": requirements, "constraints": constraints, "pyproject": pyproject, "repository": str(ROOT)},
        sort_keys=True,
    )  # the editable install points here


def peer_python(venv: Path = PEER_VENV) -> Path:
    return venv / "bin" / "python"


def ensure_peer_venv(progress: Callable[[str], None] = print, venv: Path = PEER_VENV) -> Path:
    """The peer venv's python, creating or updating the venv first when needed."""
    requirements, constraints = list(FRAMEWORK_REQUIREMENTS), pinned_versions()
    key = requirements_key(requirements, constraints)
    stamp = venv / STAMP
    if peer_python(venv).is_file() and stamp.is_file() and stamp.read_text() == key:
        return peer_python(venv)
    progress(
        f"setting up the peers' virtual environment {venv.relative_to(ROOT)} "
        f"(pip: the repository + {', '.join(requirements)}; first run only, a few minutes)"
    )
    if not peer_python(venv).is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints_file = venv / "constraints.txt"
    constraints_file.write_text("\n".join(constraints) + "\n")
    log = venv / "pip-install.log"
    with log.open("w") as handle:
        result = subprocess.run(
            [
                str(peer_python(venv)),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-c",
                str(constraints_file),
                "-e",
                str(ROOT),
                *requirements,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        raise RuntimeError(f"pip could not set up {venv}; see {log}:\n{log.read_text()[-2000:]}")
    stamp.write_text(key)
    return peer_python(venv)
