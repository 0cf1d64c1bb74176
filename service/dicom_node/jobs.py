"""The node's job database (SQLite in WAL mode, synchronous=FULL): what was received, processed, delivered.

One row per received instance (a job) and one per job and destination (a delivery), so a destination
that is down holds back only its own deliveries. Rows hold hashed ids, states, counts and error codes,
never a DICOM value: listing them (/v1/jobs, `python -m service.dicom_node jobs`) shows no PHI.

Job states:      queued -> processed -> delivered        (every destination has the results)
                    |          `-----> dead             (a destination refused them N times; replayable)
                    |-> failed                          (the pipeline refused the image; replayable)
                    `-> dead                            (the pipeline was unavailable N times; replayable)
Delivery states: pending -> delivered | dead

Every method is one transaction; a commit returns after the WAL is fsync'd (synchronous=FULL), which
is what makes a C-STORE acknowledgement safe to send. The connection is shared by the association
threads and the scheduler behind one lock; statements take microseconds, commits one fsync.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,                 -- random hex; names the spool files
    image_id TEXT NOT NULL,              -- hash of the SOP Instance UID (the API's image_id)
    content_sha256 TEXT NOT NULL,        -- of the received file: an identical resend is not a new job
    calling_ae TEXT NOT NULL,
    outputs TEXT NOT NULL,               -- result kinds to render, comma-separated
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, -- pipeline tries
    next_attempt_at REAL NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    error TEXT,                          -- an error code, never a message quoting DICOM values
    instance_bytes INTEGER NOT NULL,
    result_bytes INTEGER NOT NULL DEFAULT 0,
    purged INTEGER NOT NULL DEFAULT 0    -- 1 once its files left the spool
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_content ON jobs (content_sha256);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    destination TEXT NOT NULL,           -- the destination's label
    outputs TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    error TEXT,
    PRIMARY KEY (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_attempt_at);
"""

UNFINISHED = ("queued", "processed")


