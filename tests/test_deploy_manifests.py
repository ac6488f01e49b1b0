"""Dockerfile, docker-compose.yml and deploy/kubernetes/: parsed and checked for what they must hold.

No Docker engine or Kubernetes cluster runs here, so these tests check syntax (YAML parses, the
Dockerfile's instructions) and the fields that matter (see docs/operations.md).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.foundation.config import SETTING_NAMES, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
STOP_GRACE = 5  # core.worker_manager.STOP_GRACE: the supervisor's wait on top of SHUTDOWN_TIMEOUT
EXIT_MARGIN = 5  # then the supervisor disconnects its own client, stops its services and exits


def kustomize_documents(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists (its resources, directories followed), without its patches."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path.is_dir():
            docs.extend(kustomize_documents(path))
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and "kind" in doc, f"{path}: not a Kubernetes object"
            docs.append(doc)
    return docs


def k8s_documents() -> dict[str, dict[str, Any]]:
    """The Deployment variant (`kubectl apply -k deploy/kubernetes/`) by kind, plus its Kustomization."""
    docs = {doc["kind"]: doc for doc in kustomize_documents(K8S)}
    docs["Kustomization"] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return docs


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` (kustomize built into kubectl), when this machine has it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the static checks still ran")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return k8s_documents()


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


# -- Dockerfile ---------------------------------------------------------------------------------------


def test_dockerfile_slim_non_root_runtime_deps_cmd_and_healthcheck() -> None:
    steps = dockerfile_instructions()
    keywords = [k for k, _ in steps]
    assert keywords[0] == "FROM" and re.fullmatch(r"python:3\.\d+-slim(-\w+)?", steps[0][1])
    assert keywords.count("FROM") == 1
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("CMD")
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "pip install --no-cache-dir -r requirements.txt" in runs and "requirements-dev" not in runs
    cmd = [v for k, v in steps if k == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0]) == ["python", "main.py", "--workers"]
    [health] = [v for k, v in steps if k == "HEALTHCHECK"]
    assert "/health" in health and health.split("CMD", 1)[1].strip().startswith("[")
    assert json.loads(health.split("CMD", 1)[1])[0] == "python"  # the slim image has no curl
    env = " ".join(v for k, v in steps if k == "ENV")
    assert "HTTP_HOST=0.0.0.0" in env and "HTTP_PORT=8080" in env
    assert ("EXPOSE", "8080") in steps
    for source in (v.split()[0] for k, v in steps if k == "COPY"):
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
    copied = {v.split()[0].rstrip("/") for k, v in steps if k == "COPY"}
    assert not copied & {"tests", "bench", ".", ".env"}


def test_dockerignore_keeps_secrets_and_dev_files_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".env", ".venv", ".git", "tests", "bench"} <= ignored


# -- docker-compose.yml -------------------------------------------------------------------------------


def test_compose_runs_broker_redis_postgres_and_the_app_with_workers() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"mosquitto", "redis", "postgres", "app"} <= set(services)
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["redis"]["image"].startswith("redis:")
    assert services["postgres"]["image"].startswith("postgres:")
    app = services["app"]
    assert app["build"] == "."
    assert app["command"][:3] == ["python", "main.py", "--workers"]
    env = {k: str(v) for k, v in app["environment"].items()}
    settings = load_settings(env)  # valid settings
    assert settings.mqtt_broker == "mosquitto" and settings.http_host == "0.0.0.0" and settings.http_port == 8080
    assert env["REDIS_URL"].startswith("redis://redis:") and "@postgres:" in env["DATABASE_URL"]
    assert set(app["depends_on"]) == {"mosquitto", "redis", "postgres"}
    assert all(dep["condition"] == "service_healthy" for dep in app["depends_on"].values())
    assert all("healthcheck" in services[name] for name in ("mosquitto", "redis", "postgres"))
    assert _seconds(app["stop_grace_period"]) > settings.shutdown_timeout + STOP_GRACE


def test_compose_redis_persists_streams_in_a_volume() -> None:
    """docs/streams.md: nothing is lost across a Redis restart only with `appendonly yes`."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    command = [str(part) for part in redis["command"]]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2]))
    assert options["--appendonly"] == "yes"
    data_dir = options.get("--dir", "/data")
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in redis["volumes"]}
    assert data_dir in mounts, "Redis writes its append-only file to a directory without a volume"
    assert mounts[data_dir] in compose["volumes"]  # a named volume, not the container's layer


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", str(text))
    assert match, text
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


# -- Kubernetes ---------------------------------------------------------------------------------------


