"""How hard the phantoms are: presets of finding contrast and size, noise, anatomy spread, clutter and label noise."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Difficulty:
    """How hard the phantoms are. Strength/size knobs are multipliers on each finding's nominal
    look, so one preset scales all eight findings consistently."""

    name: str
    contrast: tuple[float, float]  # range of the multiplier on a finding's nominal strength
    size: tuple[float, float]  # range of the multiplier on a finding's nominal size
    noise_sigma: float  # quantum noise std (density units, at mid-grey), full resolution
    anatomy_variability: float  # 0 = canonical patient, 1 = default spread of size/pose/exposure
    texture: float  # amplitude of normal vascular markings and parenchymal mottle (clutter)
    label_noise: float  # probability that a finding -> disease rule does not fire
    spurious_rate: float  # probability of a disease label without a causing finding


# One preset per row, the fields in Difficulty's order (the table in README.md says the same):
#   name, contrast, size, noise_sigma, anatomy_variability, texture, label_noise, spurious_rate
_PRESETS = (
    Difficulty("easy", (1.5, 2.2), (1.1, 1.4), 0.008, 0.5, 0.6, 0.05, 0.01),
    Difficulty("default", (0.6, 1.1), (0.8, 1.15), 0.02, 1.0, 1.0, 0.12, 0.02),
    Difficulty("hard", (0.4, 0.75), (0.65, 1.0), 0.032, 1.4, 1.3, 0.2, 0.04),
    # One population, as radiographs of one hospital's patients are (or projections of one chest CT with inserted
    # findings): patients barely differ in size, pose and exposure, and the diseases follow from small, local
    # findings. A linear model on thumbnails is strong here; a classifier must beat it (training/baselines.py).
    Difficulty("uniform-anatomy", (0.8, 1.3), (0.6, 0.9), 0.015, 0.15, 0.8, 0.05, 0.01),
)
DIFFICULTIES: dict[str, Difficulty] = {preset.name: preset for preset in _PRESETS}


def resolve_difficulty(difficulty: str | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    try:
        return DIFFICULTIES[difficulty]
    except KeyError:
        raise ValueError(f"unknown difficulty {difficulty!r}; one of {sorted(DIFFICULTIES)}") from None
