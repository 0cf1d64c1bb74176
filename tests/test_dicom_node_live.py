"""The DICOM node against real software started here: Orthanc as the PACS, dcmtk as modality and destination.

Each test starts the service with its node (`python -m service --dicom-port D`, the tiny pack) as a
child process on loopback with its own spool, and stops everything it started.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.dicom_node_live import destinations, running_node, wait_for
from tests.live import free_port
from tests.orthanc import require_dcmtk, running_orthanc
from training.synthetic import dicom_bytes, synthesize_instance

pytestmark = pytest.mark.slow

AE = "PCXR-AI"
MODALITY = "MODALITY"


@pytest.fixture(autouse=True)
def _dcmtk():
    require_dcmtk()


def write_phantoms(folder: Path, count: int, first_seed: int = 1000, transfer_syntax: str = "explicit") -> list[Path]:
    """`count` distinct 256x256 CR/DX phantoms (each its own study), as Part 10 files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        ds, _ = synthesize_instance(first_seed + index, 256, 256, transfer_syntax=transfer_syntax)
        path = folder / f"{index:03d}.dcm"
        path.write_bytes(dicom_bytes(ds))
        paths.append(path)
    return paths


def storescu(port: int, files: list[Path], calling_ae: str = MODALITY, timeout_s: float = 120) -> tuple[int, str]:
    """dcmtk storescu, verbose: (exit status, its output)."""
    command = ["storescu", "-v", "--no-halt", "-aet", calling_ae, "-aec", AE, "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    return done.returncode, done.stdout + done.stderr


def store_statuses(output: str) -> list[str]:
    """The status text of every C-STORE response storescu received, in order."""
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


def sources(paths: list[Path]) -> dict[str, str]:
    """SOP Instance UID -> Study Instance UID of the sent files."""
    found = {}
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        found[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
    return found


def identifying_values(paths: list[Path]) -> set[str]:
    """Values of the sent files that identify a patient or an image, which no log may hold."""
    values = set()
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName"):
            if str(ds.get(keyword, "") or "").strip():
                values.add(str(ds.get(keyword)))
    return values


def referenced_image(tags: dict) -> str:
    """The source image a result object references (SR evidence, GSPS referenced image)."""
    if "CurrentRequestedProcedureEvidenceSequence" in tags:
        series = tags["CurrentRequestedProcedureEvidenceSequence"][0]["ReferencedSeriesSequence"][0]
        return series["ReferencedSOPSequence"][0]["ReferencedSOPInstanceUID"]
    series = tags["ReferencedSeriesSequence"][0]
    return series["ReferencedImageSequence"][0]["ReferencedSOPInstanceUID"]


def results_by_modality(pacs) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for instance in pacs.instances():
        tags = pacs.tags(instance["ID"])
        found.setdefault(tags.get("Modality", ""), []).append(tags)
    return found


def test_twenty_images_from_storescu_reach_orthanc_in_their_studies(tmp_path, tiny_pack):
    """20 images sent by storescu give 20 SRs (C-STORE) and 20 GSPS (STOW-RS) in Orthanc, each in its image's study."""
    images = write_phantoms(tmp_path / "images", 20)
    sent = sources(images)
    with running_orthanc(tmp_path / "orthanc") as pacs:
        routes = destinations(
            {"kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "outputs": ["sr"]},
            {"kind": "stow", "url": pacs.dicomweb_url, "outputs": ["gsps"]},
        )
        with running_node(tmp_path / "node", tiny_pack, CXR_DICOM_DESTINATIONS=routes) as node:
            status, output = storescu(node.dicom_port, images)
            assert status == 0, output
            assert store_statuses(output) == ["Success"] * 20
            wait_for(lambda: node.jobs(state="delivered")["node"]["jobs_by_state"] == {"delivered": 20}, 120, "20 jobs")
            listing = node.jobs()
            # The job list names images by hashed UIDs only.
            assert not any(uid in str(listing) for uid in (*sent, *sent.values()))
            # Delivered and retention 0: the spool lets go of the instances and results.
            wait_for(lambda: not any(node.spool.joinpath("instances").iterdir()), 30, "the spool to be purged")
            metrics = httpx.get(f"{node.http_url}/metrics").text
            assert 'cxr_dicom_received_total{outcome="accepted"} 20.0' in metrics
            assert "cxr_dicom_queued 0.0" in metrics
        log = node.log.read_text()
        assert "job " in log and not [value for value in identifying_values(images) if value in log]
        stored = results_by_modality(pacs)
    assert len(stored["SR"]) == 20 and len(stored["PR"]) == 20
    # The triage travels in the SR (issue 17): every report the PACS holds says "Triage priority = ...".
    assert all("Triage priority" in json.dumps(tags) for tags in stored["SR"])
    for kind in ("SR", "PR"):
        referenced = [referenced_image(tags) for tags in stored[kind]]
        assert sorted(referenced) == sorted(sent)  # one result of each kind per image
        for tags, image in zip(stored[kind], referenced):
            assert tags["StudyInstanceUID"] == sent[image]


def test_results_arrive_once_after_the_destination_comes_back(tmp_path, tiny_pack):
    """Results for a destination that is down are retried with backoff and all arrive, once each, when it is back."""
    images = write_phantoms(tmp_path / "images", 6, first_seed=2000)
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    routes = destinations(
        {"kind": "dimse", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port, "outputs": ["sr"]}
    )
    with running_node(
        tmp_path / "node", tiny_pack, CXR_DICOM_DESTINATIONS=routes, CXR_DICOM_MAX_ATTEMPTS="100"
    ) as node:
        status, output = storescu(node.dicom_port, images)
        assert status == 0, output

        def retried_twice():
            jobs = node.jobs()["jobs"]
            return len(jobs) == 6 and all(job["deliveries"][0]["attempts"] >= 2 for job in jobs)

        wait_for(retried_twice, 60, "every delivery to fail twice")
        assert all(job["deliveries"][0]["error"].startswith("association") for job in node.jobs()["jobs"])
        # +uf: every object received gets a new file, so a duplicate delivery would show as an extra file.
        destination = subprocess.Popen(
            ["storescp", "+uf", "-aet", "STORESCP", "-od", str(received), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: node.jobs()["node"]["jobs_by_state"] == {"delivered": 6}, 60, "6 delivered jobs")
        finally:
            destination.terminate()
            destination.wait(10)
    files = sorted(received.iterdir())
    assert len(files) == 6
    uids = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert len(uids) == 6


def test_sigkill_mid_stream_loses_and_duplicates_nothing(tmp_path, tiny_pack):
    """A node killed with SIGKILL mid-stream delivers, after a restart, one result per acknowledged image."""
    images = write_phantoms(tmp_path / "images", 20, first_seed=3000)
    sent = sources(images)
    with running_orthanc(tmp_path / "orthanc") as pacs:
        routes = destinations(
            {"kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "outputs": ["sr"]}
        )
        with running_node(tmp_path / "node", tiny_pack, CXR_DICOM_DESTINATIONS=routes) as node:
            command = ["storescu", "-v", "-aet", MODALITY, "-aec", AE, "127.0.0.1", str(node.dicom_port)]
            modality = subprocess.Popen(
                [*command, *map(str, images)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            wait_for(lambda: node.job_rows() >= 5, 60, "5 spooled jobs", interval_s=0.01)
            node.kill()
            output = modality.communicate(timeout=60)[0]
            acknowledged = store_statuses(output).count("Success")
            assert 0 < acknowledged < 20, output  # killed mid-stream, after some acknowledgements
            node.start()
            # The modality sends again what it sent (it cannot know what the node kept): identical
            # instances already spooled are acknowledged without a second job.
            status, output = storescu(node.dicom_port, images)
            assert status == 0 and store_statuses(output) == ["Success"] * 20, output
            wait_for(lambda: node.jobs()["node"]["jobs_by_state"] == {"delivered": 20}, 120, "20 delivered jobs")
            assert len(node.jobs()["jobs"]) == 20
        stored = results_by_modality(pacs)
    referenced = [referenced_image(tags) for tags in stored["SR"]]
    assert sorted(referenced) == sorted(sent)  # each image exactly one SR, none lost
    assert len({tags["SOPInstanceUID"] for tags in stored["SR"]}) == 20


def test_refusals_get_their_dimse_status_and_break_nothing(tmp_path, tiny_pack):
    """Unknown calling AE, an unsupported SOP class, a corrupt instance and a full spool each get their status."""
    good = write_phantoms(tmp_path / "good", 12, first_seed=4000)
    ct = tmp_path / "ct.dcm"
    ds = dcmread(good[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(ct)
    corrupt = tmp_path / "corrupt.dcm"
    ds = dcmread(good[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # a transfer cut off: half the pixels
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(corrupt)
    nowhere = free_port()  # a destination that never answers, so results stay spooled
    routes = destinations({"kind": "dimse", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": nowhere})
    size = good[2].stat().st_size
    settings = {
        "CXR_DICOM_DESTINATIONS": routes,
        "CXR_DICOM_ALLOWED_CALLING_AE": f"{MODALITY},OTHER-MODALITY",
        # Room for 4 instances with their SR allowance (64 KiB each), not 5.
        "CXR_DICOM_SPOOL_MAX_BYTES": str(4 * (size + 65536) + size // 2),
    }
    with running_node(tmp_path / "node", tiny_pack, **settings) as node:
        status, output = storescu(node.dicom_port, good[:1], calling_ae="STRANGER")
        assert status != 0 and "Calling AE Title Not Recognized" in output, output
        status, output = storescu(node.dicom_port, [ct, good[2]])
        assert "No presentation context for: (CT)" in output, output
        assert store_statuses(output) == ["Success"], output  # the CR/DX image of the same association went in
        status, output = storescu(node.dicom_port, [corrupt, good[3]])
        assert store_statuses(output) == ["Error: CannotUnderstand", "Success"], output
        status, output = storescu(node.dicom_port, good[4:], calling_ae="OTHER-MODALITY")
        statuses = store_statuses(output)
        # Two more fit at once; later ones only while processing frees the unused part of the jobs' SR
        # allowance (so the exact count depends on timing; the accounting below does not).
        assert statuses[:2] == ["Success", "Success"] and "Refused: OutOfResources" in statuses, output
        accepted = 2 + statuses.count("Success")
        # Every acknowledged instance has its job and its spooled file; nothing refused was kept.
        assert node.job_rows() == accepted == len(node.jobs()["jobs"])
        assert len(list(node.spool.joinpath("instances").iterdir())) == accepted
        # The accepted ones go through the pipeline; their deliveries wait for the destination.
        wait_for(lambda: node.jobs()["node"]["jobs_by_state"] == {"processed": accepted}, 60, "processed jobs")
        echo = subprocess.run(["echoscu", "-aet", MODALITY, "-aec", AE, "127.0.0.1", str(node.dicom_port)])
        assert echo.returncode == 0
