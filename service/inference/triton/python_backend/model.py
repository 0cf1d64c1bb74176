"""Triton Python-backend model: one ONNX file of a model pack, run by ONNX Runtime on CPU.

Shipped with the service (package data, never imported by it) and copied by `python -m service.triton_repository
--backend python` into `<model>/<version>/model.py` of the detector and of the classifier; the ONNX file sits
beside it. It runs inside Triton's Python-backend stub, in the environment Triton was started with (numpy and
onnxruntime), not the service's.

Input and output names come from this model's config.pbtxt (written from the pack's manifest and ONNX graph),
so packs whose models have other outputs or input sizes need no change here. Triton's dynamic batcher hands
`execute` several requests at once: they are joined into one ONNX Runtime call (the point of batching) and
the outputs split back per request.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def string_parameters(config: dict) -> dict:
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = string_parameters(config)
        onnx_path = Path(args["model_repository"]) / args["model_version"] / parameters["onnx_file"]

        options = ort.SessionOptions()
        # Each instance is one stub process; without a cap every one of them would start a thread per core.
        options.intra_op_num_threads = int(parameters.get("intra_op_num_threads", "0"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads would burn the cores that decoding needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])

        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        graph_inputs = {tensor.name for tensor in self.session.get_inputs()}
        graph_outputs = {tensor.name for tensor in self.session.get_outputs()}
        missing = sorted(set(self.input_names) - graph_inputs) + sorted(set(self.output_names) - graph_outputs)
        if missing:
            raise pb_utils.TritonModelException(
                f"{onnx_path.name} has no tensor(s) {missing}: inputs {sorted(graph_inputs)}, "
                f"outputs {sorted(graph_outputs)}"
            )

    def execute(self, requests: list) -> list:
        parts = {
            name: [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for request in requests]
            for name in self.input_names
        }
        sizes = [len(part) for part in parts[self.input_names[0]]]
        feeds = {name: arrays[0] if len(arrays) == 1 else np.concatenate(arrays) for name, arrays in parts.items()}
        outputs = self.session.run(self.output_names, feeds)

        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start : start + size]))
                for name, value in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
