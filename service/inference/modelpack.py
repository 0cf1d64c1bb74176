"""Model packs: a self-describing folder with manifest.json, detector.onnx and classifier.onnx
(float32) and, unless exported with --no-fp16, their float16 variants (manifest `<model>.variants.fp16`).

A pack is verified (every listed file present, sha256 as in the manifest, a calibrator for every
classifier label) before any session is created, so a truncated or tampered model never serves and
no output called a probability is served uncalibrated. `OnnxModels` runs both models with the
ONNX Runtime configuration that `service.inference.runtime` derives from the settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.dicom.intended_use import IntendedPopulation
from service.dicom.pipeline import InputSpec, ModelInputs
from service.dicom.preprocess import Normalization
from service.inference import runtime
from service.inference.calibration import Calibration, CalibrationError
from service.inference.postprocess import DetectionParams
from service.inference.triage import TriageError, TriageRule
from service.settings import Settings

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "cxr-model-pack/1"
INPUT_NAME = "images"
DETECTOR_OUTPUTS = ("boxes", "scores")
CLASSIFIER_OUTPUTS = ("probabilities",)
# Optional classifier output: per-label class activation maps (N, K, h, w), logits at feature resolution
# (training/heatmaps.py). A pack has it when its manifest lists it among the classifier's outputs.
HEATMAP_OUTPUT = "heatmaps"
MODELS = ("detector", "classifier")


class PackError(RuntimeError):
    """The model pack is missing, incomplete or does not match its manifest."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_input_entry(manifest: dict, model: str) -> dict:
    """`model`'s manifest "input" entry: its own, else the pack-level one (packs exported before the models could
    differ in size)."""
    return manifest[model].get("input") or manifest["input"]


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
    def model_inputs(self) -> ModelInputs:
        """Each model's input spec (model_input_entry)."""

        def spec(model: str) -> InputSpec:
            entry = model_input_entry(self.manifest, model)
            return InputSpec(size=int(entry["size"]), normalization=Normalization(**entry["normalization"]))

        return ModelInputs(detector=spec("detector"), classifier=spec("classifier"))

    @property
    def input_specs(self) -> tuple[InputSpec, ...]:
        """The distinct input specs, the detector's first: what `prepare` makes of every image, and what `run` takes.

        Equal specs are one input, so a pack whose models share a size letterboxes and ships each image once.
        """
        return self.model_inputs.specs

    def input_index(self, model: str) -> int:
        """Which of `input_specs` the model reads."""
        return self.model_inputs.index(model)

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
    def outputs(self) -> dict[str, tuple[str, ...]]:
        """The outputs each model is run for, in the order `OnnxModels.run` returns them (after the detector's):
        the required ones, then the classifier's heatmaps when the pack has them."""
        heatmaps = (HEATMAP_OUTPUT,) if self.has_heatmaps else ()
        return {"detector": DETECTOR_OUTPUTS, "classifier": (*CLASSIFIER_OUTPUTS, *heatmaps)}

    @cached_property
    def has_heatmaps(self) -> bool:
        """Whether the classifier returns class activation maps (`?include=heatmaps`)."""
        return HEATMAP_OUTPUT in (self.manifest["classifier"].get("outputs") or ())

    @property
    def heatmaps(self) -> dict | None:
        """The classifier's manifest entry describing its maps (shape, values, grid), when it has them."""
        return self.manifest["classifier"].get("heatmaps") if self.has_heatmaps else None

    @cached_property
    def triage(self) -> TriageRule | None:
        """The triage operating point (service/inference/triage.py); None for a pack without one."""
        return TriageRule.from_manifest(self.manifest, self.global_labels)

    @cached_property
    def calibration(self) -> Calibration:
        """The calibrators that turn the classifier's raw outputs into the probabilities the service reports."""
        return Calibration.from_manifest(self.manifest, required=self.global_labels)

    def calibrated_probabilities(self, raw: np.ndarray) -> np.ndarray:
        """(..., K) raw classifier outputs -> calibrated probabilities, same shape (float64)."""
        return self.calibration.calibrate_columns(self.global_labels, raw)

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

    @cached_property
    def precisions(self) -> tuple[str, ...]:
        """Precision variants every model of the pack has: "fp32" always, "fp16" when exported."""
        shared = set.intersection(*(set(self.manifest[model].get("variants") or {}) for model in MODELS))
        return ("fp32", *sorted(shared))

    def _file_entry(self, model: str, precision: str) -> dict:
        entry = self.manifest[model]
        if precision == "fp32":  # the model's own entry is its float32 file; other precisions are variants
            return entry
        variants = entry.get("variants") or {}
        if precision not in variants:
            raise PackError(f"pack {self.name} has no {precision} {model} (it has {', '.join(self.precisions)})")
        return variants[precision]

    def model_file(self, model: str, precision: str = "fp32") -> Path:
        return self.path / self._file_entry(model, precision)["file"]

    def model_sha256(self, model: str, precision: str = "fp32") -> str:
        return self._file_entry(model, precision)["sha256"]

    @classmethod
    def load(cls, path: Path, *, require_calibration: bool = True) -> ModelPack:
        """Read and verify a pack; raises PackError saying exactly what is wrong.

        `require_calibration=False` is for the tools that fit the calibrators of a pack that has none
        yet (training.calibrate, training.export); the service never loads a pack that way.
        """
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
        for model in MODELS:
            entry = manifest.get(model) or {}
            # Every listed file, variants included: a tampered fp16 file must not serve on a GPU either.
            files = [("", entry)]
            files += [(f"{precision} ", variant) for precision, variant in (entry.get("variants") or {}).items()]
            for label, listed in files:
                _verify_file(path, f"{label}{model}", listed)
        pack = cls(path=path, manifest=manifest)
        try:
            pack.triage  # noqa: B018 - parsed here, so a malformed entry fails the load rather than a request
        except TriageError as exc:
            raise PackError(f"{manifest_path}: {exc}") from None
        if require_calibration or "calibration" in manifest:
            try:
                pack.calibration  # noqa: B018 - parsed once here, so a malformed entry fails the load, not a request
            except CalibrationError as exc:
                raise PackError(f"{manifest_path}: {exc}") from None
        return pack


