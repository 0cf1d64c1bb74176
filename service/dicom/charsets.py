"""Specific Character Set: the defined terms of PS3.3 C.12.1.1.2, and what pydicom needs to read all of them.

The service never writes text in the source's character set. pydicom decodes the uploaded header into
Unicode strings, and the DICOM objects the service writes (SR, GSPS) encode them in UTF-8 (ISO_IR 192),
the one defined repertoire that holds every script, unless all of it is ASCII (then no SpecificCharacterSet:
the default repertoire). That way every defined term, single- or multi-valued, round-trips the patient's
name. Copying the source's term instead fails in several ways: highdicom's list of terms maps ISO 2022 IR 149
(Korean) to IR 159, rejects an empty first value (the standard's form for Japanese, "\\ISO 2022 IR 87") and a
code-extension term on its own, and dicom3tools' validator rejects text in ISO_IR 13, ISO_IR 203 and GBK.
"""

from __future__ import annotations

from typing import Any

from pydicom import charset
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# PS3.3 Table C.12-2: single-byte character sets without code extensions ("" is the default repertoire).
SINGLE_BYTE = (
    "",
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 144",
    "ISO_IR 127",
    "ISO_IR 126",
    "ISO_IR 138",
    "ISO_IR 148",
    "ISO_IR 203",
    "ISO_IR 13",
    "ISO_IR 166",
)
# Table C.12-3: single-byte character sets with code extensions.
SINGLE_BYTE_WITH_EXTENSIONS = (
    "ISO 2022 IR 6",
    "ISO 2022 IR 100",
    "ISO 2022 IR 101",
    "ISO 2022 IR 109",
    "ISO 2022 IR 110",
    "ISO 2022 IR 144",
    "ISO 2022 IR 127",
    "ISO 2022 IR 126",
    "ISO 2022 IR 138",
    "ISO 2022 IR 148",
    "ISO 2022 IR 203",
    "ISO 2022 IR 13",
    "ISO 2022 IR 166",
)
# Table C.12-4: multi-byte character sets with code extensions (never the first value).
MULTI_BYTE_WITH_EXTENSIONS = ("ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58")
# Table C.12-5: multi-byte character sets without code extensions (stand-alone, single-valued).
MULTI_BYTE = ("ISO_IR 192", "GB18030", "GBK")
DEFINED_TERMS = frozenset(SINGLE_BYTE + SINGLE_BYTE_WITH_EXTENSIONS + MULTI_BYTE_WITH_EXTENSIONS + MULTI_BYTE)
# Not a defined term, but written by many devices for the default repertoire; pydicom reads it as such.
TOLERATED = frozenset({"ISO_IR 6"})

UTF8 = "ISO_IR 192"

# Latin alphabet No. 9 (ISO 8859-15), a defined term since 2017, is missing from pydicom 3.0's tables: without
# these entries pydicom decodes such text as the default repertoire ("Œ" becomes "¼"). Escape sequence from
# PS3.3 Table C.12-3 (ESC 02/13 06/02).
_LATIN_9 = "iso8859_15"
_PYDICOM_ADDITIONS = {"ISO_IR 203": _LATIN_9, "ISO 2022 IR 203": _LATIN_9}
_LATIN_9_ESCAPE = b"\x1b-b"
# pydicom counts GB2312 (ISO 2022 IR 58) among the encodings whose Python codec handles the ISO 2022 escape
# sequence itself, but Python's gb2312 codec does not: PS3.5 J.3's example name decodes as
# "Zhang^XiaoDong=$)A张^$)A小东" (escape bytes left in), and encoding leaves the escape out. Treated like the
# other code extensions instead, pydicom strips and writes "ESC $ ) A" itself and the example round-trips.
_GB2312 = "iso_ir_58"


def fix_pydicom_character_sets() -> None:
    """Make pydicom read every defined term (see above); idempotent, and entries it already has are left alone."""
    for term, encoding in _PYDICOM_ADDITIONS.items():
        charset.python_encoding.setdefault(term, encoding)
    charset.CODES_TO_ENCODINGS.setdefault(_LATIN_9_ESCAPE, _LATIN_9)
    charset.ENCODINGS_TO_CODES.setdefault(_LATIN_9, _LATIN_9_ESCAPE)
    if _GB2312 in charset.handled_encodings:
        charset.handled_encodings = tuple(name for name in charset.handled_encodings if name != _GB2312)


def terms(value: Any) -> list[str]:
    """The values of a SpecificCharacterSet element's value (a string, a list, or None), stripped."""
    if value is None:
        return []
    return [str(term).strip() for term in ([value] if isinstance(value, str) else value)]


def unknown_terms(value: Any) -> list[str]:
    """The values of a SpecificCharacterSet that are neither defined terms nor tolerated."""
    return [term for term in terms(value) if term not in DEFINED_TERMS | TOLERATED]


def output_character_set(header: Dataset) -> str | None:
    """The SpecificCharacterSet for an object that copies text from `header` (decoded by pydicom).

    None (the attribute absent: the default repertoire) when every text value is ASCII, whatever the source
    declared; UTF-8 otherwise, which encodes any text a source can hold.
    """
    for element in header.iterall():
        values = element.value if isinstance(element.value, (list, tuple, MultiValue)) else [element.value]
        if any(isinstance(value, (str, PersonName)) and not str(value).isascii() for value in values):
            return UTF8
    return None
