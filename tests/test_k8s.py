"""`herd k8s render | apply | status | delete` (cluster/k8s.py, cluster/helm.py).

render: prints exactly what `helm template` prints for the same values (every example in helm/examples/), and
passes the chart's refusals on in one line; without helm it says how to get it.
apply / status / delete: against a Kubernetes API emulator on loopback (kmock, taught server-side apply in
k8s_tools), through a kubeconfig as kubectl would use it, driving `register_cli` with a tiny argparse parser.
The CLI is synchronous (the classic kubernetes client), so it runs in a thread while the emulator serves on
the test's event loop.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import kmock as kmock_lib
import pytest
import yaml

import k8s_tools
from cluster import k8s
from cluster.config import ClusterConfig

pytestmark = pytest.mark.kmock(cls=k8s_tools.server_side_apply_emulator())

RS = "ray.io/v1/rayservices"
RC = "ray.io/v1/rayclusters"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "helm" / "examples").glob("*.yaml"))

# Chart values: a 70B TP4 x PP2 group and an autoscaled 8B on 2..4 pods of 4 GPUs, weights on a PVC,
# API keys from an existing Secret (so no key is generated: renders are reproducible).
VALUES = {
    "image": {"repository": "ghcr.io/acme/herd", "tag": "0.1.0"},
    "config": {"request_timeout_s": 60},
    "apiKeys": {"existingSecret": "herd-keys"},
    "weights": {"source": "pvc", "pvc": {"existingClaim": "llama-weights"}},
    "models": [
        {"name": "llama2-70b", "path": "llama2-70b", "tensor_parallel_size": 4, "pipeline_parallel_size": 2,
         "resources_per_shard": {"GPU": 1}, "num_replicas": 1},
        {"name": "llama3-8b", "path": "/models/llama3-8b", "resources_per_shard": {"GPU": 1},
         "autoscaling_config": {"min_replicas": 1, "max_replicas": 8}},
    ],
    "workerGroups": [{"name": "gpu", "gpus": 4, "replicas": 2, "minReplicas": 2, "maxReplicas": 4}],
    "autoscaling": {"enabled": True},
}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="herd")
    sub = parser.add_subparsers(dest="command", required=True)
    k8s.register_cli(sub)
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    try:
        return k8s_tools.ensure_helm()
    except k8s_tools.ToolUnavailable as e:
        pytest.fail(f"cannot install helm for the render tests: {e}")


@pytest.fixture(autouse=True)
def helm(monkeypatch, helm_binary) -> Path:
    """`herd k8s` finds the tests' helm through $HERD_HELM, as a user may point it at theirs."""
    monkeypatch.setenv("HERD_HELM", str(helm_binary))
    return helm_binary


@pytest.fixture
def values_file(tmp_path: Path) -> Path:
    p = tmp_path / "values.yaml"
    p.write_text(yaml.safe_dump(VALUES))
    return p


@pytest.fixture(autouse=True)
def no_ambient_kubeconfig(monkeypatch, tmp_path):
    """Tests never see the developer's ~/.kube/config or an in-cluster service account."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def write_kubeconfig(path: Path, server: str, namespace: str = "llm") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}},
                     {"name": "other", "context": {"cluster": "emulator", "user": "tester", "namespace": "team-b"}}],
    }))
    return path


@pytest.fixture
def kubeconfig_for(tmp_path):
    def make(handler) -> Path:
        return write_kubeconfig(tmp_path / "kubeconfig", str(handler.url).rstrip("/"))
    return make


CHART_KINDS = {"v1/services": "Service", "v1/secrets": "Secret", "v1/serviceaccounts": "ServiceAccount",
               "v1/configmaps": "ConfigMap", "v1/pods": "Pod",
               "networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
               "policy/v1/poddisruptionbudgets": "PodDisruptionBudget"}


def declare_kuberay(kmock) -> None:
    """KubeRay's CRDs and the core kinds the chart renders, as API discovery shows them."""
    kmock.resources[RS] = kmock_lib.ResourceInfo(kind="RayService", namespaced=True, verbs={"get", "list", "patch", "delete"})
    kmock.resources[RC] = kmock_lib.ResourceInfo(kind="RayCluster", namespaced=True, verbs={"get", "list"})
    for resource, kind in CHART_KINDS.items():
        kmock.resources[resource] = kmock_lib.ResourceInfo(kind=kind, namespaced=True)


