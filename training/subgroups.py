"""Subgroups of an evaluation: which images are in which group, and which groups to flag.

Groups come from the DICOM header, where it says: age band (the VinDr-PCXR paper's patients are under
10; pediatric reports split by age, here < 1, 1-5, 5-10 and 10-18 years, plus adults should any
arrive), sex, view (PA/AP), manufacturer and modality (CR/DX). An image whose header lacks an
attribute is in no group of that attribute ("unknown" is not a group: it would mix whatever is missing).

Flags (each group's metrics carry bootstrap CIs from resampling the group's own images):

- "insufficient data": fewer than `MIN_IMAGES` (30) images, or the metric is undefined in the group
  (no positive or negative of any label, no box): its numbers are too uncertain to judge;
- "possibly worse": the CI's lower bound is more than `MARGIN` (0.05) below the overall value, i.e.
  the data cannot rule out that the model is clinically worse in this group (non-inferiority with a
  0.05 margin not shown);
- "worse": the CI's upper bound is below the overall value (the group is measurably worse).

The flags are judged on macro AUROC and on mAP@0.4 (COCO-style matching).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from service.dicom.intended_use import age_in_years

MIN_IMAGES = 30
MARGIN = 0.05
# (name, lower bound inclusive, upper bound exclusive) in years.
AGE_BANDS = (
    ("<1 y", 0.0, 1.0),
    ("1-5 y", 1.0, 5.0),
    ("5-10 y", 5.0, 10.0),
    ("10-18 y", 10.0, 18.0),
    (">=18 y", 18.0, math.inf),
)
ATTRIBUTES = ("age_band", "sex", "view", "manufacturer", "modality")
JUDGED_METRICS = ("mean_auroc", "map40")


def age_band(age_string: str | None) -> str | None:
    years = age_in_years(str(age_string or ""))
    if years is None:
        return None
    return next(name for name, low, high in AGE_BANDS if low <= years < high)


def _text(header, keyword: str) -> str | None:
    value = header.get(keyword) if header is not None else None
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def attributes_of(header) -> dict[str, str | None]:
    """The subgroup attributes of one image from its DICOM header (None where the header does not say)."""
    sex = (_text(header, "PatientSex") or "").upper()
    view = (_text(header, "ViewPosition") or "").upper()
    modality = (_text(header, "Modality") or "").upper()
    return {
        "age_band": age_band(_text(header, "PatientAge")),
        "sex": sex if sex in ("M", "F", "O") else None,
        "view": view or None,
        "manufacturer": _text(header, "Manufacturer"),
        "modality": modality or None,
    }


def groups(attributes: list[Mapping[str, str | None]]) -> dict[tuple[str, str], list[int]]:
    """{(attribute, value): indices of the images in that group}, attributes in ATTRIBUTES order, age bands in
    AGE_BANDS order, other values sorted."""
    found: dict[tuple[str, str], list[int]] = {}
    for index, image in enumerate(attributes):
        for attribute in ATTRIBUTES:
            value = image.get(attribute)
            if value is not None:
                found.setdefault((attribute, value), []).append(index)
    band_order = {name: i for i, (name, _, _) in enumerate(AGE_BANDS)}

    def order(key: tuple[str, str]) -> tuple:
        attribute, value = key
        return (ATTRIBUTES.index(attribute), band_order.get(value, len(band_order)), value)

    return {key: found[key] for key in sorted(found, key=order)}


def flags(
    images: int, metrics: Mapping[str, float | None], intervals: Mapping[str, dict | None], overall: Mapping
) -> list[str]:
    """The flags of one group (module docstring); `metrics`/`intervals` are the group's, `overall` the whole set's."""
    raised: list[str] = []
    if images < MIN_IMAGES:
        raised.append(f"insufficient data: {images} images (< {MIN_IMAGES})")
    for name in JUDGED_METRICS:
        value, interval, reference = metrics.get(name), intervals.get(name), overall.get(name)
        if value is None or reference is None:
            raised.append(f"insufficient data: {name} undefined in the group")
            continue
        if not interval or interval.get("low") is None:
            continue
        if interval["high"] < reference:
            raised.append(f"worse: {name} CI upper bound {interval['high']:.3f} < overall {reference:.3f}")
        elif interval["low"] < reference - MARGIN:
            raised.append(
                f"possibly worse: {name} CI lower bound {interval['low']:.3f} < overall {reference:.3f} - {MARGIN}"
            )
    return list(dict.fromkeys(raised))
