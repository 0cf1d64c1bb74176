"""The out-of-distribution gate reads Modality, BodyPartExamined, ViewPosition and PatientAge."""

import pydicom
import pytest

from service.dicom.intended_use import IntendedPopulation, age_in_years, out_of_distribution_reasons

PEDIATRIC = IntendedPopulation(max_age_years=10)


def _header(**values) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "text,years",
    [
        ("018M", 1.5),
        ("003Y", 3.0),
        ("010D", 10 / 365.25),
        ("052W", 364 / 365.25),
        ("", None),
        ("abc", None),
        ("12", None),
    ],
)
def test_age_strings_parse_to_years(text, years):
    """DICOM age strings in days, weeks, months and years convert to years; junk gives None."""
    assert age_in_years(text) == (pytest.approx(years) if years is not None else None)


def test_pediatric_frontal_chest_radiograph_passes():
    """A CR/DX frontal chest image of a child has no reasons; missing tags are not reasons either."""
    assert (
        out_of_distribution_reasons(
            _header(Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA", PatientAge="004Y"), PEDIATRIC
        )
        == []
    )
    assert out_of_distribution_reasons(_header(), PEDIATRIC) == []


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"Modality": "MR"}, "Modality MR"),
        ({"BodyPartExamined": "ABDOMEN"}, "ABDOMEN"),
        ({"ViewPosition": "LL"}, "lateral"),
        ({"PatientAge": "034Y"}, "under 10 years"),
    ],
)
def test_each_out_of_distribution_tag_gives_a_reason(values, fragment):
    """Another modality, body part, a lateral view or an adult each give one reason naming the problem."""
    reasons = out_of_distribution_reasons(_header(**values), PEDIATRIC)
    assert len(reasons) == 1 and fragment in reasons[0]


def test_reasons_never_echo_the_patients_age():
    """The age reason states the limit, not the patient's age (the header value stays out of responses and logs)."""
    (reason,) = out_of_distribution_reasons(_header(PatientAge="034Y"), PEDIATRIC)
    assert "34" not in reason
