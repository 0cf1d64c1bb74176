"""The README's "Try it" answer, made the way the README says: its own phantom command, posted to the shipped pack.

    python -m tests.readme_example          # print the answer
    python -m tests.readme_example --write  # put it into README.md (after the demo pack changes)

tests/test_readme.py checks that the README's JSON is this answer (ids, timings and model numbers aside).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PACK = ROOT / "models" / "demo-synthetic"
SECTION = re.compile(r"^## Try it\n(.*?)(?=^##)", re.MULTILINE | re.DOTALL)  # up to its first subsection
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


def try_it_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the "Try it" section, in order."""
    section = SECTION.search(readme)
    if section is None:
        raise ValueError('README.md has no "## Try it" section')
    return [(match[1], match[2]) for match in BLOCK.finditer(section[1])]


def phantom_command(readme: str) -> list[str]:
    """The section's `python -m training.synthetic ...` line, as arguments (its interpreter path dropped)."""
    for language, text in try_it_blocks(readme):
        for line in text.splitlines():
            if language == "bash" and "-m training.synthetic" in line:
                words = shlex.split(line)
                return [sys.executable, *words[1:]]
    raise ValueError('the "Try it" section has no `python -m training.synthetic` command')


def answer(readme: str) -> tuple[dict, list[dict]]:
    """The service's JSON answer, with the shipped pack, for the phantom the README's command makes; and the
    phantom's planted boxes (its annotations_test.csv rows)."""
    command = phantom_command(readme)
    with tempfile.TemporaryDirectory() as folder:
        out = command.index("--out") + 1
        command[out] = folder  # the README's /tmp/phantoms, kept out of the way
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
        (dicom,) = sorted(Path(folder).glob("test/*.dicom"))[:1]
        with (Path(folder) / "annotations_test.csv").open() as rows:
            boxes = [row for row in csv.DictReader(rows) if row["image_id"] == dicom.stem]
        settings = Settings(models=PACK, providers=["CPUExecutionProvider"])
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            response = client.post(
                "/v1/predict", content=dicom.read_bytes(), headers={"Content-Type": "application/dicom"}
            )
    response.raise_for_status()
    return response.json(), boxes


def readme_answer(readme: str) -> tuple[dict, str]:
    """The README's JSON answer and its text (the section's first json block)."""
    for language, text in try_it_blocks(readme):
        if language == "json":
            return json.loads(text), text
    raise ValueError('the "Try it" section has no json block')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.readme_example", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--write", action="store_true", help="replace the README's json block with the answer")
    args = parser.parse_args(argv)
    readme = README.read_text()
    text = json.dumps(answer(readme)[0], indent=4) + "\n"
    if not args.write:
        print(text, end="")
        return
    _, old = readme_answer(readme)
    README.write_text(readme.replace(old, text, 1))
    print(f"wrote the answer into {README}")


if __name__ == "__main__":
    main()
