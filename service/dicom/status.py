"""DICOM status codes for refusing an instance: STOW-RS FailureReason (PS3.18) and C-STORE status (PS3.4 B.2.3).

Shared by the STOW-RS route and the DICOM node, so one error code gets the same status on both ways in.
"""

from __future__ import annotations

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# STOW-RS only: an instance posted to /v1/studies/{study} that belongs to another study. An
# implementation-specific code in the A9xx range, which PS3.18 I.2.2 lets a server define (README "Studies").
STUDY_INSTANCE_UID_MISMATCH = 0xA901
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

# Error codes of service.errors -> the status that says the same in DICOM.
FAILURE_STATUSES = {
    "not_dicom": CANNOT_UNDERSTAND,
    "malformed_dicom": CANNOT_UNDERSTAND,
    "unsupported_transfer_syntax": TRANSFER_SYNTAX_NOT_SUPPORTED,
    "unusable_image": DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    "out_of_intended_use": DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    "decode_timeout": DATA_SET_DOES_NOT_MATCH_SOP_CLASS,  # does not match what we process
    "overloaded": OUT_OF_RESOURCES,
    "not_ready": OUT_OF_RESOURCES,
    "spool_full": OUT_OF_RESOURCES,
    "study_instance_uid_mismatch": STUDY_INSTANCE_UID_MISMATCH,
}


def failure_status(error_code: str) -> int:
    """The DICOM failure status for an error code (processing failure for codes without a closer one)."""
    return FAILURE_STATUSES.get(error_code, PROCESSING_FAILURE)
