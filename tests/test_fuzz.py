"""Fuzzed uploads: mutated DICOMs always get a clear 4xx JSON error or a valid prediction, never a 500.

Hypothesis mutates a few small valid phantoms (uncompressed 8/16-bit, RLE, JPEG 2000, JPEG baseline,
MONOCHROME1/2) at the byte level (truncation, overwritten runs, rewritten VRs, huge declared lengths,
garbage nested sequences, broken encapsulated fragments, random preambles, odd transfer syntax UIDs)
and at the header level (absurd Rows/Columns/Bits*/SamplesPerPixel/NumberOfFrames/PixelRepresentation
written through pydicom). The deterministic regression tests at the end pin each bug the fuzzer found.
"""

from __future__ import annotations

import io
import resource
import struct
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag

from training.synthetic import dicom_bytes, synthesize_instance

# Reproducible runs (derandomized, no example database) that may be slow: every case is an HTTP round trip.
FUZZ_SETTINGS = {
    "deadline": None,
    "database": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

DICOM = {"Content-Type": "application/dicom"}

# name -> synthesize_instance keyword arguments: every encoding the generator writes cheaply.
SEED_ENCODINGS = {
    "explicit-16": {"transfer_syntax": "explicit", "bits_stored": 16, "photometric": "MONOCHROME2"},
    "explicit-8-mono1": {"transfer_syntax": "explicit", "bits_stored": 8, "photometric": "MONOCHROME1"},
    "rle-12-mono1": {"transfer_syntax": "rle", "bits_stored": 12, "photometric": "MONOCHROME1"},
    "j2k-16": {"transfer_syntax": "j2k", "bits_stored": 16, "photometric": "MONOCHROME2"},
    "jpeg-baseline-8": {"transfer_syntax": "jpeg-baseline", "bits_stored": 8, "photometric": "MONOCHROME2"},
}
ENCAPSULATED = ("rle-12-mono1", "j2k-16", "jpeg-baseline-8")

PIXEL_DATA = (0x7FE0, 0x0010)
HEADER_NUMBERS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel", "PixelRepresentation")
ABSURD_US = (0, 1, 2, 7, 8, 12, 15, 16, 17, 31, 32, 33, 64, 255, 256, 32767, 32768, 65534, 65535)
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.203",
    "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.4.94",
    "1.2.840.10008.1.2.4.102",
    "1.2.3.4.5.6",
    "",
    "not a uid",
    "1." + "9" * 70,
)


def _seed(name: str) -> bytes:
    ds, _ = synthesize_instance(seed=11, rows=256, cols=224, **SEED_ENCODINGS[name])
    return dicom_bytes(ds)


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    return {name: _seed(name) for name in SEED_ENCODINGS}


# ---------------------------------------------------------------------------------------------
# Byte-level helpers (every seed's dataset is Explicit VR Little Endian)
# ---------------------------------------------------------------------------------------------


def _meta_end(data: bytes) -> int:
    """Offset of the first dataset byte: 132 + the file meta group (its group length says how long)."""
    (group_length,) = struct.unpack_from("<I", data, 132 + 8)
    return 132 + 12 + group_length


def _find(data: bytes, group: int, element: int) -> int:
    """Offset of an element's tag in the dataset (after the file meta); -1 when absent."""
    return data.find(struct.pack("<HH", group, element), _meta_end(data))


def _pixel_value_offset(data: bytes) -> int:
    """Offset of Pixel Data's value (tag 4 + VR 2 + reserved 2 + length 4)."""
    return _find(data, *PIXEL_DATA) + 12


def _element(group: int, element: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", size) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", size & 0xFFFF) + value


def _insert_before_pixels(data: bytes, element: bytes) -> bytes:
    at = _find(data, *PIXEL_DATA)
    return data[:at] + element + data[at:]


def _nested_sequence(depth: int, garbage: bytes, delimited: bool) -> bytes:
    """An undefined-length SQ nested `depth` deep, `garbage` in the innermost item."""
    inner = garbage
    for _ in range(depth):
        item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + (b"\xfe\xff\x0d\xe0\0\0\0\0" if delimited else b"")
        inner = _element(0x0008, 0x1140, b"SQ", item, 0xFFFFFFFF) + (b"\xfe\xff\xdd\xe0\0\0\0\0" if delimited else b"")
    return inner


