"""Checks shared by the tests of the DICOM outputs: dciodvfy's verdict, and an upload as the service holds it."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from training.synthetic import dicom_bytes


def uploaded(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The source as the service holds it: parsed from Part 10 bytes, pixel data dropped."""
    source = pydicom.dcmread(io.BytesIO(dicom_bytes(ds)))
    del source.PixelData
    return source


def dciodvfy_errors(ds: pydicom.Dataset | bytes, folder: Path) -> list[str]:
    """dciodvfy's "Error" lines for `ds` or Part 10 bytes (written under `folder`); skips when dciodvfy is missing,
    except in CI."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian package dicom3tools) is required in CI")
        pytest.skip("dciodvfy not on PATH (apt-get install dicom3tools)")
    path = folder / "out.dcm"
    if isinstance(ds, bytes):
        path.write_bytes(ds)
    else:
        ds.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60)
    # It quotes values in the file's own character set: read its output as bytes, one byte per character.
    output = (run.stdout + run.stderr).decode("latin-1")
    return [line for line in output.splitlines() if line.startswith("Error")]


def sr_qualitative_evaluations(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The content items of an SR's "Qualitative Evaluations" container (exactly one container expected)."""
    (container,) = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    ]
    return list(container.ContentSequence)
