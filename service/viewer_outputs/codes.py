"""Coded concepts for the label names a model pack reports (SR finding types and evaluations).

Each label maps to one code. Standard codes are used only where the concept is the label's
meaning and the code was checked:

- SCT codes present in pydicom's bundled DICOM code dictionary (PS3.16) are marked "pydicom";
- SCT codes absent from it were checked against published terminology material (SNOMED
  editorial guide, FHIR value sets, OHDSI/OpenSAFELY code lists) and are marked "checked";
- DCM codes come from the Chest CAD context groups (CID 6102-6106) in pydicom's dictionary.

The SR's structural concepts (titles, containers, the score and probability concepts and their
units) are defined here too, so that every output that codes something uses the same codes.

Every other label, and any label a future pack is trained on that is not listed here, gets a code
in the private scheme ``99PCXR`` (declared in each object's Coding Scheme Identification
Sequence). Listed private codes are fixed (``PCXR<id>`` from the VinDr-PCXR table id,
``VCXR<id>`` for VinDr-CXR-only labels); unlisted labels get ``T`` + 12 hex digits of the SHA-1 of
the normalised label text, so the same text always gets the same code.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99PCXR"
PRIVATE_SCHEME_NAME = "Pediatric CXR inference service labels (VinDr-PCXR and VinDr-CXR names)"

_SCT = "SCT"
_DCM = "DCM"

# label -> (scheme, code value, code meaning). Meanings are the coding scheme's own terms.
_STANDARD: dict[str, tuple[str, str, str]] = {
    "Cardiomegaly": (_SCT, "8186001", "Cardiomegaly"),  # checked (PS3.16 lists 287272002 in CID 12248)
    "Consolidation": (_SCT, "95436008", "Lung consolidation"),  # checked
    "Pleural effusion": (_SCT, "60046008", "Pleural effusion"),  # pydicom
    "Pneumothorax": (_SCT, "36118008", "Pneumothorax"),  # pydicom
    "Atelectasis": (_SCT, "46621007", "Atelectasis"),  # checked
    "Edema": (_SCT, "19242006", "Pulmonary edema"),  # pydicom; VinDr "Edema" is pulmonary edema
    "Dextro cardia": (_SCT, "27637000", "Dextrocardia"),  # pydicom
    "Emphysema": (_SCT, "87433001", "Pulmonary emphysema"),  # checked
    "Bronchiectasis": (_SCT, "12295008", "Bronchiectasis"),  # checked
    "Pulmonary fibrosis": (_SCT, "51615001", "Fibrosis of lung"),  # checked
    "Interstitial lung disease - ILD": (_SCT, "233703007", "Interstitial lung disease"),  # checked
    "Interstitial lung disease (ILD)": (_SCT, "233703007", "Interstitial lung disease"),  # checked
    "Pneumonia": (_SCT, "233604007", "Pneumonia"),  # checked (SNOMED editorial guide)
    "Bronchitis": (_SCT, "32398004", "Bronchitis"),  # checked
    "Bronchiolitis": (_SCT, "4120002", "Bronchiolitis"),  # checked
    "Tuberculosis": (_SCT, "56717001", "Tuberculosis"),  # checked
    "COPD": (_SCT, "13645005", "Chronic obstructive lung disease"),  # checked
    "Diaphragmatic hernia": (_SCT, "39839004", "Diaphragmatic hernia"),  # checked
    # Hyaline membrane disease is the radiological name of neonatal respiratory distress syndrome.
    "Hyaline membrane disease": (_SCT, "46775006", "Respiratory distress syndrome in the newborn"),  # checked
    "Reticulonodular opacity": (_DCM, "112065", "Reticulonodular pattern"),  # pydicom, CID 6103
    "Infiltration": (_DCM, "112121", "Infiltrate"),  # pydicom, CID 6104
    "Lung opacity": (_DCM, "112001", "Opacity"),  # pydicom, CID 6104
}

# Labels without a standard code we are sure of, keyed to the paper's table id (stable).
_PCXR_IDS: dict[str, int] = {
    "Boot-shaped heart": 1,
    "Peribronchovascular interstitial opacity or PIO": 2,
    "Bronchial thickening": 4,
    "Enlarged PA": 5,
    "Other opacity": 7,
    "Intrathoracic digestive structure": 8,
    "Diffuse aveolar opacity": 9,
    "Other lesion": 10,
    "Mediastinal shift": 12,
    "Anterior mediastinal mass": 13,
    "Other nodule/mass": 14,
    "Aortic enlargement": 16,
    "Stomach on the right side": 18,
    "Calcification": 20,
    "Lung hyperinflation": 22,
    "Egg on string sign": 23,
    "Lung cavity": 26,
    "Pleural thickening": 29,
    "Clavicle fracture": 30,
    "Chest wall mass": 31,
    "Lung cyst": 32,
    "Expanded edges of the anterior ribs": 35,
    "Paravertebral mass": 36,
    "No finding": 37,
    "Brocho-pneumonia": 40,
    "Other diseases": 41,
    "Situs inversus": 43,
    "Pleuro-pneumonia": 45,
    "Congenital emphysema": 48,
    "CPAM": 49,
    "Mediastinal tumor": 51,
    "Lung tumor": 52,
}
_CXR_ONLY_IDS: dict[str, int] = {"Nodule/Mass": 16, "Rib fracture": 21}

_PRIVATE: dict[str, str] = {
    **{label: f"PCXR{i:02d}" for label, i in _PCXR_IDS.items()},
    **{label: f"VCXR{i:02d}" for label, i in _CXR_ONLY_IDS.items()},
}

PRESENT: Code = codes.SCT.Present  # 52101004, CID 241 "Present-Absent Only"
ABSENT: Code = codes.SCT.Absent  # 272519000

# --- The SR's other concepts (one table for every output that codes something) ----------------
REPORT_TITLE: Code = codes.cid7021.ImagingMeasurementReport  # (126000, DCM): OHIF draws its boxes
# Title of a report with no localized finding. OHIF 3.x opens a (126000, DCM) report in its measurement
# viewport, which fails when there is nothing to draw; any other title gets its text viewport, which
# lists the content. "Chest CAD Report" is what this document is; CID 7021 is an extensible context
# group, and the extension is declared on the code (sr._extended_title).
NO_FINDINGS_TITLE = Code("112000", "DCM", "Chest CAD Report")
PROCEDURE_REPORTED: Code = codes.SCT.ChestImaging  # (413815006, SCT, "Chest imaging")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 10
COMMENT = Code("121106", "DCM", "Comment")
# Image-level (classifier) outputs are calibrated probabilities of the disease being present.
DISEASE_PROBABILITY: Code = codes.DCM.Probability  # (122157, DCM)
UNITLESS: Code = codes.UCUM.NoUnits  # (1, UCUM, "no units"): a probability is a pure number
# A box's detector output is a score in [0, 1], not a probability (it is not calibrated): UCUM's
# annotation unit for a dimensionless score, as LOINC writes assessment scores.
SCORE_UNIT = Code("{score}", "UCUM", "score")
# Triage (the JSON's top-level `triage`): "Triage priority = Routine/Expedite" with the abnormality probability.
# Private codes: SNOMED CT's priority qualifiers (Routine, Urgent, ...) name how soon a *procedure* is done; this
# is a worklist ordering from a validated operating point, which no standard concept states exactly.
TRIAGE_PRIORITY = Code("TRIAGE", PRIVATE_SCHEME, "Triage priority")
PRIORITY_VALUES: dict[str, Code] = {
    "routine": Code("ROUTINE", PRIVATE_SCHEME, "Routine"),
    "expedite": Code("EXPEDITE", PRIVATE_SCHEME, "Expedite"),
}
ABNORMALITY_PROBABILITY = Code("ABNORMAL", PRIVATE_SCHEME, 'Probability of not "No finding"')
_SCORE_SUFFIX = " detection score"


def score_code(label: str) -> Code:
    """The concept of a box's score for `label`: "<finding meaning> detection score" (private scheme).

    One concept per finding, because OHIF labels a drawn box with "<concept meaning>: <value> <unit>"
    only; a shared concept (DCM 111012 "Certainty of Finding") would lose the finding's name there.
    The code value is "S" + 12 hex digits of the SHA-1 of the finding's code, so it is stable.
    """
    finding = code_for(label)
    digest = hashlib.sha1(f"{finding.scheme_designator}:{finding.value}".encode()).hexdigest()[:12].upper()
    meaning = finding.meaning[: 64 - len(_SCORE_SUFFIX)] + _SCORE_SUFFIX
    return Code("S" + digest, PRIVATE_SCHEME, meaning)


def private_code_value(label: str) -> str:
    """The fallback code value of a label: stable across runs, machines and Python versions."""
    normalised = " ".join(label.split()).casefold()
    return "T" + hashlib.sha1(normalised.encode("utf-8")).hexdigest()[:12].upper()


def code_for(label: str) -> Code:
    """The coded concept reported for a finding or disease label (never fails)."""
    if label in _STANDARD:
        scheme, value, meaning = _STANDARD[label]
        return Code(value, scheme, meaning)
    value = _PRIVATE.get(label) or private_code_value(label)
    # Code Meaning is LO (64 characters); the label text itself is the meaning of a private code.
    return Code(value, PRIVATE_SCHEME, label.strip()[:64] or value)


@lru_cache(maxsize=1024)
def _json_code(label: str) -> tuple[tuple[str, str], ...]:
    code = code_for(label)
    return (("scheme", code.scheme_designator), ("value", code.value), ("meaning", code.meaning))


def json_code(label: str) -> dict[str, str]:
    """The JSON `code` of a finding or disease: the concept its SR content items use, as scheme, value, meaning."""
    return dict(_json_code(label))


def coding_scheme_items(used: list[Code]) -> list[CodingSchemeIdentificationItem] | None:
    """Coding Scheme Identification items for the private scheme, when any code uses it."""
    if not any(code.scheme_designator == PRIVATE_SCHEME for code in used):
        return None
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name=PRIVATE_SCHEME_NAME,
            responsible_organization="Pediatric CXR inference service (local, not registered)",
        )
    ]