def _verify_file(pack: Path, what: str, entry: dict) -> None:
    if not entry.get("file"):
        raise PackError(f"the manifest names no file for the {what}")
    file = pack / entry["file"]
    if not file.is_file():
        raise PackError(f"{what} file {file} is missing")
    actual = sha256_of(file)
    if actual != entry.get("sha256"):
        raise PackError(
            f"{what} file {file.name} has sha256 {actual[:12]}…, the manifest says "
            f"{str(entry.get('sha256'))[:12]}…: the file is truncated or was replaced"
        )


class OnnxModels:
    """ONNX Runtime sessions for both models of a pack, run together on each batch.

    Providers, their options, the precision variant and IO binding come from `settings` through the
    pure functions of `service.inference.runtime`; `runtime` says what is actually in effect.
    """

    def __init__(
        self, pack: ModelPack, *, settings: Settings | None = None, machine: runtime.Machine | None = None
    ) -> None:
        settings = settings or Settings()
        self._outputs = pack.outputs
        plan = runtime.plan_providers(settings.providers, machine or runtime.probe_machine(settings.providers))
        for provider, reason in plan.skipped.items():
            log.info("execution provider %s left out: %s", provider, reason)
        precision, warning = runtime.choose_precision(settings.precision, plan.attempt[0], pack.precisions)
        self._open(pack, settings, plan.attempt, precision)
        in_use = self.detector.get_providers()[0]
        if in_use != plan.attempt[0]:
            # ONNX Runtime fell back while creating the session (e.g. CUDA libraries missing): pick the
            # variant for what actually runs, so auto does not leave fp16 on CPU.
            fallback_precision, warning = runtime.choose_precision(settings.precision, in_use, pack.precisions)
            if fallback_precision != precision:
                precision = fallback_precision
                self._open(pack, settings, tuple(self.detector.get_providers()), precision)
        if self.classifier.get_providers()[0] != in_use:
            raise RuntimeError(
                f"the detector runs on {in_use} but the classifier on {self.classifier.get_providers()[0]}"
            )
        self.providers = self.detector.get_providers()
        self._io_device = runtime.io_binding_device(in_use, settings)
        fallback = runtime.fallback_reason(plan, in_use)
        self.runtime = runtime.RuntimeDescription(
            provider=in_use,
            providers=list(self.providers),
            requested_providers=list(settings.providers),
            precision=precision,
            files={model: pack.model_file(model, precision).name for model in MODELS},
            io_binding=self._io_device is not None,
            provider_options={
                p: dict(o) for p, o in self.detector.get_provider_options().items() if p in self.providers
            },
            session_options=runtime.session_settings(settings),
            fallback=fallback,
            warnings=[message for message in (fallback, warning) if message],
        )
        if fallback:
            log.warning("%s", fallback)
        if warning:
            log.warning("%s", warning)

    def _open(
        self, pack: ModelPack, settings: Settings, providers: Sequence[str], precision: runtime.Precision
    ) -> None:
        options = runtime.session_options(settings)
        sessions = []
        for model in MODELS:
            sha256 = pack.model_sha256(model, precision)
            per_provider = runtime.provider_options(
                providers, settings, precision, INPUT_NAME, pack.model_inputs.spec(model).size, sha256
            )
            if runtime.TENSORRT in providers and settings.trt_engine_cache:
                runtime.tensorrt_cache_dir(settings.trt_engine_cache_dir, sha256).mkdir(parents=True, exist_ok=True)
            sessions.append(
                ort.InferenceSession(
                    str(pack.model_file(model, precision)),
                    options,
                    providers=list(providers),
                    provider_options=per_provider,
                )
            )
        self.detector, self.classifier = sessions
        self.pack = pack

    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """One (N, 1, S, S) float32 batch per input spec of the pack -> boxes (N, L, 4), scores (N, L, C),
        probabilities (N, K) and, when the pack has them, heatmaps (N, K, h, w). Heatmaps are always computed with
        the probabilities: they cost a 1 x 1 convolution of a feature map the classifier computes anyway
        (benchmarks/results/heatmaps)."""
        detector_images, classifier_images = model_batches(self.pack, inputs)
        if self._io_device is not None:
            return self.run_bound(detector_images, classifier_images, *self._io_device)
        outputs: list[np.ndarray] = []
        for model, images in (("detector", detector_images), ("classifier", classifier_images)):
            outputs += getattr(self, model).run(list(self._outputs[model]), {INPUT_NAME: images})
        return tuple(outputs)

    def run_bound(
        self, detector_images: np.ndarray, classifier_images: np.ndarray, device: str, device_id: int = 0
    ) -> tuple[np.ndarray, ...]:
        """`run` through IO binding: each distinct batch is copied to `device` once (both models read it there
        when they share an input); outputs are bound to host memory, where postprocessing needs them."""
        on_device: dict[int, ort.OrtValue] = {}

        def bound(images: np.ndarray) -> ort.OrtValue:
            if id(images) not in on_device:
                array = np.ascontiguousarray(images, dtype=np.float32)
                on_device[id(images)] = ort.OrtValue.ortvalue_from_numpy(array, device, device_id)
            return on_device[id(images)]

        outputs: list[np.ndarray] = []
        for model, images in (("detector", detector_images), ("classifier", classifier_images)):
            session = getattr(self, model)
            binding = session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, bound(images))
            for name in self._outputs[model]:
                binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding)
            outputs += binding.copy_outputs_to_cpu()
        return tuple(outputs)


def model_batches(pack: ModelPack, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(detector batch, classifier batch) from one batch per input spec of the pack (the same array when shared)."""
    if len(inputs) != len(pack.input_specs):
        sizes = [spec.size for spec in pack.input_specs]
        raise ValueError(f"pack {pack.name} takes {len(sizes)} input batch(es) (sizes {sizes}), got {len(inputs)}")
    return inputs[pack.input_index("detector")], inputs[pack.input_index("classifier")]
