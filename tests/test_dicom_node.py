"""The DICOM node's parts without a network: backoff, the spool, the job database, intake checks, settings."""

from __future__ import annotations

import random
import sqlite3

import pytest
from pydicom.uid import generate_uid

from service.dicom.status import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS
from service.dicom_node.intake import IMAGE_STORAGE_CLASSES, Refusal, check_instance, result_allowance
from service.dicom_node.jobs import JobStore, NewJob, backoff_delay
from service.dicom_node.spool import Spool, SpoolFull, new_job_id
from service.settings import DecodeLimits, DimseDestination, Settings, StowDestination
from training.synthetic import dicom_bytes, synthesize_instance


def _job(job_id: str | None = None, destinations=("pacs", "web"), content: str = "c") -> NewJob:
    return NewJob(
        id=job_id or new_job_id(),
        image_id="0" * 32,
        content_sha256=content,
        calling_ae="MODALITY",
        outputs=("sr",),
        instance_bytes=100,
        result_allowance=10,
        deliveries=tuple((label, ("sr",)) for label in destinations),
    )


@pytest.fixture
def store(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    yield jobs
    jobs.close()


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    """Retry n waits between half and all of base * 2^(n-1), never more than the cap."""
    rng = random.Random(0)
    for attempt in range(1, 12):
        step = min(30.0, 2.0 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 2.0, 30.0, rng) for _ in range(200)]
        assert step / 2 <= min(delays) and max(delays) <= step
        assert max(delays) - min(delays) > step / 4  # jittered, not one value


def test_job_database_is_durable_by_configuration(store):
    """The job database runs in WAL mode with synchronous=FULL (a commit is fsync'd before it returns)."""
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_spool_writes_inside_its_folder_under_generated_names(tmp_path):
    """Spool files are named by job id only; names that are not job ids and paths outside are refused."""
    spool = Spool(tmp_path / "spool", 10_000)
    job = new_job_id()
    spool.write(spool.instance_path(job), b"DICM")
    assert spool.read_instance(job) == b"DICM"
    assert list(spool.tmp.iterdir()) == []  # the temporary file was renamed into place
    for hostile in ("../../etc/passwd", "1.2.840.10008", job.upper(), job + "/x"):
        with pytest.raises(ValueError):
            spool.instance_path(hostile)
    with pytest.raises(ValueError):
        spool.result_path(job, "../x")
    with pytest.raises(ValueError):
        spool.write(tmp_path / "outside.dcm", b"x")
    spool.purge(job)
    assert not spool.instance_path(job).exists()


def test_spool_budget_refuses_what_does_not_fit(tmp_path):
    """Reservations count against the byte budget; one that would exceed it raises SpoolFull."""
    spool = Spool(tmp_path / "spool", 1000)
    spool.reserve(600)
    with pytest.raises(SpoolFull):
        spool.reserve(401)
    spool.release(600)
    spool.reserve(1000)


def test_spool_start_up_removes_unacknowledged_partial_writes(tmp_path):
    """A crash mid-write leaves a file in tmp/ only; the next start-up removes it."""
    spool = Spool(tmp_path / "spool", 1000)
    (spool.tmp / "abc.part").write_bytes(b"half")
    Spool(tmp_path / "spool", 1000)
    assert list(spool.tmp.iterdir()) == []


def test_a_job_is_delivered_when_every_destination_has_it(store):
    """Deliveries are per destination; the job is delivered only after the last one."""
    job = _job()
    store.add(job, now=100.0)
    assert [row["id"] for row in store.due_jobs(100.0, 10)] == [job.id]
    assert store.due_deliveries("pacs", 100.0, 10) == []  # nothing to deliver before processing
    assert store.mark_processed(job.id, 4, now=101.0) == 4 - 10  # the allowance replaced by the real size
    assert store.destinations_with_due(101.0) == {"pacs", "web"}
    assert store.mark_delivered(job.id, "pacs", now=102.0) == "processed"
    assert store.mark_delivered(job.id, "web", now=103.0) == "delivered"
    assert store.counts() == {"delivered": 1}