def helm_template(helm: Path, *args: str, release: str = "herd") -> str:
    proc = subprocess.run([str(helm), "template", release, str(REPO / "helm" / "herd"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def without_generated_keys(text: str) -> list[dict]:
    """The manifests, with the chart's randomly generated API key (new on every render) blanked."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-api-keys"):
            d["data"] = {k: "<generated>" for k in d["data"]}
    return docs


# ==== render: the chart, through helm ===================================================================
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_render_is_helm_template(helm, example):
    code, out, err = run_cli(["k8s", "render", "-f", str(example)])
    assert code == 0, err
    assert without_generated_keys(out) == without_generated_keys(helm_template(helm, "--values", str(example)))
    assert any(d["kind"] == "RayService" for d in yaml.safe_load_all(out) if d)


def test_render_passes_values_sets_namespace_and_release(helm, values_file, tmp_path):
    sets = ["--set", "workerGroups[0].maxReplicas=5", "--set", "config.request_timeout_s=30"]
    args = ["-f", str(values_file), *sets]
    code, _, err = run_cli(["k8s", "render", *args, "--name", "llama", "-n", "llm", "-o", str(tmp_path / "rs.yaml")])
    assert code == 0, err
    text = (tmp_path / "rs.yaml").read_text()
    assert err.strip() == f"wrote {len(without_generated_keys(text))} object(s) to {tmp_path / 'rs.yaml'}"
    expected = helm_template(helm, "--namespace", "llm", "--values", str(values_file), *sets, release="llama")
    assert without_generated_keys(text) == without_generated_keys(expected)
    [rs] = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "RayService"]
    assert rs["metadata"]["name"] == "llama-herd"
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 5
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]   # the ingress's: the whole config
    assert ClusterConfig.from_dict(app["args"]).request_timeout_s == 30


def test_render_reports_what_the_chart_refuses(values_file):
    # 8 (70B) + 8 (8B at max) = 16 GPUs; two pods of 4 at most provide 8.
    code, out, err = run_cli(["k8s", "render", "-f", str(values_file), "--set", "workerGroups[0].maxReplicas=2"])
    assert code == 2 and out == ""
    assert err.startswith("herd k8s: helm template refused the values: ")
    assert "models need 16 GPUs at their largest size" in err and "but the worker groups provide 8" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_render_without_helm_says_how_to_get_it(monkeypatch, values_file, tmp_path):
    monkeypatch.delenv("HERD_HELM")
    monkeypatch.setenv("PATH", str(tmp_path))          # no helm anywhere
    code, out, err = run_cli(["k8s", "render", "-f", str(values_file)])
    assert code == 2 and out == ""
    assert err.startswith("herd k8s: helm is not on PATH; install helm (https://helm.sh/docs/intro/install/)")
    assert "--helm" in err and "$HERD_HELM" in err
    code, _, err = run_cli(["k8s", "render", "-f", str(values_file), "--helm", str(tmp_path / "helm")])
    assert code == 2 and err.startswith(f"herd k8s: helm not found at {tmp_path / 'helm'}; install helm")
    code, _, err = run_cli(["k8s", "render", "-f", str(values_file), "--chart", str(tmp_path)])
    assert code == 2 and f"{tmp_path} has no Chart.yaml; pass --chart" in err


# ==== apply / status / delete against the emulator =====================================================
def _applied(kmock) -> list[str]:
    return [str(r.url.path) for r in list(kmock) if r.method == "PATCH"]


@pytest.mark.asyncio
async def test_apply_is_server_side_apply_of_every_chart_object(kmock, kubeconfig_for, values_file, helm):
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    argv = ["k8s", "apply", "-f", str(values_file), "--kubeconfig", str(kc)]

    code, out, err = await asyncio.to_thread(run_cli, argv)
    assert code == 0, err
    rendered = without_generated_keys(helm_template(helm, "--namespace", "llm", "--values", str(values_file)))
    assert out.splitlines() == [f"{d['kind'].lower()}/{d['metadata']['name']} serverside-applied (namespace llm)"
                                for d in rendered]
    # What reached the API: one apply per object, in helm's order, in the kubeconfig context's namespace.
    patches = [r for r in list(kmock) if r.method == "PATCH"]
    assert len(patches) == len(rendered)
    for r in patches:
        assert r.headers["Content-Type"] == "application/apply-patch+yaml"
        assert r.params == {"fieldManager": "herd", "force": "true"}
        assert r.headers["Authorization"] == "Bearer test-token"
    assert patches[-1].url.path == "/apis/ray.io/v1/namespaces/llm/rayservices/herd"
    stored = kmock.objects[RS, "llm", "herd"]
    assert stored["metadata"]["namespace"] == "llm"
    recorded = json.loads(stored["metadata"]["annotations"][k8s.INVENTORY_ANNOTATION])
    assert recorded == [[d["apiVersion"], d["kind"], d["metadata"]["name"]] for d in rendered if d["kind"] != "RayService"]
    args = yaml.safe_load(stored["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert ClusterConfig.from_dict(args).models[0].name == "llama2-70b"
    assert kmock.objects["v1/services", "llm", "herd-grpc"]["spec"]["ports"][0]["appProtocol"] == "grpc"

    # Again, with a change: the same applies, and the stored RayService has the new value.
    VALUES_CHANGED = dict(VALUES, models=[VALUES["models"][0], dict(VALUES["models"][1],
                                                                    autoscaling_config={"max_replicas": 4})])
    values_file.write_text(yaml.safe_dump(VALUES_CHANGED))
    code, out, err = await asyncio.to_thread(run_cli, argv)
    assert code == 0, err
    assert _applied(kmock)[len(rendered):] == _applied(kmock)[:len(rendered)]
    args = yaml.safe_load(kmock.objects[RS, "llm", "herd"]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["models"][1]["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.asyncio
async def test_apply_a_rendered_manifest_in_another_context(kmock, kubeconfig_for, values_file, tmp_path):
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    manifest = tmp_path / "rs.yaml"
    code, _, err = run_cli(["k8s", "render", "-f", str(values_file), "--name", "llama", "-o", str(manifest)])
    assert code == 0, err
    code, out, err = await asyncio.to_thread(
        run_cli, ["k8s", "apply", "-f", str(manifest), "--kubeconfig", str(kc), "--context", "other"])
    assert code == 0, err
    assert out.splitlines()[-1] == "rayservice/llama-herd serverside-applied (namespace team-b)"
    assert kmock.objects[RS, "team-b", "llama-herd"]["kind"] == "RayService"
    # A manifest is applied as it is: no values or --set beside it.
    code, _, err = await asyncio.to_thread(
        run_cli, ["k8s", "apply", "-f", str(manifest), "--set", "x=1", "--kubeconfig", str(kc)])
    assert code == 2 and "is a rendered manifest: apply it alone" in err


@pytest.mark.asyncio
async def test_apply_prunes_what_the_values_no_longer_render(kmock, kubeconfig_for, values_file):
    kc, out = await _apply(kmock, kubeconfig_for, values_file)
    assert "networkpolicy/herd serverside-applied (namespace llm)" in out.splitlines()
    assert not kmock.objects["networking.k8s.io/v1/networkpolicies", "llm", "herd"].deleted

    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "apply", "-f", str(values_file), "--set",
                                                       "networkPolicy.enabled=false", "--kubeconfig", str(kc)])
    assert code == 0, err
    assert out.splitlines()[-1] == "networkpolicy/herd pruned (namespace llm)"
    assert "networkpolicy/herd serverside-applied" not in out
    assert kmock.objects["networking.k8s.io/v1/networkpolicies", "llm", "herd"].deleted
    recorded = json.loads(kmock.objects[RS, "llm", "herd"]["metadata"]["annotations"][k8s.INVENTORY_ANNOTATION])
    assert ["networking.k8s.io/v1", "NetworkPolicy", "herd"] not in recorded
    assert ["v1", "Service", "herd-grpc"] in recorded


@pytest.mark.asyncio
async def test_apply_keeps_the_generated_api_key(kmock, kubeconfig_for, tmp_path):
    # Without apiKeys.existingSecret the chart generates a key; helm template makes a new one on every render,
    # so apply creates that Secret once and leaves it as it is afterwards (create-only).
    values = tmp_path / "generated-key.yaml"
    values.write_text(yaml.safe_dump({k: v for k, v in VALUES.items() if k != "apiKeys"}))
    kc, out = await _apply(kmock, kubeconfig_for, values)
    assert "secret/herd-api-keys serverside-applied (namespace llm)" in out.splitlines()
    key = kmock.objects["v1/secrets", "llm", "herd-api-keys"]["data"]["api-keys"]

    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "apply", "-f", str(values), "--kubeconfig", str(kc)])
    assert code == 0, err
    assert "secret/herd-api-keys unchanged (create-only: it exists) (namespace llm)" in out.splitlines()
    assert kmock.objects["v1/secrets", "llm", "herd-api-keys"]["data"]["api-keys"] == key
    assert not [r for r in list(kmock) if r.method == "PATCH" and r.url.path.endswith("/secrets/herd-api-keys")][1:]


async def _apply(kmock, kubeconfig_for, values_file) -> tuple[Path, str]:
    """The chart applied to the emulator with KubeRay declared: (the kubeconfig, what apply printed)."""
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "apply", "-f", str(values_file), "--kubeconfig", str(kc)])
    assert code == 0, err
    return kc, out


# The chart deploys the ingress and each model as applications of their own (cluster.app.build_model_app).
SERVE_DETAILS = {"applications": {
    "herd": {"status": "RUNNING", "deployments": {
        "Ingress": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}}},
    "herd-model-llama2-70b": {"status": "RUNNING", "deployments": {
        "model-llama2-70b": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]}}},
    "herd-model-llama3-8b": {"status": "RUNNING", "deployments": {
        "model-llama3-8b": {"status": "UPSCALING", "target_num_replicas": 3,
                            "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}]}}},
}}


def _running_status(cluster: str) -> dict[str, Any]:
    return {"status": {
        "serviceStatus": "Running", "numServeEndpoints": 3,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "Number of serve endpoints is greater than 0",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster", "message": "No pending cluster exists",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "activeServiceStatus": {
            "rayClusterName": cluster, "rayClusterStatus": {"state": "ready"},
            "applicationStatuses": {
                "herd-model-llama2-70b": {"status": "RUNNING", "serveDeploymentStatuses": {
                    "model-llama2-70b": {"status": "HEALTHY"}}},
                "herd-model-llama3-8b": {"status": "RUNNING", "serveDeploymentStatuses": {
                    "model-llama3-8b": {"status": "UPSCALING", "message": "Upscaling from 2 to 3 replicas."}}},
                "herd": {"status": "RUNNING", "serveDeploymentStatuses": {"Ingress": {"status": "HEALTHY"}}}}},
    }}


def _seed_cluster(kmock, cluster: str) -> None:
    kmock.objects[RS, "llm", "herd"].patch(_running_status(cluster))
    kmock.objects[RC, "llm", cluster] = {
        "apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": cluster, "namespace": "llm"},
        "spec": {"workerGroupSpecs": [{"groupName": "gpu", "replicas": 3, "minReplicas": 2, "maxReplicas": 4}]}}
    for i, phase in enumerate(["Running", "Running", "Pending"]):
        kmock.objects["v1/pods", "llm", f"{cluster}-gpu-worker-{i}"] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{cluster}-gpu-worker-{i}", "namespace": "llm",
                         "labels": {"ray.io/cluster": cluster, "ray.io/node-type": "worker", "ray.io/group": "gpu"}},
            "status": {"phase": phase}}


@pytest.mark.asyncio
async def test_status_prints_conditions_models_and_worker_groups(kmock, kubeconfig_for, values_file):
    kc, _ = await _apply(kmock, kubeconfig_for, values_file)
    cluster = "herd-raycluster-x7k2p"
    _seed_cluster(kmock, cluster)
    # The Ray dashboard, through the API server's service proxy.
    kmock["get /api/v1/namespaces/llm/services/herd-head-svc:8265/proxy/api/serve/applications/"] << SERVE_DETAILS

    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "status", "--kubeconfig", str(kc)])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "RayService llm/herd: Running, 3 serve endpoint(s)"
    assert lines[1] == f"active cluster: {cluster} (ready)"
    text = "\n".join(lines)
    assert "Ready              True    NonZeroServeEndpoints" in text
    for app in ("herd", "herd-model-llama2-70b", "herd-model-llama3-8b"):
        assert f"serve application {app}: RUNNING" in text
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith(("llama", "-"))}
    assert rows["llama2-70b"][1:4] == ["model-llama2-70b", "HEALTHY", "1/1"]
    assert rows["llama3-8b"][1:4] == ["model-llama3-8b", "UPSCALING", "2/3"]
    assert "Upscaling from 2 to 3 replicas." in text
    assert rows["-"][1:4] == ["Ingress", "HEALTHY", "1/1"]
    group = next(ln for ln in lines if ln.startswith("gpu "))
    assert group.split() == ["gpu", "3", "2", "4", "2"]       # desired, min, max, running pods


@pytest.mark.asyncio
async def test_status_without_dashboard_shows_configured_replicas(kmock, kubeconfig_for, values_file):
    kc, _ = await _apply(kmock, kubeconfig_for, values_file)
    # Just created: KubeRay has not reported anything yet.
    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "status", "herd", "--json", "--kubeconfig", str(kc)])
    assert code == 0, err
    s = json.loads(out)
    assert s["service_status"] == "" and s["conditions"] == []
    assert {d["model"]: d["replicas"] for d in s["deployments"]} == {"llama2-70b": "1 (configured)",
                                                                     "llama3-8b": "1..8 (configured)"}
    assert s["worker_groups"] == [{"group": "gpu", "desired": 2, "min": 2, "max": 4, "running": "-"}]
    # Reported, but the dashboard does not answer through the proxy (404 here): configured counts, no failure.
    _seed_cluster(kmock, "herd-raycluster-abc12")
    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "status", "--json", "--kubeconfig", str(kc)])
    assert code == 0, err
    s = json.loads(out)
    assert {d["deployment"]: (d["status"], d["replicas"]) for d in s["deployments"]} == {
        "model-llama2-70b": ("HEALTHY", "1 (configured)"), "model-llama3-8b": ("UPSCALING", "1..8 (configured)"),
        "Ingress": ("HEALTHY", "-")}


@pytest.mark.asyncio
async def test_delete_removes_what_apply_made(kmock, kubeconfig_for, values_file):
    kc, _ = await _apply(kmock, kubeconfig_for, values_file)
    recorded = json.loads(kmock.objects[RS, "llm", "herd"]["metadata"]["annotations"][k8s.INVENTORY_ANNOTATION])
    assert ["v1", "Service", "herd-grpc"] in recorded
    # An object that apply did not make stays, even with the release's name in it.
    kmock.objects["v1/services", "llm", "herd-extra"] = {"apiVersion": "v1", "kind": "Service",
                                                         "metadata": {"name": "herd-extra", "namespace": "llm"}}

    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "delete", "--kubeconfig", str(kc)])
    assert code == 0, err
    assert out.splitlines() == ["rayservice/herd deleted (namespace llm)"] + [
        f"{kind.lower()}/{name} deleted (namespace llm)" for _, kind, name in recorded]
    deletes = [str(r.url.path) for r in list(kmock) if r.method == "DELETE"]
    assert deletes[0] == "/apis/ray.io/v1/namespaces/llm/rayservices/herd"
    assert "/api/v1/namespaces/llm/services/herd-grpc" in deletes and len(deletes) == 1 + len(recorded)
    assert not kmock.objects["v1/services", "llm", "herd-extra"].deleted

    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "delete", "--kubeconfig", str(kc)])
    assert code == 1 and err.strip() == "herd k8s: RayService llm/herd not found"
    code, _, err = await asyncio.to_thread(run_cli, ["k8s", "delete", "--ignore-not-found", "--kubeconfig", str(kc)])
    assert code == 0, err
    code, _, err = await asyncio.to_thread(run_cli, ["k8s", "status", "--kubeconfig", str(kc)])
    assert code == 1 and "not found" in err


# ==== clear errors ==========================================================================================
@pytest.mark.asyncio
async def test_crd_missing(kmock, kubeconfig_for, values_file):
    kc = kubeconfig_for(kmock)      # an API server without KubeRay: ray.io/v1 is not served
    for resource, kind in CHART_KINDS.items():
        kmock.resources[resource] = kmock_lib.ResourceInfo(kind=kind, namespaced=True)
    kmock["get /apis/ray.io/v1"] << kmock_lib.KubernetesResourceNotFoundError
    for argv in (["k8s", "status"], ["k8s", "delete"], ["k8s", "apply", "-f", str(values_file)]):
        code, out, err = await asyncio.to_thread(run_cli, [*argv, "--kubeconfig", str(kc)])
        assert code == 2, (argv, out, err)
        assert "the RayService custom resource (rayservices.ray.io/v1) is not installed" in err
        assert "KubeRay operator" in err and "Traceback" not in err
    assert not [r for r in list(kmock) if r.method == "PATCH"]     # nothing applied before the check


@pytest.mark.asyncio
async def test_apply_refuses_a_kind_the_cluster_does_not_serve(kmock, kubeconfig_for, values_file):
    declare_kuberay(kmock)           # no Prometheus Operator: monitoring.coreos.com/v1 is not served
    kc = kubeconfig_for(kmock)
    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "apply", "-f", str(values_file), "--set",
                                                       "monitoring.podMonitor.enabled=true", "--kubeconfig", str(kc)])
    assert code == 2 and out == ""
    assert err.strip() == (f"herd k8s: the Kubernetes API at {str(kmock.url).rstrip('/')} does not serve PodMonitor "
                           "(monitoring.coreos.com/v1): install what provides it, or turn that feature off in the values")


@pytest.mark.asyncio
async def test_forbidden(kmock, kubeconfig_for):
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    kmock["get", kmock_lib.resource(RS)] << 403 << {
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
        "message": 'rayservices.ray.io "herd" is forbidden: User "tester" cannot get resource "rayservices"'}
    code, _, err = await asyncio.to_thread(run_cli, ["k8s", "status", "--kubeconfig", str(kc)])
    assert code == 2
    assert err.strip() == ('herd k8s: not allowed to get RayService llm/herd: rayservices.ray.io "herd" is forbidden: '
                           'User "tester" cannot get resource "rayservices"')


def test_api_unreachable(tmp_path, values_file):
    with socket.socket() as s:                  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    for argv in (["k8s", "status"], ["k8s", "delete"], ["k8s", "apply", "-f", str(values_file)]):
        code, out, err = run_cli([*argv, "--kubeconfig", str(kc)])
        assert code == 2, (argv, err)
        assert err.startswith(f"herd k8s: cannot reach the Kubernetes API at http://127.0.0.1:{port}"), err
        assert "Traceback" not in err and err.count("\n") == 1


def test_no_kubeconfig(tmp_path):
    code, _, err = run_cli(["k8s", "status"])
    assert code == 2
    assert "no Kubernetes configuration" in err
    code, _, err = run_cli(["k8s", "status", "--kubeconfig", str(tmp_path / "missing")])
    assert code == 2 and "herd k8s: cannot" in err and "Traceback" not in err
