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


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(
        "easy",
        contrast=(1.5, 2.2),
        size=(1.1, 1.4),
        noise_sigma=0.008,
        anatomy_variability=0.5,
        texture=0.6,
        label_noise=0.05,
        spurious_rate=0.01,
    ),
    "default": Difficulty(
        "default",
        contrast=(0.6, 1.1),
        size=(0.8, 1.15),
        noise_sigma=0.02,
        anatomy_variability=1.0,
        texture=1.0,
        label_noise=0.12,
        spurious_rate=0.02,
    ),
    "hard": Difficulty(
        "hard",
        contrast=(0.4, 0.75),
        size=(0.65, 1.0),
        noise_sigma=0.032,
        anatomy_variability=1.4,
        texture=1.3,
        label_noise=0.2,
        spurious_rate=0.04,
    ),
}


def resolve_difficulty(difficulty: str | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    try:
        return DIFFICULTIES[difficulty]
    except KeyError:
        raise ValueError(f"unknown difficulty {difficulty!r}; one of {sorted(DIFFICULTIES)}") from None
