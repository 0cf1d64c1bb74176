"""Model packs: a self-describing folder with manifest.json, detector.onnx and classifier.onnx.

A pack is verified (every file present, sha256 as in the manifest) before any session is created,
so a truncated or tampered model never serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.intended_use import IntendedPopulation
from service.pipeline import InputSpec
from service.postprocess import DetectionParams
from service.preprocess import Normalization

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "cxr-model-pack/1"
INPUT_NAME = "images"
DETECTOR_OUTPUTS = ("boxes", "scores")
CLASSIFIER_OUTPUTS = ("probabilities",)


class PackError(RuntimeError):
    """The model pack is missing, incomplete or does not match its manifest."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPack:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    # Everything below is derived from the manifest, which never changes once a pack is loaded:
    # computed on first use, not again for every image.

    @cached_property
    def input_spec(self) -> InputSpec:
        spec = self.manifest["input"]
        return InputSpec(size=int(spec["size"]), normalization=Normalization(**spec["normalization"]))

    @cached_property
    def local_labels(self) -> list[str]:
        return list(self.manifest["detector"]["labels"])

    @cached_property
    def global_labels(self) -> list[str]:
        return list(self.manifest["classifier"]["labels"])

    @cached_property
    def thresholds(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.manifest["classifier"]["thresholds"].items()}

    @cached_property
    def detection_params(self) -> DetectionParams:
        return DetectionParams(**self.manifest["detector"].get("postprocess", {}))

    @cached_property
    def intended_population(self) -> IntendedPopulation:
        return IntendedPopulation.from_manifest(self.manifest)

    @cached_property
    def _chosen_finding_thresholds(self) -> np.ndarray:
        chosen = self.manifest["detector"].get("thresholds") or {}
        return np.array([chosen.get(label, 0.0) for label in self.local_labels], dtype=np.float32)

    def finding_thresholds(self, floor: float | None = None) -> np.ndarray:
        """Per-class reporting thresholds (index = detector class); `floor` replaces them all when given.

        Packs without thresholds report every detection the postprocess keeps.
        """
        if floor is not None:
            return np.full(len(self.local_labels), floor, dtype=np.float32)
        return self._chosen_finding_thresholds

    def model_file(self, model: str) -> Path:
        return self.path / self.manifest[model]["file"]

    @classmethod
    def load(cls, path: Path) -> ModelPack:
        """Read and verify a pack; raises PackError saying exactly what is wrong."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise PackError(f"no manifest.json in {path}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise PackError(f"{manifest_path} is not valid JSON: {exc}") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise PackError(f"{manifest_path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        for model in ("detector", "classifier"):
            entry = manifest.get(model) or {}
            file = path / entry.get("file", f"{model}.onnx")
            if not file.is_file():
                raise PackError(f"{model} file {file} is missing")
            actual = sha256_of(file)
            if actual != entry.get("sha256"):
                raise PackError(f"{model} file {file.name} has sha256 {actual[:12]}…, the manifest says "
                                f"{str(entry.get('sha256'))[:12]}…: the file is truncated or was replaced")
        return cls(path=path, manifest=manifest)


class OnnxModels:
    """ONNX Runtime sessions for both models of a pack, run together on each batch."""

    def __init__(self, pack: ModelPack, providers: list[str], intra_op_threads: int = 0) -> None:
        available = ort.get_available_providers()
        wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        self.detector = ort.InferenceSession(str(pack.model_file("detector")), options, providers=wanted)
        self.classifier = ort.InferenceSession(str(pack.model_file("classifier")), options, providers=wanted)
        self.providers = self.detector.get_providers()
        if providers and providers[0] not in self.providers:
            log.warning("execution provider %s is not usable here; running on %s", providers[0], self.providers[0])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images (N, 1, S, S) float32 -> boxes (N, L, 4), scores (N, L, C), probabilities (N, K)."""
        boxes, scores = self.detector.run(list(DETECTOR_OUTPUTS), {INPUT_NAME: images})
        (probabilities,) = self.classifier.run(list(CLASSIFIER_OUTPUTS), {INPUT_NAME: images})
        return boxes, scores, probabilities
