"""The DICOM node alone, and its operator commands.

    python -m service.dicom_node serve --models PACK --dicom-port 11112 [--host 0.0.0.0] [--metrics-port 9102]
    python -m service.dicom_node jobs [--state dead] [--limit 20]
    python -m service.dicom_node replay --job JOB_ID [--job JOB_ID ...] | --all-dead

`serve` runs the node without the HTTP API (same pipeline, same settings: CXR_DICOM_* and the rest);
`python -m service --dicom-port D` runs both in one process. `jobs` and `replay` work on the spool's
job database (CXR_DICOM_SPOOL_DIR or --spool) while the node runs: a replayed job is picked up
within a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from service.dicom_node.jobs import JobStore
from service.dicom_node.node import spool_database
from service.settings import Settings


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.dicom_node", description="DICOM node: receive radiographs by C-STORE, route results."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the node alone (no HTTP API)")
    serve.add_argument("--host", default=None, help="address to listen on (default: CXR_DICOM_HOST or 127.0.0.1)")
    serve.add_argument("--dicom-port", type=int, default=None, help="DICOM port (default: CXR_DICOM_PORT)")
    serve.add_argument("--models", type=Path, default=None, help="model pack folder (default: CXR_MODELS)")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    serve.add_argument("--log-level", default="info")
    for name, text in (("jobs", "list jobs and their deliveries"), ("replay", "retry dead or failed jobs")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--spool", type=Path, default=None, help="spool folder (default: CXR_DICOM_SPOOL_DIR)")
        if name == "jobs":
            command.add_argument("--state", choices=["queued", "processed", "delivered", "failed", "dead"])
            command.add_argument("--limit", type=int, default=50)
        else:
            which = command.add_mutually_exclusive_group(required=True)
            which.add_argument("--job", action="append", help="a job id (from `jobs` or /v1/jobs); repeatable")
            which.add_argument("--all-dead", action="store_true", help="every dead-lettered job")
    return parser


def node_settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if args.models is not None:
        overrides["models"] = args.models
    if args.dicom_port is not None:
        overrides["dicom_port"] = args.dicom_port
    if args.host is not None:
        overrides["dicom_host"] = args.host
    return Settings(**overrides)


async def serve(settings: Settings, metrics_port: int | None) -> None:
    from prometheus_client import start_http_server

    from service.api.app import serving_state_loader  # the models run where CXR_* say, as for the API
    from service.dicom_node.node import DicomNode
    from service.metrics import NodeMetrics, ServiceMetrics

    metrics = ServiceMetrics()
    state = await asyncio.to_thread(serving_state_loader(settings), settings, metrics)
    if state.batcher is None:
        raise SystemExit(f"model pack not served: {state.not_ready_reason}")
    await state.start()
    host = settings.dicom_host or "127.0.0.1"
    node = DicomNode(settings, state, NodeMetrics(metrics.registry))
    await node.start(host)
    if metrics_port is not None:
        start_http_server(metrics_port, addr=host, registry=metrics.registry)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await node.stop()
    await state.stop()


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "serve":
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        settings = node_settings(args)
        if settings.dicom_port is None:
            raise SystemExit("give --dicom-port (or CXR_DICOM_PORT)")
        if not (settings.models / "manifest.json").is_file():
            raise SystemExit(f"no model pack at {settings.models} (expected manifest.json there)")
        asyncio.run(serve(settings, args.metrics_port))
        return 0
    spool = args.spool or Settings().dicom_spool_dir
    database = spool_database(spool)
    if not database.is_file():
        raise SystemExit(f"no job database at {database}: is the spool folder right?")
    store = JobStore(database)
    try:
        if args.command == "jobs":
            json.dump(store.list_jobs(args.state, args.limit), sys.stdout, indent=2)
            print()
            return 0
        replayed = store.replay(None if args.all_dead else args.job)
        for job_id in replayed:
            print(f"replayed {job_id}")
        refused = sorted(set(args.job or []) - set(replayed))
        for job_id in refused:
            print(f"not replayed {job_id}: unknown, not dead or failed, or purged", file=sys.stderr)
        if args.all_dead and not replayed:
            print("no dead job to replay")
        return 1 if refused else 0
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
