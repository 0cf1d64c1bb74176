"""python -m service --host 127.0.0.1 --port 8000 --models models/demo-synthetic [--workers N] [--dicom-port D]"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from service.multiworker import run_workers
from service.settings import Settings


def settings_problem(error: dict) -> str:
    """One pydantic error about the CXR_* environment, as a line a person can act on."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a rule across several variables: the message names them
        return message
    return f"CXR_{'_'.join(map(str, error['loc'])).upper()}: {message}"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (the help text says what applies)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a model pack over HTTP. Every other setting comes from CXR_* environment variables "
        "(README, Configuration).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="model pack folder (default: $CXR_MODELS when set, else the demo pack models/demo-synthetic)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="HTTP worker processes; above 1 they share one inference server (one set of ONNX "
        "sessions) and each gets max(1, cores // N) decode processes unless CXR_DECODE_WORKERS is set",
    )
    parser.add_argument(
        "--dicom-port",
        type=int,
        default=None,
        help="also run the DICOM node (C-ECHO, C-STORE SCP) on this port, on --host unless CXR_DICOM_HOST is set "
        "(default: CXR_DICOM_PORT; unset: no node). The node alone: python -m service.dicom_node serve",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict = {"models": args.models} if args.models else {}
    if args.dicom_port is not None:
        overrides["dicom_port"] = args.dicom_port
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # a wrong CXR_* variable: say which and why, not a stack trace
        parser.error("; ".join(settings_problem(error) for error in exc.errors()))
    if settings.dicom_port is not None and settings.dicom_host is None:
        settings = settings.model_copy(update={"dicom_host": args.host})
    if settings.dicom_port is not None and args.workers > 1:
        parser.error(
            "--dicom-port runs the node in the HTTP process, so it needs --workers 1; with several workers run "
            "the node alone beside them: python -m service.dicom_node serve"
        )
    if not (settings.models / "manifest.json").is_file():
        parser.error(f"no model pack at {settings.models} (expected manifest.json there)")
    if args.workers > 1:
        run_workers(args, settings)
        return
    # Imported here: the launcher of N workers never serves itself, and would hold ONNX Runtime and the app for nothing.
    from service.api.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
