"""python -m service.triton_repository --pack PACK --out DIR --backend onnxruntime|python

Writes the model pack as an NVIDIA Triton model repository (service/inference/triton/repository.py), for
`tritonserver --model-repository DIR`; the service then runs the models there with CXR_INFERENCE_URL set
(README "Scaling out with Triton"). No torch, no GPU needed to write it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.inference.modelpack import ModelPack, PackError
from service.inference.triton.repository import (
    BACKENDS,
    RepositoryError,
    ServingOptions,
    default_preferred_batch_sizes,
    write_repository,
)


def get_args_parser() -> argparse.ArgumentParser:
    defaults = ServingOptions()
    parser = argparse.ArgumentParser(
        prog="python -m service.triton_repository",
        description="Write a model pack as a Triton model repository (detector and classifier).",
    )
    parser.add_argument("--pack", type=Path, required=True, help="model pack folder (manifest.json + ONNX files)")
    parser.add_argument("--out", type=Path, required=True, help="repository folder to write (must be empty or new)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        required=True,
        help="onnxruntime: Triton's ONNX Runtime backend (GPU, TensorRT); python: Triton's Python backend "
        "running ONNX Runtime on CPU (machines without a GPU, CI)",
    )
    parser.add_argument("--force", action="store_true", help="replace a repository this command wrote before")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument(
        "--preferred-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes Triton's dynamic batcher sends without waiting further (default: half the max and the max)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=defaults.max_queue_delay_us,
        help="longest a request waits in Triton's queue for a batch to fill (microseconds)",
    )
    parser.add_argument("--instances", type=int, default=defaults.instances, help="model instances per device")
    parser.add_argument(
        "--instance-kind",
        choices=("gpu", "cpu"),
        default=defaults.instance_kind,
        help="onnxruntime backend: one instance group per GPU, or on CPU (python backend: always CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16"),
        default=defaults.precision,
        help="which ONNX files of the pack to ship (TensorRT makes its fp16 engine from the fp32 file)",
    )
    parser.add_argument(
        "--tensorrt",
        choices=("fp16", "fp32", "off"),
        default=defaults.tensorrt,
        help="onnxruntime backend on GPU: TensorRT as execution accelerator at this precision, or off (CUDA only)",
    )
    parser.add_argument("--tensorrt-workspace-mb", type=int, default=defaults.tensorrt_workspace_mb)
    parser.add_argument(
        "--tensorrt-cache-dir",
        default=defaults.tensorrt_cache_dir,
        help="engine cache on the Triton host (a subfolder per ONNX file)",
    )
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=defaults.cpu_threads,
        help="ONNX Runtime threads per instance on CPU (0: one per core; set it when instances share the cores)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        pack = ModelPack.load(args.pack)
    except PackError as exc:
        print(f"python -m service.triton_repository: error: {exc}", file=sys.stderr)
        return 2
    options = ServingOptions(
        max_batch_size=args.max_batch_size,
        preferred_batch_sizes=tuple(args.preferred_batch_sizes or default_preferred_batch_sizes(args.max_batch_size)),
        max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        instance_kind=args.instance_kind,
        precision=args.precision,
        tensorrt=args.tensorrt,
        tensorrt_workspace_mb=args.tensorrt_workspace_mb,
        tensorrt_cache_dir=args.tensorrt_cache_dir,
        cpu_threads=args.cpu_threads,
    )
    try:
        configs = write_repository(pack, args.out, args.backend, options, force=args.force)
    except RepositoryError as exc:
        print(f"python -m service.triton_repository: error: {exc}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    print(f"wrote {pack.name} {pack.version} as a Triton model repository ({args.backend} backend) to {out}:")
    for config in configs:
        print(f"  {config.relative_to(out)}")
    print(f"serve it:  tritonserver --model-repository {out}")
    print("then run the service with CXR_INFERENCE_URL=grpc://<triton host>:8001 (README: Scaling out with Triton)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
