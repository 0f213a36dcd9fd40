"""deploy/kubernetes: valid against the Kubernetes schemas, and wired the way the server works.

Schema validation uses kubernetes-validate (strict: an unknown or misspelt field
fails) for the oldest version with native gRPC probes (1.27) and the newest the
package knows. The other checks tie the manifests to the server: probe ports
and health service names, the Services' selectors, the drain timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from embedding_server.settings import build_parser

ROOT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(ROOT.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (doc,) = by_kind(kind)
    return doc


def container() -> dict[str, Any]:
    (server,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return server


def env() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container()["env"]}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version):
    checked = 0
    for name, doc in documents():
        if doc["kind"] == "Kustomization":
            continue  # kustomize's own file, not a cluster object
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} ({doc['kind']}) is not valid for Kubernetes {version}: {error.message}")
        checked += 1
    assert checked == 5


def test_schema_validation_can_fail():
    """The validator is strict: a misspelt field in the Deployment is caught."""
    broken = one("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    listed = set(one("Kustomization")["resources"])
    on_disk = {p.name for p in ROOT.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_probes_are_native_grpc_health_checks_on_the_grpc_port():
    server = container()
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": 50051, "http": 8000, "metrics": 9090}
    services = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = server[probe]["grpc"]
        assert grpc_probe["port"] == ports["grpc"], probe
        services[probe] = grpc_probe.get("service", "")
    # The two names the server registers with grpc.health.v1.
    assert set(services.values()) <= {"", "embedding.v1.EmbeddingService"}
    assert services["readinessProbe"] == "embedding.v1.EmbeddingService"


def test_resources_have_requests_and_limits():
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    threads = env()["EMBEDDING_THREADS_PER_SESSION"]["valueFrom"]["resourceFieldRef"]
    assert threads["resource"] == "limits.cpu"


def test_drain_fits_in_the_termination_grace_period():
    pod = one("Deployment")["spec"]["template"]["spec"]
    grace = float(env()["EMBEDDING_GRACE_PERIOD"]["value"])
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5
    liveness = container()["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pod["terminationGracePeriodSeconds"]


def test_environment_names_are_real_server_flags():
    flags = {
        "EMBEDDING_" + action.option_strings[0].lstrip("-").upper().replace("-", "_")
        for action in build_parser()._actions
        if action.option_strings and action.dest != "help"
    }
    assert set(env()) <= flags


def test_services_headless_for_grpc_and_regular_for_rest():
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    services = {doc["metadata"]["name"]: doc["spec"] for doc in by_kind("Service")}
    grpc_service, rest_service = services["embedding-grpc"], services["embedding-rest"]
    assert grpc_service["clusterIP"] == "None"
    assert [p["targetPort"] for p in grpc_service["ports"]] == ["grpc"]
    assert rest_service.get("clusterIP") != "None"
    assert [p["targetPort"] for p in rest_service["ports"]] == ["http"]
    for spec in services.values():
        assert spec["selector"].items() <= pod_labels.items()


def test_autoscaler_and_disruption_budget_target_the_deployment():
    deployment = one("Deployment")
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 < hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
