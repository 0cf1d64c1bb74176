"""Model input -> model outputs -> JSON: the model pack, ONNX Runtime, the batcher, postprocessing, and the
shared inference server with its protocol and client (`python -m service --workers N`)."""
