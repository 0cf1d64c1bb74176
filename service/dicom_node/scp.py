"""The node's listening side (pynetdicom): association rules, C-ECHO, and C-STORE into durable intake.

Association: the calling AE title must be in CXR_DICOM_ALLOWED_CALLING_AE when that list is set
(else rejected, permanent, "calling AE title not recognised"); presentation contexts are accepted
for Verification and the CR/DX image storage classes in every transfer syntax this installation
decodes; any other SOP class's context is rejected (abstract syntax not supported), which is how a
storage SCP refuses a class (PS3.4 B.2.2). pynetdicom runs each association in its own thread and
calls the handlers there; a C-STORE's answer waits for `intake` to spool the instance durably.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from service.dicom.status import SUCCESS
from service.dicom_node.intake import IMAGE_STORAGE_CLASSES, VERIFICATION, decodable_transfer_syntaxes
from service.settings import Settings

log = logging.getLogger("service.dicom_node")

# (status, reason): the C-STORE answer; reason goes into ErrorComment (an error code, never a DICOM value).
StoreAnswer = tuple[int, str | None]
Intake = Callable[[bytes, str, str], StoreAnswer]  # (Part 10 bytes, SOP class UID, calling AE) -> answer


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server TLS from CXR_DICOM_TLS_CERT/KEY; with CXR_DICOM_TLS_CA, callers must present a certificate too."""
    if settings.dicom_tls_cert is None and settings.dicom_tls_key is None:
        return None
    if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
        raise ValueError("DICOM TLS needs both CXR_DICOM_TLS_CERT and CXR_DICOM_TLS_KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key)
    if settings.dicom_tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.dicom_tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def application_entity(settings: Settings) -> AE:
    ae = AE(ae_title=settings.dicom_ae_title)
    ae.maximum_pdu_size = settings.dicom_max_pdu
    ae.maximum_associations = settings.dicom_max_associations
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = settings.dicom_network_timeout_s
    # pynetdicom rejects a calling AE not in this list (empty: any) with "calling AE title not recognised".
    ae.require_calling_aet = list(settings.dicom_allowed_calling_ae)
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(VERIFICATION)
    for sop_class in IMAGE_STORAGE_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    return ae


def start_server(settings: Settings, host: str, intake: Intake) -> ThreadedAssociationServer:
    """Listen on (host, CXR_DICOM_PORT) in pynetdicom's own threads; stop with `.shutdown()`."""

    def on_echo(event) -> int:
        return SUCCESS

    def on_store(event) -> int | Dataset:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        data = event.encoded_dataset()
        status, reason = intake(data, str(event.context.abstract_syntax), calling_ae)
        if status == SUCCESS or reason is None:
            return status
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = reason[:64]
        return answer

    def on_rejected(event) -> None:
        log.warning("association from %s rejected", event.assoc.requestor.address)

    ae = application_entity(settings)
    return ae.start_server(
        (host, settings.dicom_port),
        block=False,
        ssl_context=tls_context(settings),
        evt_handlers=[(evt.EVT_C_ECHO, on_echo), (evt.EVT_C_STORE, on_store), (evt.EVT_REJECTED, on_rejected)],
    )
