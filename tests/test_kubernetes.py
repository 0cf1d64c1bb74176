"""deploy/kubernetes/: every manifest validates offline (kubernetes-validate's bundled schemas, strict: a misspelt
field fails), and the pieces fit together (the service finds Triton, the initContainer runs our exporter)."""

from __future__ import annotations

import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service import triton_repository
from service.settings import InferenceUrl, Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.29", "1.33")  # an old release still in long-term support, and a recent one


def resources() -> list[dict]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found += [resource for resource in yaml.safe_load_all(path.read_text()) if resource]
    return found


def by_kind(kind: str, name: str) -> dict:
    (resource,) = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return resource


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_strictly(version):
    """Each resource is valid for the Kubernetes release, with unknown fields refused."""
    names = []
    for resource in resources():
        kubernetes_validate.validate(resource, version, strict=True)
        names.append(f"{resource['kind']}/{resource['metadata']['name']}")
    assert sorted(names) == sorted(
        [
            "Deployment/cxr-service",
            "Service/cxr-service",
            "HorizontalPodAutoscaler/cxr-service",
            "PodDisruptionBudget/cxr-service",
            "Deployment/cxr-triton",
            "Service/cxr-triton",
        ]
    )


def test_strict_validation_catches_a_misspelt_field():
    """The check above can fail: a misspelt probe field is refused."""
    deployment = by_kind("Deployment", "cxr-service")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_service_reaches_triton_and_its_settings_are_real():
    """CXR_INFERENCE_URL names the Triton Service's gRPC port; every CXR_* variable is a setting the service reads."""
    (container,) = by_kind("Deployment", "cxr-service")["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    settings = Settings(**{name.removeprefix("CXR_").lower(): value for name, value in env.items()})
    url = InferenceUrl.parse(settings.inference_url)
    triton = by_kind("Service", "cxr-triton")
    assert url.protocol == "grpc" and url.host == triton["metadata"]["name"]
    assert {"name": "grpc", "port": url.port} in [
        {"name": p["name"], "port": p["port"]} for p in triton["spec"]["ports"]
    ]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_triton_gets_a_gpu_our_repository_and_its_own_probes():
    """Triton asks for a GPU, serves what the initContainer exported with our exact command, and is probed on
    Triton's own health endpoints."""
    pod = by_kind("Deployment", "cxr-triton")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    command = init["command"]
    assert command[:3] == ["python", "-m", "service.triton_repository"]
    args = triton_repository.get_args_parser().parse_args(command[3:])  # flags our exporter really has
    assert args.backend == "onnxruntime" and args.force, shlex.join(command)
    (triton,) = pod["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert f"--model-repository={args.out}" in triton["args"]
    mounts = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts["model-repository"] == init_mounts["model-repository"] and str(args.out).startswith(
        mounts["model-repository"]
    )
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
