"""Dockerfile, docker-compose.yml and deploy/kubernetes/: parsed and checked for what they must hold.

No Docker engine or Kubernetes cluster runs here, so these tests check syntax (YAML parses, the
Dockerfile's instructions) and the fields that matter (see docs/operations.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import SETTING_NAMES, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
STOP_GRACE = 5  # core.worker_manager.STOP_GRACE: the supervisor's wait on top of SHUTDOWN_TIMEOUT


def k8s_documents() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and "kind" in doc, f"{path.name}: not a Kubernetes object"
            docs[doc["kind"]] = doc
    return docs


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
    listed = set(k8s["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


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
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout + STOP_GRACE

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