def test_kubernetes_objects_and_kustomization(k8s: dict[str, dict[str, Any]]) -> None:
    assert {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler", "Kustomization"} <= set(k8s)
    assert "StatefulSet" not in k8s
    # Every manifest is used: listed as a resource or a patch of the kustomization in its directory.
    for path in K8S.rglob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
        used = set(kustomization["resources"]) | {patch.get("path") for patch in kustomization.get("patches", [])}
        assert path.name in used, f"{path.relative_to(ROOT)} is in no kustomization"


def test_deployment_probes_grace_period_env_and_resources(k8s: dict[str, dict[str, Any]]) -> None:
    config = k8s["ConfigMap"]["data"]
    secret = k8s["Secret"]["stringData"]
    deployment = k8s["Deployment"]
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["python", "main.py", "--workers"]

    settings = load_settings({**config, **secret, "MQTT_CLIENT_ID": "pod-name"})
    assert settings.http_host == "0.0.0.0"  # the kubelet's probes come from outside the pod
    assert pod["terminationGracePeriodSeconds"] >= settings.shutdown_timeout + STOP_GRACE + EXIT_MARGIN

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.http_port
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == settings.http_port

    sources = container["envFrom"]
    assert {"configMapRef": {"name": k8s["ConfigMap"]["metadata"]["name"]}} in sources
    assert {"secretRef": {"name": k8s["Secret"]["metadata"]["name"]}} in sources
    client_id = {e["name"]: e for e in container["env"]}["MQTT_CLIENT_ID"]
    assert client_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # unique per replica

    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    assert int(config["WORKER_COUNT"]) >= 1  # set explicitly: containers see the node's CPUs
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_configmap_and_secret_hold_only_known_settings(k8s: dict[str, dict[str, Any]]) -> None:
    known = {name.upper() for name in SETTING_NAMES} | {"ENABLE_REDIS", "REDIS_URL", "ENABLE_DATABASE", "DATABASE_URL"}
    config = k8s["ConfigMap"]["data"]
    secret = k8s["Secret"]["stringData"]
    assert set(config) <= known, set(config) - known
    assert set(secret) <= known, set(secret) - known
    assert all(isinstance(v, str) for v in config.values())  # ConfigMap values must be strings
    assert not {"MQTT_PASSWORD", "DATABASE_URL"} & set(config)  # credentials live in the Secret


def test_hpa_scales_the_deployment(k8s: dict[str, dict[str, Any]]) -> None:
    hpa = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s["Deployment"]["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_service_targets_the_pods_http_port(k8s: dict[str, dict[str, Any]]) -> None:
    service = k8s["Service"]
    labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


# -- the StatefulSet variant (deploy/kubernetes/statefulset/) -------------------------------------------


def _statefulset_overlay() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    overlay = K8S / "statefulset"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    docs = {}
    for name in kustomization["resources"]:
        if not name.startswith(".."):
            doc = yaml.safe_load((overlay / name).read_text())
            docs[doc["kind"] if doc["kind"] != "Service" else "HeadlessService"] = doc
    return kustomization, docs


def test_statefulset_runs_the_deployments_pod_template(k8s: dict[str, dict[str, Any]]) -> None:
    from core.worker_manager import STOP_GRACE as supervisor_stop_grace

    assert supervisor_stop_grace == STOP_GRACE
    kustomization, docs = _statefulset_overlay()
    assert kustomization["resources"][0] == "../base"
    statefulset, deployment = docs["StatefulSet"], k8s["Deployment"]
    assert statefulset["apiVersion"] == "apps/v1"
    assert statefulset["metadata"]["name"] == deployment["metadata"]["name"]
    # The same pod: containers, probes, grace period, MQTT_CLIENT_ID from the (now stable) pod name.
    assert statefulset["spec"]["template"] == deployment["spec"]["template"]
    assert statefulset["spec"]["selector"] == deployment["spec"]["selector"]
    headless = docs["HeadlessService"]
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert statefulset["spec"]["updateStrategy"]["type"] == "RollingUpdate"


def test_statefulset_overlay_retargets_the_hpa_and_keeps_sessions_longer(k8s: dict[str, dict[str, Any]]) -> None:
    kustomization, _ = _statefulset_overlay()
    inline = [yaml.safe_load(p["patch"]) for p in kustomization["patches"] if "patch" in p]
    assert [{"op": "replace", "path": "/spec/scaleTargetRef/kind", "value": "StatefulSet"}] in inline
    [expiry] = [yaml.safe_load((K8S / "statefulset" / p["path"]).read_text())
                for p in kustomization["patches"] if "path" in p]
    assert expiry["metadata"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    base_expiry = int(k8s["ConfigMap"]["data"]["MQTT_SESSION_EXPIRY"])
    assert int(expiry["data"]["MQTT_SESSION_EXPIRY"]) > base_expiry


@pytest.mark.parametrize("variant, workload", [("", "Deployment"), ("statefulset", "StatefulSet")])
def test_both_variants_build_with_kustomize(variant: str, workload: str) -> None:
    built = kustomize_build(K8S / variant)
    kinds = sorted(doc["kind"] for doc in built)
    other = {"Deployment": "StatefulSet", "StatefulSet": "Deployment"}[workload]
    assert workload in kinds and other not in kinds
    by_kind = {doc["kind"]: doc for doc in built}
    target = by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (workload, by_kind[workload]["metadata"]["name"])
    settings = load_settings({**by_kind["ConfigMap"]["data"], **by_kind["Secret"]["stringData"],
                              "MQTT_CLIENT_ID": "pod-name"})
    grace = by_kind[workload]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= settings.shutdown_timeout + STOP_GRACE + EXIT_MARGIN
