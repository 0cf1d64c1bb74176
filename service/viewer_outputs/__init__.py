"""Viewer outputs: one JSON result -> DICOM SR (TID 1500), DICOM GSPS, or an annotated PNG.

Pure functions of (source header, JSON result); no FastAPI. Import the builders from their
modules: ``sr.build_sr``, ``gsps.build_gsps``, ``png.render_png``.

Box convention (shared with the JSON and the VinDr CSVs): x = column, y = row, in the original
image's pixels, edges not centres. DICOM SCOORD and GSPS PIXEL coordinates use the same
convention (PS3.3 C.18.6.1.1 and C.10.5.1.2: (0, 0) is the top left corner of the top left
pixel), so boxes are written unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import validate_value

# highdicom logs at INFO which dataset it copies patient and study attributes from, by SOP Instance UID.
IDENTIFYING_LOGGERS = ("highdicom",)


def quiet_identifying_loggers() -> None:
    """Keep the DICOM libraries' INFO lines, which quote UIDs, out of the service's log (WARNING and above stay)."""
    for name in IDENTIFYING_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.WARNING, logger.level))


DISCLAIMER = "RESEARCH - NOT FOR DIAGNOSTIC USE"
MANUFACTURER = "Pediatric CXR inference service"

# Type 2 attributes highdicom reads from the referenced image as plain attributes; an upload may
# lack any of them, and an empty value is what the standard asks for when unknown.
_TYPE2_DEFAULTS = {
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyDate": "",
    "StudyTime": "",
    "StudyID": "",
    "AccessionNumber": "",
    "ReferringPhysicianName": "",
}


# Enumerated values (PS3.3) that highdicom enforces on what it copies; anything else is left out like an invalid value.
_ENUMERATED = {"PatientSex": {"M", "F", "O", ""}}


def _standard_vrs(tag: BaseTag) -> list[str]:
    """The VRs PS3.6 allows for a public attribute ("US or SS" -> both); none for private or unknown tags."""
    if tag.is_private:
        return []
    try:
        return dictionary_VR(tag).split(" or ")
    except KeyError:
        return []


def _valid(element: DataElement) -> bool:
    """Whether an element has its standard VR and multiplicity, and every value is valid for the VR (pydicom's strict
    validation)."""
    if element.VR not in _standard_vrs(element.tag):
        return False
    if element.VR == "SQ":
        return True  # items are not copied; their contents are not ours to judge
    if element.keyword in _ENUMERATED and str(element.value or "") not in _ENUMERATED[element.keyword]:
        return False
    values = element.value if isinstance(element.value, (list, MultiValue)) else [element.value]
    if len(values) > 1 and dictionary_VM(element.tag) == "1":
        return False  # several values where the attribute holds one (a name with a backslash)
    try:
        for value in values:
            # Numbers in decimal and integer strings are validated as the strings they were read from.
            validate_value(element.VR, str(value) if element.VR in ("DS", "IS") else value, config.RAISE)
    except (ValueError, TypeError, KeyError, OverflowError):
        return False
    return True


def reference_header(source: Dataset) -> Dataset:
    """The uploaded image's header without pixel data, with empty Type 2 attributes filled in.

    highdicom copies patient/study attributes and builds references from this; it is a new
    dataset, so the caller's `source` is never modified and no pixel data is deep-copied. Only
    valid standard attributes are carried: one under another VR than PS3.6 gives it (a name as
    OB), or with a value its VR does not allow (a 2019-99-99 date, an over-long ID, a UID with
    letters), would fail highdicom's checks or make the output invalid. A PACS may send any of
    these; the output then lacks that attribute, or has it empty when the module requires it.
    """
    header = Dataset()
    for element in source:
        # Pixel Data and its float/double variants stay behind, and so does anything invalid.
        if element.tag.group != 0x7FE0 and _valid(element):
            header.add(element)
    for keyword, value in _TYPE2_DEFAULTS.items():
        if keyword not in header:
            # Missing or invalid (left out above): the reference carries an empty value, which
            # Type 2 allows, rather than failing the whole output.
            setattr(header, keyword, value)
    if "SamplesPerPixel" not in header:
        header.SamplesPerPixel = 1  # the decoder only accepts single-sample greyscale images
    if (
        str(header.get("PatientIdentityRemoved", "")).upper() == "YES"
        and "DeidentificationMethod" not in header
        and "DeidentificationMethodCodeSequence" not in header
    ):
        # Copied as is, "identity removed" without a method is invalid (PS3.3 C.7.1.1, Type 1C).
        # Say that the method is unknown rather than drop the flag or invent a method.
        header.DeidentificationMethod = "Not stated in the source image"
    return header


def series_description(kind: str, model: dict) -> str:
    """ "<kind> <pack> <version> | RESEARCH - NOT FOR DIAGNOSTIC USE", at most 64 characters (LO).

    The pack and version tell two result series of the same kind apart (uids.SERIES_NUMBERS gives
    them the same number); the disclaimer is never cut, the pack name is when it is long."""
    suffix = f" | {DISCLAIMER}"
    name = f"{kind} {model.get('pack') or 'unknown'} {model.get('version') or 'unknown'}"
    return name[: 64 - len(suffix)] + suffix


def instance_number(source: Dataset) -> int:
    """The result object's Instance Number: the source image's, so results sort like their images."""
    try:
        number = int(source.get("InstanceNumber"))
    except (TypeError, ValueError):
        return 1
    return number if 0 <= number < 2**31 else 1


def box_polygon(box: dict) -> np.ndarray:
    """Closed 5-point (column, row) outline of a JSON box, clockwise from the top left corner."""
    x0, y0, x1, y1 = (float(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def finding_text(finding: dict) -> str:
    """The "label score" caption drawn next to a box."""
    return f"{finding['label']} {float(finding['score']):.2f}"


def disease_text(disease: dict) -> str:
    """One disease line: label, probability and whether it is over the pack's threshold."""
    mark = " +" if disease.get("positive") else ""
    return f"{disease['label']} {float(disease['probability']):.2f}{mark}"
