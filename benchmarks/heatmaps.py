"""What the heatmaps cost: inference time of a batch with and without the classifier's `heatmaps` output.

    python -m benchmarks.heatmaps [--pack models/demo-synthetic] [--batch-size 16] [--repeats 30]
                                  [--threads 0] [--out benchmarks/results/heatmaps]

The pack's classifier graph is compared with the same graph with the heatmaps output (and the 1 x 1
convolution computing it) taken out again, so the two differ in exactly what training.heatmaps adds. Both run
on ONNX Runtime's CPU provider with the service's session options, on the same batch of real phantoms
(`--batch-size` images, prepared by the service's pipeline), alternating with/without so that a change in the
machine's load hits both alike; after warm-up runs, each is timed `--repeats` times. Reports the median and
90th percentile per batch of (a) the classifier alone and (b) detector + classifier (what the service runs per
batch), and the median overhead: with / without - 1. Writes `<out>/batch<N>.json` and `.md`, saying which
commit, pack and machine produced them. The target (issue 17): < 10% at batch 16 for (b).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.inputs import input_set, make_input_set
from benchmarks.machine import describe_machine, git_commit, load_average
from service.dicom.pipeline import prepare
from service.inference.modelpack import CLASSIFIER_OUTPUTS, DETECTOR_OUTPUTS, HEATMAP_OUTPUT, INPUT_NAME, ModelPack

ROOT = Path(__file__).resolve().parent.parent
TARGET_OVERHEAD = 0.10


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.heatmaps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pack", type=Path, default=ROOT / "models" / "demo-synthetic")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs of each variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each variant first")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heatmaps")
    return parser


def without_heatmaps(model: onnx.ModelProto) -> onnx.ModelProto:
    """The classifier graph with the heatmaps output, and the nodes only it needs, removed."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    graph = stripped.graph
    kept_outputs = [output for output in graph.output if output.name != HEATMAP_OUTPUT]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    producer = {name: node for node in graph.node for name in node.output}
    needed, pending = set(), [output.name for output in kept_outputs]
    while pending:
        node = producer.get(pending.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            pending += list(node.input)
    kept_nodes = [node for node in graph.node if id(node) in needed]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    used = {name for node in kept_nodes for name in node.input}
    kept_initializers = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    onnx.checker.check_model(stripped)
    return stripped


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch_of_phantoms(pack: ModelPack, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` of the benchmarks' 1643 x 1349 phantoms (cached in benchmarks/.bench-inputs), as the detector's and
    the classifier's inputs."""
    files = make_input_set(replace(input_set("uncompressed"), count=size))
    prepared = [prepare(file.read_bytes(), pack.input_specs) for file in files]
    return tuple(  # type: ignore[return-value]
        np.stack([image.inputs[pack.input_index(model)] for image in prepared]).astype(np.float32)
        for model in ("detector", "classifier")
    )


def summary(seconds: list[float]) -> dict[str, float]:
    values = sorted(seconds)
    return {
        "median_ms": round(1e3 * statistics.median(values), 2),
        "p90_ms": round(1e3 * values[min(len(values) - 1, int(0.9 * len(values)))], 2),
        "runs": len(values),
    }


def measure(args: argparse.Namespace) -> dict:
    pack = ModelPack.load(args.pack)
    if not pack.has_heatmaps:
        raise SystemExit(f"error: the classifier of {args.pack} has no heatmaps output (python -m training.heatmaps)")
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as scratch:
        stripped = Path(scratch) / "classifier.without-heatmaps.onnx"
        onnx.save(without_heatmaps(onnx.load(str(pack.model_file("classifier", "fp32")))), str(stripped))
        detector_images, classifier_images = batch_of_phantoms(pack, args.batch_size)
        detector = session(pack.model_file("detector", "fp32"), args.threads)
        variants = {
            "with": (
                session(pack.model_file("classifier", "fp32"), args.threads),
                [*CLASSIFIER_OUTPUTS, HEATMAP_OUTPUT],
            ),
            "without": (session(stripped, args.threads), list(CLASSIFIER_OUTPUTS)),
        }
        times: dict[str, dict[str, list[float]]] = {name: {"classifier": [], "total": []} for name in variants}
        for repeat in range(args.warmup + args.repeats):
            for name, (classifier, outputs) in variants.items():
                started = time.perf_counter()
                detector.run(list(DETECTOR_OUTPUTS), {INPUT_NAME: detector_images})
                between = time.perf_counter()
                classifier.run(outputs, {INPUT_NAME: classifier_images})
                finished = time.perf_counter()
                if repeat >= args.warmup:
                    times[name]["classifier"].append(finished - between)
                    times[name]["total"].append(finished - started)
    result: dict = {
        "command": "python -m benchmarks.heatmaps "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("pack", "out")),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "pack": f"{pack.name} {pack.version} ({args.pack.name}), classifier {pack.manifest['classifier']['backbone']}, "
        f"inputs {pack.model_inputs.detector.size}/{pack.model_inputs.classifier.size} (detector/classifier), "
        f"heatmaps {pack.heatmaps['shape']}",
        "batch_size": args.batch_size,
        "machine": describe_machine(pack.manifest, ["CPUExecutionProvider"], load_at_start),
        "load_at_end": load_average(),
    }
    for part in ("classifier", "total"):
        result[part] = {name: summary(times[name][part]) for name in variants}
        result[part]["overhead"] = round(
            result[part]["with"]["median_ms"] / result[part]["without"]["median_ms"] - 1, 4
        )
    result["target"] = f"detector + classifier overhead < {TARGET_OVERHEAD:.0%} at batch 16"
    result["met"] = result["total"]["overhead"] < TARGET_OVERHEAD
    return result


def markdown(result: dict) -> str:
    lines = [
        f"# Heatmaps overhead, batch {result['batch_size']} (CPU)",
        "",
        f"Produced by commit {result['commit']} on {result['date']}: `{result['command']}`.",
        f"Pack: {result['pack']}.",
        "",
        "| per batch | without heatmaps median (p90) | with heatmaps median (p90) | overhead (median) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for part, title in (("classifier", "classifier alone"), ("total", "detector + classifier")):
        entry = result[part]
        lines.append(
            f"| {title} | {entry['without']['median_ms']:.1f} ms ({entry['without']['p90_ms']:.1f}) | "
            f"{entry['with']['median_ms']:.1f} ms ({entry['with']['p90_ms']:.1f}) | {100 * entry['overhead']:+.1f}% |"
        )
    lines += [
        "",
        f"Target: {result['target']}: **{'met' if result['met'] else 'NOT met'}**. Runs alternate with/without, "
        f"{result['total']['with']['runs']} timed runs each. No GPU number: this machine has none.",
        "",
        "Machine: "
        + "; ".join(f"{k}: {v}" for k, v in result["machine"].items())
        + f"; load at end {result['load_at_end']}.",
    ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    result = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"batch{args.batch_size}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
