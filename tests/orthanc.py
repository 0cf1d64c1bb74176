"""Debian Orthanc (+ its DICOMweb plugin) as a PACS for tests: loopback only, temp storage, free ports.

with running_orthanc(tmp_path) as pacs:  # skips the test when Orthanc is not installed
    pacs.http_url, pacs.dicom_port, pacs.aet, pacs.dicomweb_url
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.live import free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass(frozen=True)
class Orthanc:
    http_url: str
    dicom_port: int
    aet: str
    log: Path

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    def instances(self) -> list[dict]:
        """Every stored instance with its main tags (Orthanc's expanded /instances)."""
        response = httpx.get(f"{self.http_url}/instances", params={"expand": ""}, timeout=30)
        response.raise_for_status()
        return response.json()

    def tags(self, orthanc_id: str) -> dict:
        response = httpx.get(f"{self.http_url}/instances/{orthanc_id}/simplified-tags", timeout=30)
        response.raise_for_status()
        return response.json()


def orthanc_config(storage: Path, http_port: int, dicom_port: int, aet: str) -> dict:
    return {
        "Name": "test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,  # loopback clients only
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpCompressionEnabled": False,
        "DicomAlwaysAllowStore": True,
        "SaveJobs": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }


@contextlib.contextmanager
def running_orthanc(folder: Path, aet: str = "ORTHANC", timeout_s: float = 60.0) -> Iterator[Orthanc]:
    """Start Orthanc with its storage under `folder`; stop it (and wait) when the block ends."""
    if not (Path(ORTHANC).is_file() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb; .ci/run does)")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(folder / "storage", http_port, dicom_port, aet)))
    log = folder / "orthanc.log"
    url = f"http://127.0.0.1:{http_port}"
    with log.open("wb") as log_file:
        process = subprocess.Popen([ORTHANC, "--no-jobs", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    pytest.fail(f"Orthanc exited with {process.returncode}:\n{log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/system", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not answer within {timeout_s:g} s")
                time.sleep(0.05)
            yield Orthanc(url, dicom_port, aet, log)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def require_dcmtk() -> None:
    """Skip unless dcmtk's network tools are installed."""
    missing = [tool for tool in ("storescu", "storescp", "echoscu") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"dcmtk is not installed ({', '.join(missing)}; Debian: apt-get install dcmtk; .ci/run does)")