def test_one_destination_down_does_not_hold_back_another(store):
    """A failing destination backs off and dead-letters alone; the other still gets its results."""
    job = _job()
    store.add(job, now=0.0)
    store.mark_processed(job.id, 1, now=0.0)
    assert store.retry_delivery(job.id, "web", "stow_status_503", 5.0, 3, now=1.0) == ("pending", "processed")
    assert store.due_deliveries("web", 2.0, 10) == []  # backing off
    assert [d.job_id for d in store.due_deliveries("pacs", 2.0, 10)] == [job.id]
    assert store.mark_delivered(job.id, "pacs", now=2.0) == "processed"
    store.retry_delivery(job.id, "web", "stow_status_503", 5.0, 3, now=7.0)
    assert store.retry_delivery(job.id, "web", "stow_status_503", 5.0, 3, now=13.0) == ("dead", "dead")


def test_replay_resends_dead_deliveries_and_requeues_failed_jobs(store):
    """replay puts a dead delivery back to pending (attempts reset) and a failed job back in the queue."""
    dead, failed, fine = _job(destinations=("pacs",)), _job(destinations=("pacs",)), _job(destinations=("pacs",))
    for job in (dead, failed, fine):
        store.add(job, now=0.0)
    store.mark_processed(dead.id, 1, now=0.0)
    store.retry_delivery(dead.id, "pacs", "association_rejected", 1.0, 1, now=0.0)
    store.mark_failed(failed.id, "unusable_image", now=0.0)
    assert store.replay(now=5.0) == [dead.id]  # --all-dead: failed jobs are not dead
    assert [d.job_id for d in store.due_deliveries("pacs", 5.0, 10)] == [dead.id]
    assert store.list_jobs()[0]["deliveries"][0]["attempts"] in (0, 1)
    assert store.replay([failed.id, fine.id], now=6.0) == [failed.id]  # a queued job is not replayable
    assert {row["id"] for row in store.due_jobs(6.0, 10)} == {failed.id, fine.id}


def test_a_node_without_destinations_renders_nothing_and_finishes_jobs(store):
    """A job with no result kinds and no deliveries is delivered as soon as it is processed."""
    job = NewJob(new_job_id(), "0" * 32, "c", "MODALITY", (), 100, 0, ())
    store.add(job, now=0.0)
    assert store.due_jobs(0.0, 1)[0]["outputs"] == ""
    store.mark_processed(job.id, 0, now=1.0)
    assert store.counts() == {"delivered": 1}


def test_pipeline_retries_dead_letter_after_the_last_attempt(store):
    """A job the pipeline cannot take (overloaded) is retried later, and dead after max attempts."""
    job = _job()
    store.add(job, now=0.0)
    assert store.retry_processing(job.id, "overloaded", 1.0, 2, now=0.0) == "queued"
    assert store.due_jobs(0.5, 10) == []
    assert store.retry_processing(job.id, "overloaded", 1.0, 2, now=1.0) == "dead"
    assert store.counts() == {"dead": 1}


def test_identical_resend_is_found_until_purged(store):
    """An identical instance still spooled is found by content hash; once purged it is a new job again."""
    job = _job(content="abc")
    store.add(job, now=0.0)
    assert store.spooled_job_with_content("abc") == job.id
    store.mark_processed(job.id, 1, now=0.0)
    store.mark_delivered(job.id, "pacs", now=1.0)
    store.mark_delivered(job.id, "web", now=1.0)
    assert [row["id"] for row in store.purgeable(finished_before=0.5)] == []  # retention not over
    assert [row["id"] for row in store.purgeable(finished_before=2.0)] == [job.id]
    store.mark_purged(job.id)
    assert store.spooled_job_with_content("abc") is None
    assert store.forget(finished_before=2.0) == 1
    assert store.list_jobs() == []


def test_job_listing_holds_hashed_ids_states_and_codes_only(store, tmp_path):
    """The job rows and the listing carry no column where a DICOM value could be stored."""
    store.add(_job(), now=0.0)
    listed = store.list_jobs()[0]
    assert set(listed) == {
        "job_id", "image_id", "state", "attempts", "error", "received_at", "updated_at", "finished_at", "spooled",
        "deliveries",
    }  # fmt: skip
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    assert not columns & {"sop_instance_uid", "study_instance_uid", "patient_id", "patient_name", "accession"}


