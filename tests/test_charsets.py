"""Every Specific Character Set defined term (PS3.3 C.12.1.1.2), single- and multi-valued, gives SR, GSPS, PNG and JSON
with the patient's name intact, and SR and GSPS pass dciodvfy."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.valuerep import PersonName

from service.dicom.charsets import (
    DEFINED_TERMS,
    MULTI_BYTE,
    MULTI_BYTE_WITH_EXTENSIONS,
    SINGLE_BYTE,
    SINGLE_BYTE_WITH_EXTENSIONS,
    fix_pydicom_character_sets,
)
from tests.dicom_checks import dciodvfy_errors
from training.synthetic import dicom_bytes, synthesize_instance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

# A name in each term's script, by the term's registration number (the default repertoire: plain ASCII).
NAMES = {
    "6": "Smith^John",
    "100": "Buc^Jérôme",
    "101": "Dvořák^Antonín",
    "109": "Borġ^Ġorġ",
    "110": "Ķēniņš^Jānis",
    "144": "Иванов^Пётр",
    "127": "قباني^لنزار",
    "126": "Διονυσιος^Νικος",
    "138": "שרון^דבורה",
    "148": "Öztürk^Çağrı",  # noqa: RUF001 (the Turkish dotless i is the point)
    "203": "Œuvrard^Zoë",
    "13": "ﾔﾏﾀﾞ^ﾀﾛｳ",
    "166": "สมชาย^ใจดี",
    # PS3.5 Annexes H, I, J: the standard's own examples of the multi-byte sets.
    "87": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "159": "Kyo^Ko=丂^乚",  # JIS X 0212 (IR 159) characters only
    "149": "Hong^Gildong=洪^吉洞=홍^길동",
    "58": "Zhang^XiaoDong=张^小东",
    "192": "Wang^XiaoDong=王^小東",
    "GB18030": "Wang^XiaoDong=王^小东",
    "GBK": "Wang^XiaoDong=王^小东",
}


def _number(term: str) -> str:
    return term.split()[-1] if term else "6"


def _cases() -> list[tuple[str, list[str], str]]:
    """(test id, SpecificCharacterSet values, name) for every defined term, alone and in its multi-valued forms."""
    # Alone: every term but the multi-byte ones with code extensions, which may not come first (PS3.5 6.1.2.5.3).
    alone = SINGLE_BYTE + SINGLE_BYTE_WITH_EXTENSIONS + MULTI_BYTE
    cases = [(term or "default", [term], NAMES[_number(term)]) for term in alone]
    # Multi-valued: each code extension after an empty first value (the default repertoire) ...
    extensions = SINGLE_BYTE_WITH_EXTENSIONS[1:] + MULTI_BYTE_WITH_EXTENSIONS
    cases += [(f"\\{term}", ["", term], NAMES[_number(term)]) for term in extensions]
    # ... or after an explicit one, and the combinations of PS3.5 Annex H (Japanese) and of two alphabets.
    explicit = [(f"ISO 2022 IR 6\\{term}", ["ISO 2022 IR 6", term]) for term in MULTI_BYTE_WITH_EXTENSIONS]
    cases += [(case, terms, NAMES[_number(terms[-1])]) for case, terms in explicit]
    japanese = ["", "ISO 2022 IR 87", "ISO 2022 IR 159"]
    return [
        *cases,
        ("ISO 2022 IR 13\\ISO 2022 IR 87", ["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
        ("\\ISO 2022 IR 87\\ISO 2022 IR 159", japanese, "Yamada^Tarou=丂山田^太郎=やまだ^たろう"),
        ("ISO 2022 IR 100\\ISO 2022 IR 126", ["ISO 2022 IR 100", "ISO 2022 IR 126"], "Buc^Jérôme=Διονυσιος"),
    ]


CASES = _cases()


def test_every_defined_term_is_covered():
    """The cases use every defined term of PS3.3 C.12.1.1.2 at least once, alone or with others."""
    used = {term for _, terms, _ in CASES for term in terms}
    assert used == DEFINED_TERMS


def _phantom(terms: list[str], name: str) -> bytes:
    ds, _ = synthesize_instance(seed=41, rows=256, cols=224)
    ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
    ds.PatientName = ds.ReferringPhysicianName = name
    ds.PatientID = name.split("=")[-1].replace("^", " ")[:64]  # LO: the name's last group, in the same script
    return dicom_bytes(ds)


@pytest.mark.parametrize("case, terms, name", CASES, ids=[case for case, _, _ in CASES])
def test_term_gives_every_output_with_names_intact(client, tmp_path, case, terms, name):
    """A phantom with names in this character set gets JSON, PNG, SR, GSPS and SC; the DICOM ones keep the names and
    pass dciodvfy."""
    fix_pydicom_character_sets()
    body = _phantom(terms, name)
    source = pydicom.dcmread(io.BytesIO(body))
    assert str(source.PatientName) == name, "the phantom itself must hold the name (pydicom could not encode it)"
    for output in ("json", "png", "sr", "gsps", "sc"):
        response = client.post(
            "/v1/predict", content=body, params={"format": output}, headers={"Content-Type": "application/dicom"}
        )
        assert response.status_code == 200, f"{case} format={output}: {response.status_code} {response.text}"
        if output in ("sr", "gsps", "sc"):
            written = pydicom.dcmread(io.BytesIO(response.content))
            for keyword in ("PatientName", "ReferringPhysicianName", "PatientID"):
                assert str(written[keyword].value) == str(source[keyword].value), (case, output, keyword)
            assert dciodvfy_errors(response.content, tmp_path) == [], (case, output)


@pytest.mark.parametrize(
    "terms, name, raw",
    [
        # PS3.5 H.3.1, I.2 and J.3: the examples' bytes, escape sequences included.
        (
            ["", "ISO 2022 IR 87"],
            NAMES["87"],
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
        ),
        (
            ["", "ISO 2022 IR 149"],
            NAMES["149"],
            b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf",
        ),
        (["", "ISO 2022 IR 58"], NAMES["58"], b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab"),
    ],
    ids=["IR 87", "IR 149", "IR 58"],
)
def test_multi_byte_examples_of_the_standard_round_trip(terms, name, raw):
    """The standard's example bytes decode to its example names and back (pydicom's GB2312 escapes corrected)."""
    fix_pydicom_character_sets()
    encodings = pydicom.charset.convert_encodings(terms)
    assert str(PersonName(raw, encodings)) == name
    assert PersonName(name).encode(encodings) == raw