def kinds(column: str) -> tuple[str, ...]:
    """A comma-separated outputs column as a tuple ("" -> no kinds: a node without destinations)."""
    return tuple(kind for kind in column.split(",") if kind)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number `attempt` (1-based): exponential, capped, with "equal jitter".

    Half the delay is fixed and half random, so retries of many jobs after one outage spread out
    instead of arriving together, yet never come sooner than half the exponential step.
    """
    step = min(max_s, base_s * 2 ** max(attempt - 1, 0))
    return step / 2 + (rng or random).uniform(0, step / 2)


@dataclass(frozen=True)
class NewJob:
    id: str
    image_id: str
    content_sha256: str
    calling_ae: str
    outputs: tuple[str, ...]
    instance_bytes: int
    result_allowance: int  # spool bytes reserved for the results until they are written
    deliveries: tuple[tuple[str, tuple[str, ...]], ...]  # (destination label, its outputs)


@dataclass(frozen=True)
class Delivery:
    job_id: str
    destination: str
    outputs: tuple[str, ...]
    attempts: int
    received_at: float


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self, statements: Iterable[tuple[str, Sequence]]) -> list[sqlite3.Cursor]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursors = [self._db.execute(sql, params) for sql, params in statements]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return cursors

    def _query(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # Intake ---------------------------------------------------------------------------------------

    def add(self, job: NewJob, now: float | None = None) -> None:
        """Record a received instance and its pending deliveries, durably (one fsync'd commit)."""
        now = time.time() if now is None else now
        statements: list[tuple[str, Sequence]] = [
            (
                "INSERT INTO jobs (id, image_id, content_sha256, calling_ae, outputs, state, next_attempt_at, "
                "received_at, updated_at, instance_bytes, result_bytes) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.image_id,
                    job.content_sha256,
                    job.calling_ae,
                    ",".join(job.outputs),
                    now,
                    now,
                    now,
                    job.instance_bytes,
                    job.result_allowance,
                ),
            )
        ]
        statements += [
            (
                "INSERT INTO deliveries (job_id, destination, outputs, state, next_attempt_at) "
                "VALUES (?, ?, ?, 'pending', ?)",
                (job.id, label, ",".join(outputs), now),
            )
            for label, outputs in job.deliveries
        ]
        self._transaction(statements)

    def spooled_job_with_content(self, content_sha256: str) -> str | None:
        """A job whose files are still spooled and that holds exactly these bytes (a resend), if any."""
        rows = self._query(
            "SELECT id FROM jobs WHERE content_sha256 = ? AND purged = 0 AND state != 'failed' LIMIT 1",
            (content_sha256,),
        )
        return rows[0]["id"] if rows else None

    def stored_bytes(self) -> int:
        rows = self._query("SELECT COALESCE(SUM(instance_bytes + result_bytes), 0) AS total FROM jobs WHERE purged = 0")
        return int(rows[0]["total"])

    # Processing -----------------------------------------------------------------------------------

    def due_jobs(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[sqlite3.Row]:
        excluded = set(exclude)
        rows = self._query(
            "SELECT id, outputs, attempts FROM jobs WHERE state = 'queued' AND next_attempt_at <= ? "
            "ORDER BY received_at LIMIT ?",
            (now, limit + len(excluded)),
        )
        return [row for row in rows if row["id"] not in excluded][:limit]

    def next_due_at(self) -> float | None:
        """When the earliest queued job or pending delivery is due (for the scheduler's sleep)."""
        rows = self._query(
            "SELECT MIN(t) AS due FROM (SELECT MIN(next_attempt_at) AS t FROM jobs WHERE state = 'queued' "
            "UNION ALL SELECT MIN(d.next_attempt_at) FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE d.state = 'pending' AND j.state = 'processed')"
        )
        return rows[0]["due"]

    def mark_processed(self, job_id: str, result_bytes: int, now: float | None = None) -> int:
        """Results written: deliveries may start. Returns the change in the job's spooled bytes."""
        now = time.time() if now is None else now
        reserved = self._query("SELECT result_bytes FROM jobs WHERE id = ?", (job_id,))[0]["result_bytes"]
        self._transaction(
            [
                (
                    "UPDATE jobs SET state = 'processed', result_bytes = ?, attempts = attempts + 1, "
                    "updated_at = ?, error = NULL WHERE id = ?",
                    (result_bytes, now, job_id),
                ),
                # Deliveries start counting from the moment there is something to deliver.
                ("UPDATE deliveries SET next_attempt_at = ? WHERE job_id = ? AND state = 'pending'", (now, job_id)),
            ]
        )
        self._finish_if_done(job_id, now)
        return result_bytes - reserved

    def mark_failed(self, job_id: str, error: str, now: float | None = None) -> None:
        """The pipeline refused the image (unusable, out of intended use): nothing to deliver."""
        now = time.time() if now is None else now
        self._transaction(
            [
                (
                    "UPDATE jobs SET state = 'failed', attempts = attempts + 1, error = ?, updated_at = ?, "
                    "finished_at = ? WHERE id = ?",
                    (error, now, now, job_id),
                )
            ]
        )

    def job_attempts(self, job_id: str) -> int:
        rows = self._query("SELECT attempts FROM jobs WHERE id = ?", (job_id,))
        return rows[0]["attempts"] if rows else 0

    def retry_processing(self, job_id: str, error: str, delay_s: float, max_attempts: int, now: float | None = None):
        """The pipeline was unavailable (overloaded, not ready): try again later, or dead-letter. Returns the state."""
        now = time.time() if now is None else now
        row = self._query("SELECT attempts FROM jobs WHERE id = ?", (job_id,))[0]
        attempts = row["attempts"] + 1
        state = "dead" if attempts >= max_attempts else "queued"
        self._transaction(
            [
                (
                    "UPDATE jobs SET state = ?, attempts = ?, error = ?, next_attempt_at = ?, updated_at = ?, "
                    "finished_at = CASE WHEN ? = 'dead' THEN ? END WHERE id = ?",
                    (state, attempts, error, now + delay_s, now, state, now, job_id),
                )
            ]
        )
        return state

    # Delivery -------------------------------------------------------------------------------------

    def due_deliveries(self, destination: str, now: float, limit: int) -> list[Delivery]:
        rows = self._query(
            "SELECT d.job_id, d.outputs, d.attempts, j.received_at FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE d.destination = ? AND d.state = 'pending' AND j.state = 'processed' AND d.next_attempt_at <= ? "
            "ORDER BY d.next_attempt_at LIMIT ?",
            (destination, now, limit),
        )
        return [
            Delivery(row["job_id"], destination, kinds(row["outputs"]), row["attempts"], row["received_at"])
            for row in rows
        ]

    def destinations_with_due(self, now: float) -> set[str]:
        rows = self._query(
            "SELECT DISTINCT d.destination FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE d.state = 'pending' AND j.state = 'processed' AND d.next_attempt_at <= ?",
            (now,),
        )
        return {row["destination"] for row in rows}

    def mark_delivered(self, job_id: str, destination: str, now: float | None = None) -> str:
        """Record one delivery; returns the job's state afterwards."""
        now = time.time() if now is None else now
        self._transaction(
            [
                (
                    "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, delivered_at = ?, "
                    "error = NULL WHERE job_id = ? AND destination = ?",
                    (now, job_id, destination),
                )
            ]
        )
        return self._finish_if_done(job_id, now)

    def retry_delivery(
        self, job_id: str, destination: str, error: str, delay_s: float, max_attempts: int, now: float | None = None
    ) -> tuple[str, str]:
        """A failed try: later, or dead-lettered after `max_attempts`. Returns (delivery state, job state)."""
        now = time.time() if now is None else now
        row = self._query(
            "SELECT attempts FROM deliveries WHERE job_id = ? AND destination = ?", (job_id, destination)
        )[0]
        attempts = row["attempts"] + 1
        state = "dead" if attempts >= max_attempts else "pending"
        self._transaction(
            [
                (
                    "UPDATE deliveries SET state = ?, attempts = ?, error = ?, next_attempt_at = ? "
                    "WHERE job_id = ? AND destination = ?",
                    (state, attempts, error, now + delay_s, job_id, destination),
                )
            ]
        )
        return state, self._finish_if_done(job_id, now)

    def _finish_if_done(self, job_id: str, now: float) -> str:
        """A processed job with no pending delivery is delivered (all went) or dead (some were dead-lettered)."""
        rows = self._query("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))
        states = {row["state"] for row in rows}
        job = self._query("SELECT state FROM jobs WHERE id = ?", (job_id,))[0]["state"]
        if job != "processed" or "pending" in states:
            return job
        final = "dead" if "dead" in states else "delivered"
        self._transaction(
            [("UPDATE jobs SET state = ?, updated_at = ?, finished_at = ? WHERE id = ?", (final, now, now, job_id))]
        )
        return final

    # Housekeeping ---------------------------------------------------------------------------------

    def purgeable(self, finished_before: float) -> list[sqlite3.Row]:
        """Delivered or failed jobs whose files outlived the retention time."""
        return self._query(
            "SELECT id, instance_bytes, result_bytes FROM jobs WHERE purged = 0 "
            "AND state IN ('delivered', 'failed') AND finished_at <= ?",
            (finished_before,),
        )

    def mark_purged(self, job_id: str) -> None:
        self._transaction([("UPDATE jobs SET purged = 1 WHERE id = ?", (job_id,))])

    def forget(self, finished_before: float) -> int:
        """Delete finished, purged job rows older than the history time; returns how many."""
        cursor = self._transaction(
            [
                (
                    "DELETE FROM jobs WHERE purged = 1 AND state IN ('delivered', 'failed') AND finished_at <= ?",
                    (finished_before,),
                )
            ]
        )[0]
        return cursor.rowcount

    def replay(self, job_ids: Iterable[str] | None = None, now: float | None = None) -> list[str]:
        """Put dead or failed jobs (all dead ones when `job_ids` is None) back in line, attempts reset.

        A job that died delivering gets its dead deliveries back to pending (its results are still
        spooled, and are sent again unchanged); one that died or failed in the pipeline is queued again.
        Returns the ids replayed; a purged job cannot be (its instance is gone).
        """
        now = time.time() if now is None else now
        if job_ids is None:
            rows = self._query("SELECT id, state, result_bytes FROM jobs WHERE state = 'dead' AND purged = 0")
        else:
            wanted = list(job_ids)
            marks = ",".join("?" * len(wanted))
            rows = self._query(
                f"SELECT id, state, result_bytes FROM jobs WHERE id IN ({marks}) AND state IN ('dead', 'failed') "
                "AND purged = 0",
                wanted,
            )
        statements: list[tuple[str, Sequence]] = []
        for row in rows:
            delivering = bool(
                self._query("SELECT 1 FROM deliveries WHERE job_id = ? AND state = 'dead' LIMIT 1", (row["id"],))
            )
            if delivering:
                statements += [
                    (
                        "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, error = NULL "
                        "WHERE job_id = ? AND state = 'dead'",
                        (now, row["id"]),
                    ),
                    (
                        "UPDATE jobs SET state = 'processed', updated_at = ?, finished_at = NULL WHERE id = ?",
                        (now, row["id"]),
                    ),
                ]
            else:
                statements.append(
                    (
                        "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?, error = NULL, "
                        "updated_at = ?, finished_at = NULL WHERE id = ?",
                        (now, now, row["id"]),
                    )
                )
        if statements:
            self._transaction(statements)
        return [row["id"] for row in rows]

    # Reporting ------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {row["state"]: row["n"] for row in rows}

    def oldest_unfinished_received_at(self) -> float | None:
        rows = self._query("SELECT MIN(received_at) AS t FROM jobs WHERE state IN ('queued', 'processed')")
        return rows[0]["t"]

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[dict]:
        """Jobs, newest first, with their deliveries; hashed ids, states and error codes only."""
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        jobs = self._query(
            "SELECT id, image_id, state, attempts, error, received_at, updated_at, finished_at, purged "
            f"FROM jobs {where} ORDER BY received_at DESC LIMIT ?",
            [*params, limit],
        )
        listed = []
        for job in jobs:
            deliveries = self._query(
                "SELECT destination, outputs, state, attempts, error, delivered_at, next_attempt_at "
                "FROM deliveries WHERE job_id = ? ORDER BY destination",
                (job["id"],),
            )
            listed.append(
                {
                    "job_id": job["id"],
                    "image_id": job["image_id"],
                    "state": job["state"],
                    "attempts": job["attempts"],
                    "error": job["error"],
                    "received_at": job["received_at"],
                    "updated_at": job["updated_at"],
                    "finished_at": job["finished_at"],
                    "spooled": not job["purged"],
                    "deliveries": [
                        {
                            "destination": d["destination"],
                            "outputs": list(kinds(d["outputs"])),
                            "state": d["state"],
                            "attempts": d["attempts"],
                            "error": d["error"],
                            "delivered_at": d["delivered_at"],
                            "next_attempt_at": d["next_attempt_at"] if d["state"] == "pending" else None,
                        }
                        for d in deliveries
                    ],
                }
            )
        return listed
