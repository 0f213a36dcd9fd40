"""deploy/kubernetes: valid against the Kubernetes schemas, and wired the way the server works.

Schema validation uses kubernetes-validate (strict: an unknown or misspelt field
fails) for the oldest version with native gRPC probes (1.27) and the newest the
package knows. The other checks tie the manifests to the server: probe ports
and health service names, the Services' selectors, the drain timing.

The autoscaling components (KEDA, the HPA on external metrics) are rendered onto
the base the way kustomize does, validated (KEDA's ScaledObject against the
schema below: kubernetes-validate has no CRDs), and their queries checked
against the metric names the server really exports.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
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
    # Threads come from the CPU limit the server reads itself (cpus.py): a pinned
    # --threads-per-session of the whole limit would give every session all the CPUs.
    assert "EMBEDDING_THREADS_PER_SESSION" not in env()


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


# --- autoscaling on queue depth: the kustomize components under autoscaling/ ---------------------

COMPONENTS = ROOT / "autoscaling"
#: KEDA's CRD is not in kubernetes-validate: the parts of its schema these manifests use (keda.sh
#: v2 ScaledObject), strict like the rest. Trigger metadata values are strings in KEDA.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        k: {"type": "string"}
                        for k in ("apiVersion", "kind", "name", "envSourceContainerName")
                    },
                },
                **{
                    k: {"type": "integer", "minimum": 0}
                    for k in (
                        "pollingInterval",
                        "cooldownPeriod",
                        "initialCooldownPeriod",
                        "idleReplicaCount",
                        "minReplicaCount",
                        "maxReplicaCount",
                    )
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as these components use it: maps merge, lists are replaced (atomic)."""
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return patch
    merged = dict(base)
    for key, value in patch.items():
        merged[key] = merge(base.get(key), value) if key in base else value
    return merged


