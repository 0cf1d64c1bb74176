"""The README's "Try it" example is true: its phantom command runs as printed, the JSON it shows is what the shipped
pack answers for that phantom, and the boxes it says the phantom holds are the phantom's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

from tests.browser import missing
from tests.live import LiveService
from tests.readme_example import PACK, README, answer, readme_answer, try_it_blocks

REGENERATE = "regenerate the README's example with: .venv/bin/python -m tests.readme_example --write"
# Different on every request, or on every machine.
VOLATILE = ("request_id", "timing_ms")
# The model's numbers (scores, probabilities, thresholds, boxes, flags) and its identity change whenever the demo pack
# is retrained or recalibrated; the test compares them only as types, so that a pack update is not a red build. The
# structure, the labels and their order, codes, the instance's UIDs and the pack's name are compared as they are.
MODEL_IDENTITY = ("version", "detector_sha256", "classifier_sha256")


def _shape(value, key: str = ""):
    """`value` with numbers, flags and the model's identity replaced by their types, and the findings list by the set of
    its entries' shapes."""
    if isinstance(value, dict):
        return {k: _shape(v, k) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list) and key == "findings":  # which boxes, and how many, is the model's answer too
        return sorted({repr(_shape({**item, "label": "str"})) for item in value})
    if isinstance(value, list):
        return [_shape(item) for item in value]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if key in MODEL_IDENTITY:
        return "str"
    return value


def test_try_it_json_is_what_the_shipped_pack_answers():
    """The "Try it" section's JSON has the same fields, disease labels, codes and instance as the answer the service
    gives now for the phantom the section's command makes (the model's numbers, boxes, identity compared as types)."""
    readme = README.read_text()
    shown, _ = readme_answer(readme)
    live, _ = answer(readme)
    assert _shape(shown) == _shape(live), REGENERATE
    assert shown["model"]["pack"] == live["model"]["pack"] == "demo-synthetic"


def test_try_it_says_which_boxes_the_phantom_holds():
    """The boxes the section says the phantom holds (x and y ranges, rounded) are its annotations_test.csv rows."""
    readme = README.read_text()
    _, boxes = answer(readme)
    said = re.findall(r"x (\d+)–(\d+), y (\d+)–(\d+)", readme.split("## Try it", 1)[1].split("```json", 1)[0])
    planted = [
        tuple(str(round(float(row[k]))) for k in ("x_min", "x_max", "y_min", "y_max"))
        for row in sorted(boxes, key=lambda row: float(row["x_min"]))
    ]
    assert said == planted, f"the README says {said}; the phantom holds {planted}"


def test_try_it_commands_run_as_printed(tmp_path):
    """Every bash block of the "Try it" section (before its subsections) runs as printed against a live service (only
    the interpreter path, the phantom folder and the port changed) and prints a JSON answer for the phantom."""
    if shutil.which("curl") is None:
        missing("curl is not installed (apt-get install curl)")
    blocks = [text for language, text in try_it_blocks(README.read_text()) if language == "bash"]
    assert len(blocks) >= 2
    with LiveService(PACK, tmp_path / "service.log") as service:
        for block in blocks:
            script = (
                block.replace(".venv/bin/python", sys.executable)
                .replace("/tmp/phantoms", str(tmp_path / "phantoms"))
                .replace("http://127.0.0.1:8000", service.base)
            )
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0 and "{" in done.stdout, f"{block}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            printed = json.loads(done.stdout[done.stdout.index("{") :])
            assert printed["instance"]["rows"] == 1643 and printed["diseases"], block
