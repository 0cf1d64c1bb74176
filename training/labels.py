"""Label sets of the VinDr datasets, copied verbatim from the papers' tables.

Names and ids are exactly as printed in the papers (including their spelling, e.g.
"Brocho-pneumonia", and the gap at PCXR id 39), because real CSVs are matched by these names.
A model pack records which of these labels it was trained on; the papers note that labels with
fewer than ten training examples are not reliably learnable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["local", "global"]


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    kind: Kind
    train_count: int  # positives in the paper's training split (Table 2)


@dataclass(frozen=True)
class LabelSet:
    dataset: str
    labels: tuple[Label, ...]

    @property
    def local(self) -> tuple[Label, ...]:
        return tuple(label for label in self.labels if label.kind == "local")

    @property
    def global_(self) -> tuple[Label, ...]:
        return tuple(label for label in self.labels if label.kind == "global")

    def by_name(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise KeyError(f"{name!r} is not a {self.dataset} label")


def _labels(kind: Kind, rows: list[tuple[int, str, int]]) -> tuple[Label, ...]:
    return tuple(Label(id=i, name=n, kind=kind, train_count=c) for i, n, c in rows)


# VinDr-PCXR, Table 2 (training-set counts).
VINDR_PCXR = LabelSet(
    dataset="vindr-pcxr",
    labels=_labels(
        "local",
        [
            (1, "Boot-shaped heart", 35),
            (2, "Peribronchovascular interstitial opacity or PIO", 1358),
            (3, "Reticulonodular opacity", 509),
            (4, "Bronchial thickening", 562),
            (5, "Enlarged PA", 61),
            (6, "Cardiomegaly", 161),
            (7, "Other opacity", 148),
            (8, "Intrathoracic digestive structure", 2),
            (9, "Diffuse aveolar opacity", 119),
            (10, "Other lesion", 65),
            (11, "Consolidation", 176),
            (12, "Mediastinal shift", 5),
            (13, "Anterior mediastinal mass", 5),
            (14, "Other nodule/mass", 10),
            (15, "Dextro cardia", 16),
            (16, "Aortic enlargement", 2),
            (17, "Pleural effusion", 14),
            (18, "Stomach on the right side", 5),
            (19, "Atelectasis", 23),
            (20, "Calcification", 1),
            (21, "Interstitial lung disease - ILD", 14),
            (22, "Lung hyperinflation", 108),
            (23, "Egg on string sign", 12),
            (24, "Pulmonary fibrosis", 1),
            (25, "Infiltration", 11),
            (26, "Lung cavity", 5),
            (27, "Pneumothorax", 4),
            (28, "Edema", 1),
            (29, "Pleural thickening", 2),
            (30, "Clavicle fracture", 5),
            (31, "Chest wall mass", 3),
            (32, "Lung cyst", 8),
            (33, "Emphysema", 1),
            (34, "Bronchiectasis", 3),
            (35, "Expanded edges of the anterior ribs", 2),
            (36, "Paravertebral mass", 2),
        ],
    )
    + _labels(
        "global",
        [
            (37, "No finding", 5143),
            (38, "Bronchitis", 842),
            (40, "Brocho-pneumonia", 545),
            (41, "Other diseases", 412),
            (42, "Bronchiolitis", 497),
            (43, "Situs inversus", 11),
            (44, "Pneumonia", 392),
            (45, "Pleuro-pneumonia", 6),
            (46, "Diaphragmatic hernia", 3),
            (47, "Tuberculosis", 14),
            (48, "Congenital emphysema", 2),
            (49, "CPAM", 5),
            (50, "Hyaline membrane disease", 19),
            (51, "Mediastinal tumor", 8),
            (52, "Lung tumor", 5),
        ],
    ),
)

# VinDr-CXR, Table 2 (training-set counts, majority vote of the three readers).
VINDR_CXR = LabelSet(
    dataset="vindr-cxr",
    labels=_labels(
        "local",
        [
            (1, "Aortic enlargement", 2348),
            (2, "Atelectasis", 62),
            (3, "Cardiomegaly", 1817),
            (4, "Calcification", 177),
            (5, "Clavicle fracture", 1),
            (6, "Consolidation", 121),
            (7, "Edema", 1),
            (8, "Emphysema", 14),
            (9, "Enlarged PA", 21),
            (10, "Interstitial lung disease (ILD)", 152),
            (11, "Infiltration", 245),
            (12, "Lung cavity", 21),
            (13, "Lung cyst", 4),
            (14, "Lung opacity", 547),
            (15, "Mediastinal shift", 85),
            (16, "Nodule/Mass", 410),
            (17, "Pulmonary fibrosis", 1017),
            (18, "Pneumothorax", 58),
            (19, "Pleural thickening", 882),
            (20, "Pleural effusion", 634),
            (21, "Rib fracture", 41),
            (22, "Other lesion", 363),
        ],
    )
    + _labels(
        "global",
        [
            (23, "Lung tumor", 132),
            (24, "Pneumonia", 469),
            (25, "Tuberculosis", 479),
            (26, "Other diseases", 4002),
            (27, "COPD", 7),
            (28, "No finding", 10606),
        ],
    ),
)

LABEL_SETS = {label_set.dataset: label_set for label_set in (VINDR_PCXR, VINDR_CXR)}

# What the synthetic phantoms plant (see training/synthetic/findings.py) and the demo pack is trained on:
# the common PCXR local findings and the diseases that follow from them.
SYNTHETIC_LOCAL = (
    "Peribronchovascular interstitial opacity or PIO",
    "Reticulonodular opacity",
    "Bronchial thickening",
    "Cardiomegaly",
    "Other opacity",
    "Consolidation",
    "Lung hyperinflation",
    "Pleural effusion",
)
SYNTHETIC_GLOBAL = (
    "No finding",
    "Bronchitis",
    "Brocho-pneumonia",
    "Bronchiolitis",
    "Pneumonia",
    "Other diseases",
)
