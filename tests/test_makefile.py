"""`make serve` and `make test` install once, and again only when pyproject.toml changes (stamp files)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _dry_run(target: str, venv: Path, *make_args: str) -> str:
    """The commands `make <target>` would run with this venv (make -n runs nothing)."""
    done = subprocess.run(
        ["make", "-n", target, f"VENV={venv}", *make_args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def venv(tmp_path) -> Path:
    """A stand-in venv: make only checks that its python exists."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    return tmp_path


def test_serve_installs_once_then_only_when_pyproject_changes(venv):
    """`make serve` installs, then only serves, and installs again once pyproject.toml is newer (make -W)."""
    assert "pip install -q -e ." in _dry_run("serve", venv)
    (venv / ".installed-service").touch()
    commands = _dry_run("serve", venv)
    assert "pip install" not in commands and "-m service --host 127.0.0.1 --port 8000" in commands
    assert "pip install -q -e ." in _dry_run("serve", venv, "-W", "pyproject.toml")


def test_full_install_counts_as_a_service_install(venv):
    """`make test`'s full install marks the service installed too; a service-only install does not skip it."""
    (venv / ".installed-service").touch()
    assert 'pip install -q -e ".[train,dev]"' in _dry_run("install-all", venv)
    (venv / ".installed-all").touch()
    assert "pip install" not in _dry_run("install-all", venv)
    assert "pip install" not in _dry_run("serve", venv)
