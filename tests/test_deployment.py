"""What the deployment promises, read off the manifests every overlay renders (with kustomize, as
`kubectl apply -k` would) and off the image's build context."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

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