def _with_transfer_syntax(data: bytes, uid: str) -> bytes:
    """The same dataset bytes under a file meta that names another transfer syntax."""
    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = uid
    buffer = pydicom.filebase.DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return data[:132] + buffer.getvalue() + data[_meta_end(data) :]


def _with_header(data: bytes, keyword: str, value) -> bytes:
    """Set one header element through pydicom and write the file again (pixels untouched)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Mutation strategies: each draws (seed name, description, mutate(bytes) -> bytes)
# ---------------------------------------------------------------------------------------------

seed_names = st.sampled_from(sorted(SEED_ENCODINGS))


@st.composite
def truncations(draw):
    fraction = draw(st.floats(0, 1, exclude_max=True))
    return "truncate", lambda data: data[: int(len(data) * fraction)]


@st.composite
def overwritten_runs(draw):
    # Mostly in the first ~1.5 kB (file meta and header), sometimes anywhere.
    position = draw(st.one_of(st.integers(0, 1500), st.floats(0, 1, exclude_max=True)))
    run = draw(st.binary(min_size=1, max_size=16))

    def mutate(data: bytes) -> bytes:
        at = position if isinstance(position, int) else int(len(data) * position)
        at = min(at, len(data) - 1)
        return data[:at] + run + data[at + len(run) :]

    return f"overwrite {len(run)} bytes", mutate


@st.composite
def header_values(draw):
    keyword = draw(st.sampled_from((*HEADER_NUMBERS, "NumberOfFrames")))
    if keyword == "NumberOfFrames":
        value = draw(st.sampled_from(["0", "1", "2", "-1", "65535", "2147483647", "99999999"]))
    else:
        value = draw(st.sampled_from(ABSURD_US))
    return f"{keyword}={value}", lambda data: _with_header(data, keyword, value)


@st.composite
def raw_header_values(draw):
    """Any 2 bytes as the value of a US element, and any declared length for it."""
    element = draw(
        st.sampled_from(
            [
                (0x0028, 0x0010),
                (0x0028, 0x0011),
                (0x0028, 0x0100),
                (0x0028, 0x0101),
                (0x0028, 0x0102),
                (0x0028, 0x0002),
                (0x0028, 0x0103),
            ]
        )
    )
    value = draw(st.binary(min_size=2, max_size=2))
    length = draw(st.sampled_from([2, 0, 1, 4, 0xFFFF]))

    def mutate(data: bytes) -> bytes:
        at = _find(data, *element)
        return data[: at + 6] + struct.pack("<H", length) + value + data[at + 10 :]

    return f"raw {element} length {length}", mutate


@st.composite
def wrong_vrs(draw):
    element = draw(
        st.sampled_from(
            [
                (0x0028, 0x0010),
                (0x0028, 0x0011),
                (0x0028, 0x0100),
                (0x0028, 0x0004),
                (0x0008, 0x0018),
                (0x0028, 0x1053),
                (0x0010, 0x1010),
            ]
        )
    )
    vr = draw(
        st.sampled_from([b"DS", b"IS", b"LO", b"FD", b"AT", b"UN", b"SQ", b"OB", b"UT", b"XX", b"\0\0", b"\xff\xff"])
    )

    def mutate(data: bytes) -> bytes:
        at = _find(data, *element)
        return data if at < 0 else data[: at + 4] + vr + data[at + 6 :]

    return f"VR of {element} -> {vr!r}", mutate


@st.composite
def nested_sequences(draw):
    depth = draw(st.sampled_from([1, 2, 8, 64, 400, 3000]))
    garbage = draw(st.binary(max_size=64))
    delimited = draw(st.booleans())
    blob = _nested_sequence(depth, garbage, delimited)
    return f"SQ nested {depth} deep", lambda data: _insert_before_pixels(data, blob)


@st.composite
def huge_lengths(draw):
    length = draw(st.sampled_from([0xFFFFFFF0, 0xFFFFFFFE, 0x7FFFFFFF, 0x10000000, 0xFFFFFFFF]))
    where = draw(st.sampled_from(["pixels", "text"]))

    def mutate(data: bytes) -> bytes:
        if where == "pixels":
            at = _pixel_value_offset(data) - 4
            return data[:at] + struct.pack("<I", length) + data[at + 4 :]
        return _insert_before_pixels(data, _element(0x0040, 0xA160, b"UT", b"some text", length))

    return f"{where} length {length:#x}", mutate


@st.composite
def preambles(draw):
    preamble = draw(st.binary(min_size=128, max_size=128))
    return "random preamble", lambda data: preamble + data[128:]


def _zero_length_pixels(data: bytes) -> bytes:
    at = _pixel_value_offset(data) - 4
    return data[:at] + struct.pack("<I", 0)


@st.composite
def broken_fragments(draw):
    """Encapsulated pixel data: corrupt an item tag or length, drop the delimiter, or overwrite a fragment."""
    how = draw(st.sampled_from(["item length", "item tag", "no delimiter", "fragment bytes", "extra item"]))
    number = draw(st.integers(0, 0xFFFFFFFF))
    run = draw(st.binary(min_size=1, max_size=64))
    position = draw(st.floats(0, 1, exclude_max=True))

    def mutate(data: bytes) -> bytes:
        start = _pixel_value_offset(data)  # basic offset table item
        (bot_length,) = struct.unpack_from("<I", data, start + 4)
        fragment = start + 8 + bot_length  # first fragment's item tag
        if how == "item length":
            return data[: fragment + 4] + struct.pack("<I", number) + data[fragment + 8 :]
        if how == "item tag":
            return data[:fragment] + struct.pack("<I", number) + data[fragment + 4 :]
        if how == "no delimiter":
            return data[:-8]
        if how == "extra item":
            return data[:-8] + b"\xfe\xff\x00\xe0" + struct.pack("<I", len(run)) + run + data[-8:]
        at = fragment + 8 + int((len(data) - fragment - 16) * position)
        return data[:at] + run + data[at + len(run) :]

    return f"fragments: {how}", mutate


@st.composite
def transfer_syntaxes(draw):
    uid = draw(st.one_of(st.sampled_from(TRANSFER_SYNTAXES), st.from_regex(r"\A[0-9.]{1,64}\Z")))
    return f"TransferSyntaxUID {uid!r}", lambda data: _with_transfer_syntax(data, uid)


def _mutation(name: str):
    byte_level = [
        truncations(),
        overwritten_runs(),
        header_values(),
        raw_header_values(),
        wrong_vrs(),
        nested_sequences(),
        huge_lengths(),
        preambles(),
        transfer_syntaxes(),
        st.just(("zero-length PixelData", _zero_length_pixels)),
    ]
    if name in ENCAPSULATED:
        byte_level.append(broken_fragments())
    return st.one_of(byte_level)


@st.composite
def mutated_dicoms(draw, seeds: dict[str, bytes]):
    """A seed with one or two mutations applied in turn, and what was done."""
    name = draw(seed_names)
    data, done = seeds[name], [name]
    for _ in range(draw(st.integers(1, 2))):
        what, mutate = draw(_mutation(name))
        try:
            data = mutate(data)
        except Exception:  # the first mutation broke what the second one needs to find: keep the first
            continue
        done.append(what)
    return " / ".join(done), data


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_answer(response, what: str, output: str | None = None) -> None:
    """< 500; a 4xx carries the JSON error shape; a 200 is a prediction (or the SR, GSPS, SC or PNG asked for)."""
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text}"
    if response.status_code == 200 and output in ("sr", "gsps", "sc"):
        assert response.headers["content-type"] == "application/dicom" and response.content[128:132] == b"DICM", what
        return
    if response.status_code == 200 and output == "png":
        assert response.content.startswith(b"\x89PNG"), what
        return
    body = response.json()
    if response.status_code == 200:
        assert body["instance"]["rows"] > 0 and len(body["diseases"]) > 0, what
        return
    error = body["error"]
    assert 400 <= response.status_code < 500, what
    assert error["code"] and error["message"] and error["request_id"] == response.headers["X-Request-ID"], what


def _worker_peak_rss_kib(client) -> list[int]:
    """VmHWM of the decode worker processes (Linux), to see that nothing huge was allocated there."""
    executor = client.app.state.serving.decoder._executor
    peaks = []
    for pid in list(getattr(executor, "_processes", {}) or {}):
        status = Path(f"/proc/{pid}/status")
        if status.exists():
            peaks += [int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
    return peaks


def _post(client, data: bytes, output: str | None = None):
    return client.post("/v1/predict", content=data, headers=DICOM, params={"format": output} if output else None)


def test_seeds_are_predicted(client, seeds):
    """Every unmutated seed encoding is a good DICOM that gets a 200 (so the mutations start from valid input)."""
    for name, data in seeds.items():
        assert _post(client, data).status_code == 200, name


def test_fuzzed_uploads_never_get_a_500(client, seeds, tiny_dataset):
    """Hundreds of mutated DICOMs, answered as JSON, SR, GSPS or PNG, each get a 4xx JSON error or a 200; afterwards
    the service is ready and serves a good DICOM."""
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(max_examples=250, **FUZZ_SETTINGS)
    @given(case=mutated_dicoms(seeds), output=st.sampled_from([None, None, "sr", "gsps", "png"]))
    def fuzz(case, output):
        what, data = case
        _check_answer(_post(client, data, output), f"{what} (format={output})", output)

    fuzz()
    # The test process (parsing the multipart and every response) must not grow with the inputs.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib < 300 * 1024
    # No decode worker allocated a huge array: all the inputs were refused from their headers.
    assert all(peak < 1024 * 1024 for peak in _worker_peak_rss_kib(client))
    assert client.get("/readyz").status_code == 200
    good = sorted((tiny_dataset / "test").glob("*.dicom"))[0].read_bytes()
    assert _post(client, good).status_code == 200


def test_fuzzed_study_lists_each_failure(client, seeds):
    """A STOW-RS body of mutated parts answers < 500, with every bad part listed as a failure by index."""
    boundary = "fuzzboundary"

    @settings(max_examples=15, **FUZZ_SETTINGS)
    @given(cases=st.lists(mutated_dicoms(seeds), min_size=1, max_size=3), good_first=st.booleans())
    def fuzz(cases, good_first):
        parts = [data for _, data in cases]
        if good_first:
            parts.insert(0, seeds["explicit-16"])
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts
            )
            + f"--{boundary}--\r\n".encode()
        )
        response = client.post(
            "/v1/studies",
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/json",
            },
        )
        what = " | ".join(what for what, _ in cases)
        assert response.status_code in (200, 202, 409), f"{what}: {response.status_code} {response.text}"
        answer = response.json()
        assert len(answer["results"]) + len(answer["failures"]) == len(parts), what
        for failure in answer["failures"]:
            assert 0 <= failure["index"] < len(parts) and failure["code"] and failure["message"], what
        if good_first:
            assert 0 not in {failure["index"] for failure in answer["failures"]}, what

    fuzz()


def test_declared_huge_image_is_refused_from_the_header(client, seeds):
    """A small file declaring 16384 x 16384 x 16-bit pixels is refused (422) without allocating the image."""
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for rows, columns in ((16384, 16384), (65535, 65535), (16384, 4096)):
        data = _with_header(_with_header(seeds["explicit-16"], "Rows", rows), "Columns", columns)
        response = _post(client, data)
        assert response.status_code == 422 and response.json()["error"]["code"] == "unusable_image", response.text
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib < 100 * 1024
    assert all(peak < 1024 * 1024 for peak in _worker_peak_rss_kib(client))


# ---------------------------------------------------------------------------------------------
# Header fields the SR, GSPS and PNG writers copy or read, with odd content
# ---------------------------------------------------------------------------------------------

# The attributes highdicom copies into an SR or GSPS (patient, study, series, equipment, de-identification), what
# the GSPS derives its window and polarity from, and what the JSON, the result UIDs and the intended-use gate read.
COPIED_FIELDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "OtherPatientIDs",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "ContentDate",
    "ContentTime",
    "AcquisitionDateTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "SeriesNumber",
    "InstanceNumber",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "Laterality",
    "ImageLaterality",
    "Manufacturer",
    "InstitutionName",
    "SpecificCharacterSet",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "PresentationLUTShape",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
)
ODD_VALUES = (
    b"",
    b" ",
    b"\x00\x00",
    b"\\",
    b"a\\b\\c",
    b"2019-99-99",
    b"20191340",
    b"99999999",
    b"1900",
    b"25:61:99",
    b"1a",
    b"-1",
    b"1e309",
    b"NaN",
    b"1.2..3",
    b"0.01.2",
    b"1." + b"9" * 70,
    b"=^=^=",
    b"^^^^^^",
    b"a=b=c=d=e",
    b"\x1b$B;3ED\x1b(B",  # an ISO 2022 escape sequence with no character set declaring it
    b"\x1b$)A\xd5",  # a truncated one
    "Jérôme".encode("latin-1"),  # non-ASCII bytes under the default repertoire
    "山田".encode(),
    b"\xff\xfe\xfd",
    b"ISO_IR 192\\GBK",
    b"ISO 2022 IR 87",  # a multi-byte code extension as the only value
    b"INVERSE",
    b"SIGMOID",
    b"\r\n\t\x0c",
)
ODD_VRS = ("UN", "OB", "LO", "SH", "UT", "DS", "IS", "US", "SS", "FD", "DA", "TM", "PN", "UI", "CS", "SQ")


def _with_raw_element(data: bytes, keyword: str, vr: str, value: bytes) -> bytes:
    """The file with one element replaced by these bytes under this VR, written as they are."""
    ds = pydicom.dcmread(io.BytesIO(data))
    tag = BaseTag(pydicom.datadict.tag_for_keyword(keyword))
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@st.composite
def header_fields(draw):
    """One copied attribute rewritten as raw bytes: odd content, over-long, multi-valued, or under another VR."""
    keyword = draw(st.sampled_from(COPIED_FIELDS))
    tag = pydicom.datadict.tag_for_keyword(keyword)
    vr = draw(st.one_of(st.just(pydicom.datadict.dictionary_VR(tag).split(" or ")[0]), st.sampled_from(ODD_VRS)))
    value = draw(
        st.one_of(
            st.sampled_from(ODD_VALUES),
            st.binary(max_size=80),
            st.text(max_size=40).map(lambda text: text.encode("utf-8")),
            st.integers(65, 2000).map(lambda n: b"W" * n),  # over-long for every text VR
            st.lists(st.sampled_from(ODD_VALUES), min_size=2, max_size=5).map(b"\\".join),
        )
    )

    return (
        f"{keyword} as {vr} = {value[:40]!r}{'...' if len(value) > 40 else ''}",
        lambda data: _with_raw_element(data, keyword, vr, value),
    )


def test_fuzzed_header_fields_never_get_a_500(client, seeds):
    """Copied header attributes with odd content (dates, names, UIDs, charsets, windows; wrong VRs; over-long) get a
    4xx JSON error or the JSON, SR, GSPS, SC or PNG asked for."""

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        seed=st.sampled_from(["explicit-16", "explicit-8-mono1", "rle-12-mono1"]),
        mutations=st.lists(header_fields(), min_size=1, max_size=3),
        output=st.sampled_from([None, "sr", "gsps", "sc", "png"]),
    )
    def fuzz(seed, mutations, output):
        data, done = seeds[seed], [seed]
        for what, mutate in mutations:
            try:
                data = mutate(data)
            except Exception:  # pydicom cannot write this combination back (e.g. a charset that is a number)
                continue
            done.append(what)
        _check_answer(_post(client, data, output), f"{' / '.join(done)} (format={output})", output)

    fuzz()


# ---------------------------------------------------------------------------------------------
# Regressions: the minimal inputs behind the 500s the fuzzer found
# ---------------------------------------------------------------------------------------------


def _error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def _with_raw_value(data: bytes, group: int, element: int, value: bytes) -> bytes:
    """Replace the value of a short-form (2-byte length) explicit VR element with raw bytes."""
    at = _find(data, group, element)
    (length,) = struct.unpack_from("<H", data, at + 6)
    return data[: at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length :]


def test_rle_segments_longer_than_rows_get_400(client, seeds, tiny_dataset):
    """RLE data that does not fit Rows x Columns is malformed (400), not a decoder panic breaking the pool (500)."""
    data = _with_header(seeds["rle-12-mono1"], "Rows", 200)  # the segments still hold 256 rows
    _error(_post(client, data), 400, "malformed_dicom")
    assert client.get("/readyz").status_code == 200
    assert _post(client, seeds["rle-12-mono1"]).status_code == 200


def test_unknown_vr_in_the_header_gets_400(client, seeds):
    """An element with an unknown VR (read lazily by pydicom) is malformed (400), not a 500 when it is summarised."""
    data = seeds["explicit-16"]
    at = _find(data, 0x0008, 0x0018)  # SOP Instance UID
    _error(_post(client, data[: at + 4] + b"\x55\x8d" + data[at + 6 :]), 400, "malformed_dicom")


@pytest.mark.parametrize("slope", [b"abc ", b"1\\2 ", b"nan ", b"-inf"])
def test_unreadable_rescale_slope_gets_400(client, seeds, slope):
    """A RescaleSlope that is not one finite number is malformed (400), not a 500 in preprocessing."""
    data = _with_header(seeds["explicit-16"], "RescaleSlope", "1.5")
    _error(_post(client, _with_raw_value(data, 0x0028, 0x1053, slope)), 400, "malformed_dicom")


def test_overflowing_rescale_gets_422(client, seeds):
    """A finite RescaleSlope that overflows float32 on the stored values is unusable (422), not an inf/NaN image."""
    _error(_post(client, _with_header(seeds["explicit-16"], "RescaleSlope", "1e38")), 422, "unusable_image")


@pytest.mark.parametrize("vr", [b"DS", b"FD", b"LO"])
def test_pixel_element_with_the_wrong_vr_gets_400(client, seeds, vr):
    """Rows written with another VR than US is malformed (400), not a wrongly typed value that fails later."""
    data = seeds["explicit-16"]
    at = _find(data, 0x0028, 0x0010)
    _error(_post(client, data[: at + 4] + vr + data[at + 6 :]), 400, "malformed_dicom")


def test_rescale_slope_written_as_is_gets_400(client, seeds):
    """RescaleSlope with VR IS (an int for highdicom, which wants a float) is malformed (400), not a 500 in the GSPS."""
    data = _with_header(seeds["rle-12-mono1"], "RescaleSlope", "1")
    at = _find(data, 0x0028, 0x1053)
    _error(_post(client, data[: at + 4] + b"IS" + data[at + 6 :], "gsps"), 400, "malformed_dicom")


@pytest.mark.parametrize("output", ["sr", "gsps"])
@pytest.mark.parametrize(
    "keyword, value",
    [
        ("SOPInstanceUID", None),
        ("SOPInstanceUID", ["1.2.3", "1.2.4"]),
        ("SOPClassUID", "1.2.3.4"),
        ("StudyInstanceUID", "1.2.x"),
        ("SpecificCharacterSet", "ISO_IR 999"),
    ],
)
def test_dicom_output_without_a_valid_reference_gets_422(client, seeds, output, keyword, value):
    """An SR or GSPS of an image without a valid UID to reference (or an unknown charset) is 422; JSON still works."""
    ds = pydicom.dcmread(io.BytesIO(seeds["explicit-16"]))
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    _error(_post(client, buffer.getvalue(), output), 422, "unusable_image")
    assert _post(client, buffer.getvalue()).status_code == 200


def test_overflowing_window_gets_422(client, seeds):
    """Window values beyond float32 (a NaN image once applied) are unusable (422), not a prediction on NaN pixels."""
    data = _with_header(_with_header(seeds["explicit-16"], "WindowCenter", "1e39"), "WindowWidth", "1e39")
    _error(_post(client, data), 422, "unusable_image")


@pytest.mark.parametrize(
    "keyword, vr, value",
    [
        ("PatientName", "OB", b" "),  # under another VR: bytes where highdicom wants a name
        ("PatientName", "PN", b"A^B\\C^D"),  # two names where the attribute holds one
        ("PatientSex", "CS", b"X "),  # not one of the enumerated values M, F, O
        ("WindowCenter", "DS", b"\x00\x00"),  # an empty window: highdicom cannot copy it
        ("StudyDate", "DA", b"2019-99-99"),
        ("AccessionNumber", "SH", b"W" * 200),  # over-long
    ],
)
@pytest.mark.parametrize("output", ["sr", "gsps", "sc"])
def test_odd_copied_attribute_is_left_out_of_dicom_results(client, seeds, keyword, vr, value, output):
    """A copied attribute under another VR, with several values, a value outside its enumerated ones, empty or invalid
    is left out of (or empty in) the SR, GSPS and burned-in image, which are written (200), not a 500."""
    response = _post(client, _with_raw_element(seeds["explicit-16"], keyword, vr, value), output)
    assert response.status_code == 200, response.text
    written = pydicom.dcmread(io.BytesIO(response.content))
    assert written.get(keyword) in (None, "")


def test_reference_uid_under_another_vr_gets_422_for_sr(client, seeds):
    """A Study Instance UID written as LO cannot be referenced by an SR (422); the JSON answer still works."""
    data = _with_raw_element(seeds["explicit-16"], "StudyInstanceUID", "LO", b"20191340")
    _error(_post(client, data, "sr"), 422, "unusable_image")
    assert _post(client, data).status_code == 200


def test_compressed_image_with_two_other_patient_names_is_predicted(client, seeds):
    """Several names in one PN (VM 1-n, e.g. Other Patient Names) come back from a decode worker process (they were not
    picklable: a 500 for every compressed image carrying them)."""
    data = _with_raw_element(seeds["rle-12-mono1"], "OtherPatientNames", "PN", b"Doe^Jane\\Roe^Jane")
    assert client.app.state.serving.decoder.route(data) == "process"
    assert _post(client, data).status_code == 200