def _instance(**changes) -> tuple[bytes, str]:
    ds, _ = synthesize_instance(7, 128, 112, transfer_syntax="explicit")
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return dicom_bytes(ds), str(ds.SOPClassUID)


def test_intake_accepts_a_radiograph_and_names_it_by_hash():
    """A CR/DX phantom passes intake; it is identified by the hashed SOP Instance UID and content digest."""
    data, sop_class = _instance()
    assert sop_class in IMAGE_STORAGE_CLASSES
    accepted = check_instance(data, sop_class, DecodeLimits(), "md5")
    assert len(accepted.image_id) == 32 and len(accepted.content_sha256) == 64
    assert (accepted.rows, accepted.columns) == (128, 112)


def test_intake_refuses_corrupt_instances_as_cannot_understand():
    """Cut-off pixel data, or pixel attributes of the wrong VR, get a 0xC000 'cannot understand' status."""
    data, sop_class = _instance()
    with pytest.raises(Refusal) as refused:
        check_instance(data[:-4000], sop_class, DecodeLimits(), "md5")
    assert (refused.value.status, refused.value.reason) == (CANNOT_UNDERSTAND, "pixel_data_truncated")
    ds, _ = synthesize_instance(7, 128, 112, transfer_syntax="explicit")
    ds["Rows"].VR, ds.Rows = "DS", "128"
    with pytest.raises(Refusal) as refused:
        check_instance(dicom_bytes(ds), str(ds.SOPClassUID), DecodeLimits(), "md5")
    assert (refused.value.status, refused.value.reason) == (CANNOT_UNDERSTAND, "malformed_dicom")


def test_intake_refuses_a_dataset_that_contradicts_its_context_or_is_not_a_radiograph():
    """A dataset of another SOP class than its context, or a colour image, gets 0xA900."""
    data, sop_class = _instance()
    other = next(uid for uid in IMAGE_STORAGE_CLASSES if uid != sop_class)
    with pytest.raises(Refusal) as refused:
        check_instance(data, other, DecodeLimits(), "md5")
    assert refused.value.status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS and refused.value.reason == "sop_class_mismatch"
    data, sop_class = _instance(NumberOfFrames=2)
    with pytest.raises(Refusal) as refused:
        check_instance(data, sop_class, DecodeLimits(), "md5")
    assert refused.value.status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS and refused.value.reason == "unusable_image"


def test_intake_refuses_an_image_results_could_not_reference():
    """An image without a valid Study Instance UID cannot be referenced by an SR: refused at intake."""
    data, sop_class = _instance(StudyInstanceUID="not a uid")
    with pytest.raises(Refusal) as refused:
        check_instance(data, sop_class, DecodeLimits(), "md5")
    assert refused.value.reason == "unusable_image"
    data, sop_class = _instance(SOPInstanceUID=generate_uid())
    check_instance(data, sop_class, DecodeLimits(), "md5")


def test_result_allowance_covers_a_burned_in_image():
    """SR and GSPS reserve 64 KiB each; a burned-in image also its RGB pixels."""
    assert result_allowance(("sr", "gsps"), 100, 100) == 2 * 65536
    assert result_allowance(("sc",), 100, 100) == 65536 + 30000


def test_settings_read_the_issue_example(monkeypatch):
    """CXR_DICOM_DESTINATIONS as written in the issue, and a comma-separated calling AE list, parse."""
    monkeypatch.setenv(
        "CXR_DICOM_DESTINATIONS",
        '[{"kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "outputs": ["sr"]}, '
        '{"kind": "stow", "url": "http://127.0.0.1:8042/dicom-web", "outputs": ["sr", "gsps"]}]',
    )
    monkeypatch.setenv("CXR_DICOM_ALLOWED_CALLING_AE", "MODALITY1, ROUTER")
    settings = Settings()
    assert settings.dicom_ae_title == "PCXR-AI"
    assert settings.dicom_allowed_calling_ae == ["MODALITY1", "ROUTER"]
    dimse, stow = settings.dicom_destinations
    assert isinstance(dimse, DimseDestination) and dimse.label == "PACS@127.0.0.1:4242"
    assert isinstance(stow, StowDestination) and stow.outputs == ("sr", "gsps")
    monkeypatch.setenv("CXR_DICOM_DESTINATIONS", '[{"kind": "dimse", "ae_title": "PACS", "port": 4242}]')
    with pytest.raises(ValueError, match="host"):
        Settings()
    monkeypatch.setenv("CXR_DICOM_DESTINATIONS", '[{"kind": "stow", "url": "http://x", "outputs": ["pdf"]}]')
    with pytest.raises(ValueError):
        Settings()