def render(components: list[str]) -> list[dict[str, Any]]:
    """What ``kubectl apply -k`` makes of the base with these components (resources, then patches)."""
    kustomization = one("Kustomization")
    docs = [doc for name in kustomization["resources"] for doc in yaml_documents(ROOT / name)]
    for component in components:
        (spec,) = yaml_documents(COMPONENTS / component / "kustomization.yaml")
        assert (spec["apiVersion"], spec["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
        docs += [
            doc for name in spec.get("resources", []) for doc in yaml_documents(COMPONENTS / component / name)
        ]
        for entry in spec.get("patches", []):
            (patch,) = yaml_documents(COMPONENTS / component / entry["path"])
            key = (patch["kind"], patch["metadata"]["name"])
            matches = [i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"]) == key]
            assert len(matches) == 1, f"{component}/{entry['path']}: patches {key}, found {len(matches)}"
            if patch.get("$patch") == "delete":
                del docs[matches[0]]
            else:
                docs[matches[0]] = merge(docs[matches[0]], patch)
    return docs


def server_metric_names() -> set[str]:
    """Every sample name the server exports (histograms as _bucket/_sum/_count)."""
    from embedding_server.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def queried_metrics(query: str) -> set[str]:
    return set(re.findall(r"\bembedding_[a-z_]+", query))


def test_components_are_listed_and_off_by_default():
    on_disk = {p.parent.name for p in COMPONENTS.glob("*/kustomization.yaml")}
    assert on_disk == {"keda", "external-metrics"}
    assert "components" not in one("Kustomization")  # the default stays the CPU HPA
    for component in on_disk:
        (spec,) = yaml_documents(COMPONENTS / component / "kustomization.yaml")
        listed = {*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []))}
        yamls = {p.name for p in (COMPONENTS / component).glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == yamls - {"prometheus-adapter-values.yaml"}  # Helm values, not a resource


@pytest.mark.parametrize("component", ["keda", "external-metrics"])
def test_rendered_components_are_valid_with_one_autoscaler(component):
    docs = render([component])
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    autoscalers = [doc for doc in docs if doc["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(autoscalers) == 1, "two autoscalers on one Deployment fight"
    (autoscaler,) = autoscalers
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            jsonschema.validate(doc, SCALED_OBJECT_SCHEMA)
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{component}: {doc['kind']} not valid for Kubernetes {version}: {error.message}")


def test_scaled_object_schema_can_fail():
    (scaled,) = [doc for doc in render(["keda"]) if doc["kind"] == "ScaledObject"]
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 64  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = "64"
    scaled["spec"]["minReplicas"] = 2  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)


def test_keda_scales_on_the_summed_queue_depth_of_real_metrics():
    (scaled,) = [doc for doc in render(["keda"]) if doc["kind"] == "ScaledObject"]
    cpu_hpa = one("HorizontalPodAutoscaler")["spec"]
    spec = scaled["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        cpu_hpa["minReplicas"],
        cpu_hpa["maxReplicas"],
    )
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == cpu_hpa["behavior"]
    triggers = {t.get("name", t["type"]): t for t in spec["triggers"]}
    depth = triggers["queue-depth"]
    assert depth["type"] == "prometheus" and depth.get("metricType", "AverageValue") == "AverageValue"
    # One number over every replica, model and (once the server has it) priority label.
    assert re.fullmatch(r"sum\(embedding_queue_depth(\{[^}]*\})?\)", depth["metadata"]["query"])
    assert float(depth["metadata"]["threshold"]) > 0
    waiting = triggers["interactive-queue-seconds"]
    assert waiting["metricType"] == "Value"  # a latency: does not divide by replicas
    assert 'priority!="batch"' in waiting["metadata"]["query"]  # also matches series without the label
    assert triggers["cpu"]["metadata"]["value"] == str(
        cpu_hpa["metrics"][0]["resource"]["target"]["averageUtilization"]
    )
    exported = server_metric_names()
    for trigger in spec["triggers"]:
        if trigger["type"] == "prometheus":
            assert queried_metrics(trigger["metadata"]["query"]) <= exported, trigger["name"]


def test_external_metrics_hpa_reads_what_the_adapter_serves():
    (hpa,) = [doc for doc in render(["external-metrics"]) if doc["kind"] == "HorizontalPodAutoscaler"]
    base = one("HorizontalPodAutoscaler")["spec"]
    for kept in ("minReplicas", "maxReplicas", "behavior", "scaleTargetRef"):
        assert hpa["spec"][kept] == base[kept], kept
    external = {
        m["external"]["metric"]["name"]: m["external"]["target"]
        for m in hpa["spec"]["metrics"]
        if m["type"] == "External"
    }
    assert external["embedding_queue_depth"]["type"] == "AverageValue"
    assert external["embedding_interactive_queue_seconds_p95"]["type"] == "Value"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    values = yaml.safe_load((COMPONENTS / "external-metrics" / "prometheus-adapter-values.yaml").read_text())
    rules = {rule["name"]["as"]: rule for rule in values["rules"]["external"]}
    assert set(external) <= set(rules)
    exported = server_metric_names()
    for name, rule in rules.items():
        query = rule["metricsQuery"]
        assert "<<.LabelMatchers>>" in query and " by (" not in query.replace("sum by (le)", ""), name
        assert queried_metrics(query) <= exported, name
    assert rules["embedding_queue_depth"]["metricsQuery"].startswith("sum(embedding_queue_depth{")


# --- the full-size model components: JSON patches onto the base Deployment --------------------------


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``replace`` ops, as kustomize applies a component's patch (the only op these use)."""
    import copy

    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "replace", op
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        target = doc
        for key in parents:
            target = target[key]
        assert last in target if isinstance(target, dict) else last < len(target), op["path"]
        target[last] = op["value"]
    return doc


@pytest.mark.parametrize("model", ["jina-v3", "bge-m3"])
def test_the_full_size_model_components_render_valid_deployments(model):
    component = yaml_documents(ROOT / "models" / model / "kustomization.yaml")[0]
    assert (component["apiVersion"], component["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    (patch,) = component["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": one("Deployment")["metadata"]["name"]}
    rendered = apply_json_patch(one("Deployment"), yaml.safe_load(patch["patch"]))
    kubernetes_validate.validate(rendered, VERSIONS[-1], strict=True)
    server = rendered["spec"]["template"]["spec"]["containers"][0]
    flags = server["args"]
    assert flags[:2] == ["--model", f"{model}=/models/{model}"]
    parsed = build_parser().parse_args(flags)
    assert (parsed.engine, parsed.precision, parsed.sessions) == ("onnxruntime", "fp32", 1)
    assert server["resources"]["limits"]["memory"] == server["resources"]["requests"]["memory"]
