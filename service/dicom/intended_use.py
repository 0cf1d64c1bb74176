"""Out-of-distribution gate: is this image what the pack was trained for?

The VinDr papers filtered out adult, lateral, non-chest and other-modality images before labelling,
so a model trained on them says nothing reliable about such images. The gate reads the header only
and returns the reasons an image falls outside the pack's intended population; the service turns
them into warnings, or into a 422 in strict mode. Missing tags are not reasons: many PACS omit them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD")


@dataclass(frozen=True)
class IntendedPopulation:
    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX")
    views: tuple[str, ...] = ("PA", "AP")
    max_age_years: float | None = None

    @classmethod
    def from_manifest(cls, manifest: dict) -> IntendedPopulation:
        spec = manifest.get("intended_population") or {}
        body_part = spec.get("body_part", "CHEST")
        return cls(
            modalities=tuple(spec.get("modalities", cls.modalities)),
            body_parts=(body_part, "THORAX") if body_part == "CHEST" else (body_part,),
            views=tuple(spec.get("views", cls.views)),
            max_age_years=spec.get("max_age_years"),
        )


def age_in_years(age_string: str) -> float | None:
    """DICOM Age String ('018M', '003Y', '010D') in years; None when absent or unparseable."""
    match = _AGE.match(age_string or "")
    if not match:
        return None
    return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2).upper()] / 365.25


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip().upper() if value not in (None, "") else ""


def out_of_distribution_reasons(ds: Any, population: IntendedPopulation) -> list[str]:
    """Why this image is outside the intended population (empty when it is inside, or unknown)."""
    reasons = []
    modality = _text(ds, "Modality")
    if modality and modality not in population.modalities:
        reasons.append(f"Modality {modality} is not one the model was trained on ({'/'.join(population.modalities)}).")
    body_part = _text(ds, "BodyPartExamined")
    if body_part and body_part not in population.body_parts:
        reasons.append(f"BodyPartExamined {body_part} is not a chest.")
    view = _text(ds, "ViewPosition")
    if view and view not in population.views:
        kind = "a lateral view" if view in LATERAL_VIEWS else f"view {view}"
        reasons.append(
            f"ViewPosition is {kind}; the model was trained on frontal ({'/'.join(population.views)}) views."
        )
    age = age_in_years(str(ds.get("PatientAge", "") or ""))
    if age is not None and population.max_age_years is not None and age >= population.max_age_years:
        reasons.append(
            f"The patient's age is outside the intended population (under {population.max_age_years:g} years)."
        )
    return reasons