def test_jobs_route_needs_a_node_and_a_key(tiny_settings):
    """GET /v1/jobs answers 404 dicom_node_disabled without a node, and 401 without a key when auth is on."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    plain = TestClient(create_app(tiny_settings))
    response = plain.get("/v1/jobs")
    assert response.status_code == 404 and response.json()["error"]["code"] == "dicom_node_disabled"
    digest = "ab" * 32  # the sha256 of some key; none is sent
    guarded = TestClient(
        create_app(tiny_settings.model_copy(update={"auth_enabled": True, "api_key_sha256s": [digest]}))
    )
    assert guarded.get("/v1/jobs").status_code == 401


def test_replay_command_resets_dead_jobs_in_a_spool(tmp_path, capsys):
    """`python -m service.dicom_node replay` re-queues dead jobs by id or all at once, and says which it could not."""
    from service.dicom_node.__main__ import main

    spool = Spool(tmp_path / "spool", 10_000)
    store = JobStore(spool.database)
    dead, delivered = _job(destinations=("pacs",)), _job(destinations=("pacs",))
    for job in (dead, delivered):
        store.add(job, now=0.0)
        store.mark_processed(job.id, 1, now=0.0)
    store.retry_delivery(dead.id, "pacs", "association_rejected", 1.0, 1, now=0.0)
    store.mark_delivered(delivered.id, "pacs", now=0.0)
    assert main(["replay", "--spool", str(spool.root), "--job", dead.id, "--job", delivered.id]) == 1
    out = capsys.readouterr()
    assert f"replayed {dead.id}" in out.out and f"not replayed {delivered.id}" in out.err
    assert store.counts() == {"processed": 1, "delivered": 1}
    assert main(["replay", "--spool", str(spool.root), "--all-dead"]) == 0
    assert "no dead job" in capsys.readouterr().out
    assert main(["jobs", "--spool", str(spool.root), "--state", "processed"]) == 0
    assert dead.id in capsys.readouterr().out
    store.close()


def test_node_speaks_tls_and_checks_client_certificates(tmp_path):
    """With CXR_DICOM_TLS_* set the node answers C-ECHO over TLS, to a client whose certificate the CA signed."""
    import shutil
    import ssl
    import subprocess

    from pynetdicom import AE

    from service.dicom_node.intake import VERIFICATION
    from service.dicom_node.scp import start_server
    from tests.live import free_port

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def certificate(name: str, signer: str | None = None) -> tuple[str, str]:
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"]
        command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
        subprocess.run(command, check=True, capture_output=True)
        return str(cert), str(key)

    server_cert, server_key = certificate("node")
    client_cert, client_key = certificate("modality")
    settings = Settings(
        dicom_port=free_port(), dicom_tls_cert=server_cert, dicom_tls_key=server_key, dicom_tls_ca=client_cert
    )
    port = settings.dicom_port
    server = start_server(settings, "127.0.0.1", lambda data, sop_class, calling_ae: (0, None))
    try:
        client = AE(ae_title="MODALITY")
        client.add_requested_context(VERIFICATION)
        trusted = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server_cert)
        trusted.load_cert_chain(client_cert, client_key)
        assoc = client.associate("127.0.0.1", port, ae_title="PCXR-AI", tls_args=(trusted, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server_cert)  # no client certificate
        assoc = client.associate("127.0.0.1", port, ae_title="PCXR-AI", tls_args=(anonymous, "127.0.0.1"))
        assert not assoc.is_established
        assoc = client.associate("127.0.0.1", port, ae_title="PCXR-AI")  # plain TCP
        assert not assoc.is_established
    finally:
        server.shutdown()
