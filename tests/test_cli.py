"""The command lines: usage lines name the command to type, and `python -m service --help` shows the defaults."""

from __future__ import annotations

import importlib

import pytest

# Every command the README tells users to run with `python -m`, by module.
COMMANDS = [
    "service",
    "service.api.auth",
    "service.inference.server",
    "service.dicom_node",
    "service.triton_repository",
    "training.synthetic",
    "training.train",
    "training.evaluate",
    "training.export",
    "training.deidentify",
    "training.heatmaps",
    "benchmarks.throughput",
    "benchmarks.memory",
    "benchmarks.multiworker",
    "benchmarks.profile",
    "benchmarks.soak",
    "benchmarks.loadtest",
    "benchmarks.heatmaps",
]


@pytest.mark.parametrize("module", COMMANDS)
def test_usage_line_names_the_command_to_type(module):
    """The usage line of every command starts with `python -m <module>`, not a file name such as train.py."""
    if module in ("service", "service.dicom_node"):
        module_path = f"{module}.__main__"
    elif module == "training.synthetic":
        module_path = "training.synthetic.cli"
    elif module == "benchmarks.loadtest":
        module_path = "benchmarks.loadtest.command"
    else:
        module_path = module
    usage = importlib.import_module(module_path).get_args_parser().format_usage()
    assert usage.startswith(f"usage: python -m {module} "), usage


def test_service_help_shows_the_defaults():
    """`python -m service --help` states the default of every option."""
    help_text = importlib.import_module("service.__main__").get_args_parser().format_help()
    for default in ("(default: 127.0.0.1)", "(default: 8000)", "(default: info)", "(default: 1)"):
        assert default in help_text, help_text
    assert "$CXR_MODELS" in help_text and "(default: None)" not in help_text
