"""What the deployment promises, read off the manifests every overlay renders (with kustomize, as
`kubectl apply -k` would) and off the image's build context."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ["base", "overlays/dev", "overlays/production"]
# The Secret each service reads, and the only keys it may hold.
SECRETS = {
    "campaign": {"DATABASE_URL", "NATS_URL", "HERALD_SERVICE_TOKEN", "HERALD_BOOTSTRAP_TOKEN"},
    "segmentation": {"DATABASE_URL", "NATS_URL", "HERALD_SERVICE_TOKEN"},
    "scheduler": {"DATABASE_URL", "NATS_URL", "HERALD_SERVICE_TOKEN"},
    "dispatch": {"DATABASE_URL", "NATS_URL", "HERALD_SERVICE_TOKEN", "HERALD_SECRET_KEYS"},
}
HERALD_PODS = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "herald"}}}


@cache
def rendered(overlay: str) -> list[dict[str, Any]]:
    output = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def _of_kind(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(overlay) if doc["kind"] == kind]


def _service_of(deployment: dict[str, Any]) -> str:
    # herald-dispatch and its workers (herald-dispatch-twilio, ...) are dispatch.
    return str(deployment["metadata"]["name"]).removeprefix("herald-").split("-")[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_unprivileged_on_a_read_only_root(overlay: str) -> None:
    deployments = _of_kind(overlay, "Deployment")
    assert len(deployments) == 13
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_reads_only_its_own_secret(overlay: str) -> None:
    for deployment in _of_kind(overlay, "Deployment"):
        service = _service_of(deployment)
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            secrets = [ref["secretRef"]["name"] for ref in container.get("envFrom", []) if "secretRef" in ref]
            # A generated Secret's name carries a hash of its content after the name.
            assert [re.sub(r"-[a-z0-9]{10}$", "", name) for name in secrets] == [f"herald-{service}-secrets"]


def test_the_development_secrets_hold_only_what_each_service_needs() -> None:
    secrets = {
        re.sub(r"-[a-z0-9]{10}$", "", doc["metadata"]["name"]): set(doc["data"])
        for doc in _of_kind("overlays/dev", "Secret")
    }
    assert secrets == {f"herald-{service}-secrets": keys for service, keys in SECRETS.items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_keep_the_service_ports_nats_and_postgresql_inside(overlay: str) -> None:
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in _of_kind(overlay, "NetworkPolicy")}
    deny = policies["herald-default-deny"]
    assert deny["podSelector"] == HERALD_PODS["podSelector"] and "ingress" not in deny
    [grpc_rule] = policies["herald-grpc"]["ingress"]
    assert grpc_rule["ports"] == [{"protocol": "TCP", "port": "grpc"}]
    assert grpc_rule["from"] == [
        HERALD_PODS,
        {"namespaceSelector": {"matchLabels": {"herald.io/api-gateway": "true"}}},
    ]
    [receipts] = policies["herald-receipts"]["ingress"]
    assert receipts == {
        "from": [{"namespaceSelector": {"matchLabels": {"herald.io/ingress": "true"}}}],
        "ports": [{"protocol": "TCP", "port": "receipts"}],
    }
    [web] = policies["herald-web"]["ingress"]
    assert web == {
        "from": [{"namespaceSelector": {"matchLabels": {"herald.io/ingress": "true"}}}],
        "ports": [{"protocol": "TCP", "port": "web"}],
    }
    for store, port in (("nats", 4222), ("postgresql", 5432)):
        spec = policies[f"herald-{store}"]
        assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": store}}
        assert spec["ingress"] == [{"from": [HERALD_PODS], "ports": [{"protocol": "TCP", "port": port}]}]


def _excluded(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: a pattern matches the path or one
    of its parent directories; `**` spans directories; a later `!pattern` takes a path back."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        regex = re.escape(pattern.removeprefix("!").strip("/"))
        regex = regex.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not keep
    return excluded


def test_the_image_build_context_leaves_out_local_data_and_secrets() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for left_out in (
        ".data/postgres/PG_VERSION",
        ".data/admin-key",
        ".venv/bin/python",
        ".git/config",
        ".env",
        "services/dispatch/.env.local",
        "deploy/tls/server.key",
        "certs/ca.pem",
        "libs/common/src/herald_common/__pycache__/api.cpython-311.pyc",
    ):
        assert _excluded(left_out, patterns), left_out
    for kept in (
        "pyproject.toml",
        "uv.lock",
        "libs/common/src/herald_common/secret_box.py",
        "services/dispatch/src/herald_dispatch/main.py",
        "protos/herald/campaign/v1/campaign_service.proto",
    ):
        assert not _excluded(kept, patterns), kept


# Kinds of the operators a production cluster runs (Prometheus Operator, KEDA), which the
# Kubernetes schemas do not know: checked by what Herald relies on below.
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}
APIS = {"herald-campaign", "herald-segmentation", "herald-scheduler", "herald-dispatch"}
METRICS_PORT = 9100


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(overlay: str) -> None:
    for doc in rendered(overlay):
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]]
            continue
        # Strict: an unknown or misspelt field is an error, not silently dropped.
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _worker_type(deployment: dict[str, Any]) -> str | None:
    env = deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])
    return next((e["value"] for e in env if e["name"] == "HERALD_DISPATCH_WORKERS"), None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_deployment_has_a_disruption_budget_and_sized_resources(overlay: str) -> None:
    budgets = {doc["metadata"]["name"]: doc["spec"] for doc in _of_kind(overlay, "PodDisruptionBudget")}
    for deployment in _of_kind(overlay, "Deployment"):
        name = deployment["metadata"]["name"]
        assert budgets[name]["selector"] == deployment["spec"]["selector"], name
        assert budgets[name]["maxUnavailable"] == 1
        resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"}, name
        assert "memory" in resources["limits"], name


@pytest.mark.parametrize("overlay", ["base", "overlays/production"])
def test_apis_scale_on_cpu_and_each_worker_on_its_consumer_lag(overlay: str) -> None:
    from herald_common.bus import Subjects

    autoscalers = {
        doc["spec"]["scaleTargetRef"]["name"]: doc["spec"]
        for doc in _of_kind(overlay, "HorizontalPodAutoscaler")
    }
    assert set(autoscalers) == APIS
    for spec in autoscalers.values():
        [metric] = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc["spec"] for doc in _of_kind(overlay, "ScaledObject")}
    workers = {d["metadata"]["name"]: _worker_type(d) for d in _of_kind(overlay, "Deployment")}
    workers = {name: kind for name, kind in workers.items() if kind}
    assert set(scaled) == set(workers)
    config = _of_kind(overlay, "ConfigMap")[0]["data"]
    for name, kind in workers.items():
        [trigger] = scaled[name]["triggers"]
        assert trigger["type"] == "nats-jetstream"
        # The durable consumer each worker type reads its delivery batches with.
        assert trigger["metadata"]["consumer"] == f"dispatch-{kind}", name
        assert trigger["metadata"]["stream"] == Subjects(config["HERALD_NAMESPACE"]).stream("jobs")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_serves_metrics_where_prometheus_scrapes_them(overlay: str) -> None:
    config = _of_kind(overlay, "ConfigMap")[0]["data"]
    for name in ("CAMPAIGN", "SEGMENTATION", "SCHEDULER", "DISPATCH"):
        assert config[f"HERALD_{name}_METRICS_PORT"] == str(METRICS_PORT)
    for deployment in _of_kind(overlay, "Deployment"):
        ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert {"name": "metrics", "containerPort": METRICS_PORT} in ports, deployment["metadata"]["name"]
    [service] = [s for s in _of_kind(overlay, "Service") if s["metadata"]["name"] == "herald-metrics"]
    assert service["spec"]["selector"] == {"app.kubernetes.io/part-of": "herald"}
    assert service["spec"]["ports"] == [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]
    for monitor in _of_kind(overlay, "ServiceMonitor"):
        labels = monitor["spec"]["selector"]["matchLabels"]
        assert labels.items() <= service["metadata"]["labels"].items()
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in _of_kind(overlay, "NetworkPolicy")}
    [scrape] = policies["herald-metrics"]["ingress"]
    assert scrape["ports"] == [{"protocol": "TCP", "port": "metrics"}]


def test_the_alert_rules_read_only_metrics_herald_serves() -> None:
    from herald_common.metrics import Metrics

    served = {metric.name for metric in Metrics("any").registry.collect()}
    [rules] = _of_kind("base", "PrometheusRule")
    alerts = [rule for group in rules["spec"]["groups"] for rule in group["rules"]]
    assert len(alerts) >= 10
    for alert in alerts:
        assert alert["annotations"]["runbook"].startswith("docs/operations.md#")
        anchor = alert["annotations"]["runbook"].split("#")[1]
        assert f"### {alert['alert']}" in (ROOT / "docs" / "operations.md").read_text()
        assert anchor == alert["alert"].lower()
        named = set(re.findall(r"\b(?:herald|grpc_server)_[a-z_]+", alert["expr"]))
        assert named, alert["alert"]
        for metric in named:
            family = re.sub(r"_(bucket|count|sum|total)$", "", metric)
            assert family in served, (alert["alert"], metric)


def test_the_image_is_built_in_stages_and_runs_unprivileged() -> None:
    lines = [line.strip() for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) >= 2
    final = lines[stages[-1] :]
    assert final[0].split()[1].endswith("-slim")
    # The runtime stage takes the built virtualenv only: no sources, no build tools.
    assert not any(line.startswith(("COPY . ", "RUN pip", "RUN uv")) for line in final)
    assert any(line.startswith("COPY --from=") for line in final)
    [user] = [line.split()[1] for line in final if line.startswith("USER ")]
    assert int(user.split(":")[0]) != 0
