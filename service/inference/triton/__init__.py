"""NVIDIA Triton / KServe v2: the pack as a Triton model repository (`python -m service.triton_repository`)
and the Python-backend model that runs its ONNX files there."""
