"""The service's base install (pyproject's [project] dependencies, resolved through what each installed distribution
requires) holds no GPL or AGPL code; every distribution in it declares a licence."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# GPL and AGPL in SPDX ids, free-text licence fields and trove classifiers. LGPL is allowed: a Python package
# is a separately installed library that the service uses unmodified (the LGPL's dynamic-linking case); none is
# in the base install today.
STRONG_COPYLEFT = re.compile(r"(?<![L\w])A?GPL|(?<!Lesser )(?<!Library )General Public License|Affero", re.IGNORECASE)


def base_install() -> dict[str, set[str]]:
    """{distribution: extras asked of it} for the `pediatric-cxr` requirements and everything they require here."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted: dict[str, set[str]] = {}
    pending = [Requirement(line) for line in pyproject["project"]["dependencies"]]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in wanted and extras <= wanted[name]:
            continue
        wanted.setdefault(name, set()).update(extras)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # reported by the test, which needs the install set complete
        for line in requires:
            needed = Requirement(line)
            # A marker names the platform, the Python version and, for an optional part, its extra.
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in wanted[name] | {""}):
                pending.append(needed)
    return wanted


def licences(name: str) -> list[str]:
    """What a distribution says its licence is: the SPDX expression, the License field's first line, the classifiers."""
    meta = metadata.metadata(name)
    said = [meta.get("License-Expression") or "", *(meta.get("License") or "").strip().splitlines()[:1]]
    said += [c.rsplit(" :: ", 1)[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return [text for text in said if text and text.upper() not in ("UNKNOWN", "OTHER/PROPRIETARY LICENSE")]


def is_strong_copyleft(licence: str) -> bool:
    """Whether one licence statement is GPL or AGPL (any version), not LGPL."""
    return bool(STRONG_COPYLEFT.search(licence))


@pytest.mark.parametrize(
    "licence, copyleft",
    [
        ("GPL V3.0", True),  # pylibjpeg-libjpeg's License field
        ("GNU General Public License v3 (GPLv3)", True),
        ("GPL-2.0-or-later", True),
        ("AGPL-3.0-only", True),
        ("GNU Affero General Public License v3", True),
        ("LGPL-2.1-or-later", False),
        ("GNU Lesser General Public License v3 (LGPLv3)", False),
        ("GNU Library or Lesser General Public License (LGPL)", False),
        ("MIT", False),
        ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", False),
        ("MPL-2.0 AND MIT", False),
    ],
)
def test_copyleft_classification(licence, copyleft):
    """GPL and AGPL statements (SPDX, free text, classifiers) are caught; LGPL and permissive ones are not."""
    assert is_strong_copyleft(licence) is copyleft


def test_base_install_has_no_gpl_or_agpl_code():
    """Every distribution the service needs is installed, declares a licence, and none of them is GPL or AGPL (the
    GPLv3 pylibjpeg-libjpeg is replaced by pyjpegls, Pillow and imagecodecs)."""
    wanted = base_install()
    missing = sorted(name for name in wanted if not _installed(name))
    assert not missing, f"not installed, so their licences cannot be checked: {missing} (make install)"
    table = {name: licences(name) for name in sorted(wanted)}
    print("\n".join(f"{name}: {' | '.join(said)}" for name, said in table.items()))
    assert "pylibjpeg-libjpeg" not in wanted
    undeclared = [name for name, said in table.items() if not said]
    assert not undeclared, f"no licence declared: {undeclared}"
    copyleft = {name: said for name, said in table.items() if any(is_strong_copyleft(text) for text in said)}
    assert not copyleft, f"GPL/AGPL in the service's base install: {copyleft}"
    assert {"fastapi", "pydicom", "highdicom", "onnxruntime-gpu", "pyjpegls", "imagecodecs"} <= set(wanted)


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True
