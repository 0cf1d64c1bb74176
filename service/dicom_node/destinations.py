"""Delivery of rendered results to a destination: C-STORE to a PACS AE, or STOW-RS to a DICOMweb server.

A sender gets a batch of jobs, each with its result files, and says for each job whether every one
of its files was stored (`None`) or why not (an error code, safe to log). Files are sent exactly as
spooled: a retry sends the same objects with the same UIDs, which a PACS stores once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE

from service.settings import DimseDestination, Settings, StowDestination

log = logging.getLogger("service.dicom_node")

# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success, and the warnings of a stored object
# (coerced, elements discarded, does not match SOP class but kept).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


@dataclass(frozen=True)
class Outgoing:
    job_id: str
    files: tuple[Path, ...]


class DimseSender:
    """C-STORE SCU: one association per batch, each file sent as spooled."""

    def __init__(self, destination: DimseDestination, settings: Settings) -> None:
        self.destination = destination
        self.calling_ae = settings.dicom_ae_title
        self.timeout_s = settings.dicom_network_timeout_s
        self.max_pdu = settings.dicom_max_pdu

    async def send(self, batch: Sequence[Outgoing]) -> dict[str, str | None]:
        # pynetdicom is blocking; one thread per destination batch keeps the event loop free.
        return await asyncio.to_thread(self._send_blocking, batch)

    def _send_blocking(self, batch: Sequence[Outgoing]) -> dict[str, str | None]:
        contexts: dict[tuple[str, str], None] = {}
        for item in batch:
            for path in item.files:
                meta = read_file_meta_info(path)
                syntax = str(meta.TransferSyntaxUID)
                contexts[(str(meta.MediaStorageSOPClassUID), syntax)] = None
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        # One context per SOP class and transfer syntax; Implicit VR Little Endian, which every SCP must
        # accept, as a second choice for uncompressed objects.
        requested = {}
        for sop_class, syntax in contexts:
            syntaxes = requested.setdefault(sop_class, [])
            if syntax not in syntaxes:
                syntaxes.append(syntax)
        for sop_class, syntaxes in requested.items():
            if IMPLICIT_VR_LITTLE_ENDIAN not in syntaxes:
                syntaxes.append(IMPLICIT_VR_LITTLE_ENDIAN)
            ae.add_requested_context(sop_class, syntaxes)
        outcome: dict[str, str | None] = {}
        try:
            assoc = ae.associate(
                self.destination.host, self.destination.port, ae_title=self.destination.ae_title, max_pdu=self.max_pdu
            )
        except Exception as exc:  # a bad address or a socket error: every job of the batch waits for the next try
            return dict.fromkeys((item.job_id for item in batch), f"association_error:{type(exc).__name__}")
        if not assoc.is_established:
            reason = "association_rejected" if assoc.is_rejected else "association_failed"
            return dict.fromkeys((item.job_id for item in batch), reason)
        try:
            for item in batch:
                outcome[item.job_id] = self._store_files(assoc, item.files)
        finally:
            if assoc.is_established:
                assoc.release()
        return outcome

    @staticmethod
    def _store_files(assoc, files: Sequence[Path]) -> str | None:
        for path in files:
            if not assoc.is_established:
                return "association_lost"
            try:
                answer = assoc.send_c_store(path)
            except Exception as exc:  # no context accepted for this SOP class, or a broken association
                return f"c_store_error:{type(exc).__name__}"
            status = answer.get("Status") if answer else None
            if status is None:
                return "c_store_no_answer"
            if int(status) not in STORED:
                return f"c_store_status_0x{int(status):04X}"
        return None


class StowSender:
    """STOW-RS: one POST {url}/studies per job, its files as one multipart/related body."""

    def __init__(self, destination: StowDestination, settings: Settings, concurrency: int = 4) -> None:
        self.destination = destination
        self.url = destination.url.rstrip("/") + "/studies"
        verify: ssl.SSLContext | bool = True
        if destination.ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(destination.ca_bundle))
        self._client = httpx.AsyncClient(timeout=settings.dicom_network_timeout_s, verify=verify)
        self._slots = asyncio.Semaphore(concurrency)

    async def close(self) -> None:
        await self._client.aclose()

    async def send(self, batch: Sequence[Outgoing]) -> dict[str, str | None]:
        outcomes = await asyncio.gather(*(self._send_one(item) for item in batch))
        return {item.job_id: outcome for item, outcome in zip(batch, outcomes)}

    async def _send_one(self, item: Outgoing) -> str | None:
        body, content_type = multipart_related([await asyncio.to_thread(path.read_bytes) for path in item.files])
        headers = {**self.destination.headers, "Content-Type": content_type, "Accept": "application/dicom+json"}
        async with self._slots:
            try:
                response = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                return f"stow_error:{type(exc).__name__}"
        # 200: every instance stored. 202 (some failed) and 409 (none stored) are retried whole: the
        # objects that did go in are stored again under the same UIDs, which changes nothing.
        if response.status_code == 200:
            return None
        return f"stow_status_{response.status_code}"


def multipart_related(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """A STOW-RS body (PS3.18 10.5) and its Content-Type."""
    boundary = secrets.token_hex(16)
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def make_sender(destination: DimseDestination | StowDestination, settings: Settings) -> DimseSender | StowSender:
    if isinstance(destination, DimseDestination):
        return DimseSender(destination, settings)
    return StowSender(destination, settings)
