"""`herd k8s render | apply | status | delete` (cluster/k8s.py).

render: the manifest validates (KubeRay's RayService CRD schema, Kubernetes 1.30 for the Services and the
pod templates) and its serveConfigV2 is a herd ClusterConfig; bad configs exit 2 with one line.
apply / status / delete: against a Kubernetes API emulator on loopback (kmock), through a kubeconfig as
kubectl would use it, driving `register_cli` with a tiny argparse parser. The CLI is synchronous (the classic
kubernetes client), so it runs in a thread while the emulator serves on the test's event loop. kmock answers
200 where a real API server answers 201 on creates; the client treats both as success.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import socket
from pathlib import Path
from typing import Any

import kmock as kmock_lib
import kubernetes_validate
import pytest
import yaml

import k8s_tools
from cluster import k8s
from cluster.config import ClusterConfig

RS = "ray.io/v1/rayservices"
RC = "ray.io/v1/rayclusters"

CONFIG = {
    "grpc_port": 9000,
    "http_port": 8000,
    "request_timeout_s": 60,
    "models": [
        {"name": "llama2-70b", "path": "llama2-70b", "tensor_parallel_size": 4, "pipeline_parallel_size": 2,
         "resources_per_shard": {"GPU": 1}, "num_replicas": 1},
        {"name": "llama3-8b", "path": "/weights/llama3-8b", "resources_per_shard": {"GPU": 1},
         "autoscaling_config": {"min_replicas": 1, "max_replicas": 8}},
    ],
}
# 8 (70B) + 8 (8B at max) = 16 GPUs = 4 pods x 4 GPUs.
RENDER_ARGS = ["--image", "ghcr.io/acme/herd:0.1.0", "--gpus-per-worker", "4", "--workers", "2",
               "--min-workers", "2", "--max-workers", "4", "--autoscale", "--models-pvc", "llama-weights",
               "--api-keys-secret", "herd-keys", "--node-selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="herd")
    sub = parser.add_subparsers(dest="command", required=True)
    k8s.register_cli(sub)
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    p = tmp_path / "cluster.yaml"
    p.write_text(yaml.safe_dump(CONFIG))
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


def declare_kuberay(kmock) -> None:
    """The KubeRay CRDs, as API discovery shows them."""
    kmock.resources[RS] = kmock_lib.ResourceInfo(kind="RayService", namespaced=True, verbs={"get", "list", "create", "patch", "delete"})
    kmock.resources[RC] = kmock_lib.ResourceInfo(kind="RayCluster", namespaced=True, verbs={"get", "list"})
    kmock.resources["v1/services"] = kmock_lib.ResourceInfo(kind="Service", namespaced=True)
    kmock.resources["v1/pods"] = kmock_lib.ResourceInfo(kind="Pod", namespaced=True)


# ==== render ================================================================================================
def test_render_is_a_valid_rayservice(config_file):
    from ray.serve.schema import ServeDeploySchema

    code, out, err = run_cli(["k8s", "render", "-f", str(config_file), "-n", "llm", *RENDER_ARGS])
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["RayService", "Service", "Service"]
    rs = docs[0]

    errors = k8s_tools.rayservice_errors(rs)
    assert not errors, errors[:5]
    for svc in docs[1:]:
        kubernetes_validate.validate(svc, "1.30", strict=True)
    cluster = rs["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, "1.30", strict=True)

    sc = yaml.safe_load(rs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(sc)
    [app] = sc["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    cfg = ClusterConfig.from_dict(app["args"])
    assert cfg.host == "0.0.0.0" and sc["http_options"]["host"] == "0.0.0.0"
    assert sc["grpc_options"]["port"] == 9000 and sc["http_options"]["request_timeout_s"] == 60
    assert cfg.api_keys_file == "/etc/herd/api-keys/api-keys"
    paths = {m.name: m.path for m in cfg.models}
    assert paths == {"llama2-70b": "/models/llama2-70b", "llama3-8b": "/weights/llama3-8b"}

    assert rs["metadata"]["namespace"] == "llm"
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    assert cluster["enableInTreeAutoscaling"] is True
    [group] = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 4)
    pod = group["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "4"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["shared-mem"]["emptyDir"]["medium"] == "Memory"
    assert vols["models"]["persistentVolumeClaim"] == {"claimName": "llama-weights", "readOnly": True}
    assert vols["api-keys"]["secret"]["secretName"] == "herd-keys"
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "ray stop"
    grpc = docs[1]
    assert grpc["metadata"]["name"] == "herd-grpc"
    assert grpc["spec"]["ports"][0] == {"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP",
                                        "appProtocol": "grpc"}
    assert grpc["spec"]["selector"] == {"herd.dev/instance": "herd", "ray.io/serve": "true"}


def test_render_to_file_and_cpu_workers(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "tiny", "path": "/m/tiny", "resources_per_shard": {"CPU": 0.5},
                                               "tensor_parallel_size": 2}]}))
    code, _, err = run_cli(["k8s", "render", "-f", str(cfg), "--gpus-per-worker", "0", "--no-services",
                            "-o", str(tmp_path / "rs.yaml")])
    assert code == 0, err
    [rs] = list(yaml.safe_load_all((tmp_path / "rs.yaml").read_text()))
    [group] = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu"
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("config, extra, message", [
    (CONFIG, ["--gpus-per-worker", "4", "--workers", "2"],
     "models need 16 GPUs at their largest size (llama2-70b: TP x PP = 4 x 2 x 1 GPU x 1 replica(s); "
     "llama3-8b: TP x PP = 1 x 1 x 1 GPU x 8 replica(s)), but the workers provide 8 (2 pod(s) x 4 GPU)"),
    ({"models": [{"name": "m", "path": "/m", "tensor_parallel_size": 8, "placement_strategy": "STRICT_PACK",
                  "resources_per_shard": {"GPU": 1}}]}, ["--gpus-per-worker", "4", "--workers", "2"],
     "STRICT_PACK puts all TP x PP = 8 x 1 shards (8 GPUs) on one node, but a worker has 4 GPUs"),
    ({"api_keys": ["sk-123"], "models": [{"name": "m", "path": "/m", "resources_per_shard": {"GPU": 1}}]}, [],
     "inline api_keys"),
    ({"models": [{"name": "m", "path": "/m", "tensor_parallel_size": 0}]}, [],
     "models[0].tensor_parallel_size: Input should be greater than or equal to 1"),
    ({"models": [{"name": "m", "path": "/m"}], "hots": "0.0.0.0"}, [], "hots: unknown key"),
])
def test_render_rejects_bad_configs(tmp_path, config, extra, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(config))
    code, out, err = run_cli(["k8s", "render", "-f", str(cfg), *extra])
    assert code == 2 and out == ""
    assert message in err, err
    assert "Traceback" not in err and err.count("\n") == 1


# ==== apply / status / delete against the emulator =====================================================
@pytest.mark.asyncio
async def test_apply_creates_then_patches(kmock, kubeconfig_for, config_file):
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    argv = ["k8s", "apply", "-f", str(config_file), "--kubeconfig", str(kc), *RENDER_ARGS]

    code, out, err = await asyncio.to_thread(run_cli, argv)
    assert code == 0, err
    assert out.splitlines() == ["rayservice/herd created (namespace llm)", "service/herd-grpc created (namespace llm)",
                                "service/herd-http created (namespace llm)"]
    # What reached the API: the rendered RayService, in the kubeconfig context's namespace, with a token.
    posts = [r for r in list(kmock) if r.method == "POST"]
    assert [str(r.url.path) for r in posts] == ["/apis/ray.io/v1/namespaces/llm/rayservices",
                                               "/api/v1/namespaces/llm/services", "/api/v1/namespaces/llm/services"]
    assert posts[0].headers["Authorization"] == "Bearer test-token"
    stored = kmock.objects[RS, "llm", "herd"]
    assert stored["metadata"]["namespace"] == "llm"
    args = yaml.safe_load(stored["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert ClusterConfig.from_dict(args).models[0].name == "llama2-70b"
    assert kmock.objects["v1/services", "llm", "herd-grpc"]["spec"]["ports"][0]["appProtocol"] == "grpc"

    # Again, with a change: 409 on create, then a merge patch of the same object.
    config = yaml.safe_load(config_file.read_text())
    config["models"][1]["autoscaling_config"]["max_replicas"] = 4
    config_file.write_text(yaml.safe_dump(config))
    code, out, err = await asyncio.to_thread(run_cli, argv)
    assert code == 0, err
    assert out.splitlines()[0] == "rayservice/herd configured (namespace llm)"
    patches = [r for r in list(kmock) if r.method == "PATCH"]
    assert [str(r.url.path) for r in patches][0] == "/apis/ray.io/v1/namespaces/llm/rayservices/herd"
    assert patches[0].headers["Content-Type"] == "application/merge-patch+json"
    args = yaml.safe_load(kmock.objects[RS, "llm", "herd"]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["models"][1]["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.asyncio
async def test_apply_a_rendered_manifest_in_another_context(kmock, kubeconfig_for, config_file, tmp_path):
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    manifest = tmp_path / "rs.yaml"
    code, _, err = run_cli(["k8s", "render", "-f", str(config_file), "--name", "llama", "--no-services",
                            "-o", str(manifest), *RENDER_ARGS])
    assert code == 0, err
    code, out, err = await asyncio.to_thread(
        run_cli, ["k8s", "apply", "-f", str(manifest), "--kubeconfig", str(kc), "--context", "other"])
    assert code == 0, err
    assert out.strip() == "rayservice/llama created (namespace team-b)"
    assert kmock.objects[RS, "team-b", "llama"]["kind"] == "RayService"


SERVE_DETAILS = {"applications": {"herd": {"status": "RUNNING", "deployments": {
    "model-llama2-70b": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
    "model-llama3-8b": {"status": "UPSCALING", "target_num_replicas": 3,
                        "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}]},
    "Ingress": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
}}}}


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
            "applicationStatuses": {"herd": {"status": "RUNNING", "serveDeploymentStatuses": {
                "model-llama2-70b": {"status": "HEALTHY"},
                "model-llama3-8b": {"status": "UPSCALING", "message": "Upscaling from 2 to 3 replicas."},
                "Ingress": {"status": "HEALTHY"}}}}},
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
async def test_status_prints_conditions_models_and_worker_groups(kmock, kubeconfig_for, config_file):
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    code, _, err = await asyncio.to_thread(run_cli, ["k8s", "apply", "-f", str(config_file), "--kubeconfig", str(kc),
                                                     *RENDER_ARGS])
    assert code == 0, err
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
    assert "serve application herd: RUNNING" in text
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith(("llama", "-"))}
    assert rows["llama2-70b"][1:4] == ["model-llama2-70b", "HEALTHY", "1/1"]
    assert rows["llama3-8b"][1:4] == ["model-llama3-8b", "UPSCALING", "2/3"]
    assert "Upscaling from 2 to 3 replicas." in text
    assert rows["-"][1:4] == ["Ingress", "HEALTHY", "1/1"]
    group = next(ln for ln in lines if ln.startswith("gpu "))
    assert group.split() == ["gpu", "3", "2", "4", "2"]       # desired, min, max, running pods


@pytest.mark.asyncio
async def test_status_without_dashboard_shows_configured_replicas(kmock, kubeconfig_for, config_file):
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    code, _, err = await asyncio.to_thread(run_cli, ["k8s", "apply", "-f", str(config_file), "--kubeconfig", str(kc),
                                                     *RENDER_ARGS])
    assert code == 0, err
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
async def test_delete(kmock, kubeconfig_for, config_file):
    declare_kuberay(kmock)
    kc = kubeconfig_for(kmock)
    code, _, err = await asyncio.to_thread(run_cli, ["k8s", "apply", "-f", str(config_file), "--kubeconfig", str(kc),
                                                     *RENDER_ARGS])
    assert code == 0, err
    # A Service of the same name that herd did not create stays.
    kmock.objects["v1/services", "llm", "herd-http"].patch({"metadata": {"labels": {"app.kubernetes.io/managed-by": "Helm"}}})

    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "delete", "--kubeconfig", str(kc)])
    assert code == 0, err
    assert out.splitlines() == ["rayservice/herd deleted (namespace llm)", "service/herd-grpc deleted (namespace llm)"]
    deletes = [str(r.url.path) for r in list(kmock) if r.method == "DELETE"]
    assert deletes == ["/apis/ray.io/v1/namespaces/llm/rayservices/herd", "/api/v1/namespaces/llm/services/herd-grpc"]

    code, out, err = await asyncio.to_thread(run_cli, ["k8s", "delete", "--kubeconfig", str(kc)])
    assert code == 1 and err.strip() == "herd k8s: RayService llm/herd not found"
    code, _, err = await asyncio.to_thread(run_cli, ["k8s", "delete", "--ignore-not-found", "--kubeconfig", str(kc)])
    assert code == 0, err
    code, _, err = await asyncio.to_thread(run_cli, ["k8s", "status", "--kubeconfig", str(kc)])
    assert code == 1 and "not found" in err


# ==== clear errors ==========================================================================================
@pytest.mark.asyncio
async def test_crd_missing(kmock, kubeconfig_for, config_file):
    kc = kubeconfig_for(kmock)      # an API server without KubeRay: ray.io/v1 is not served
    kmock["post", kmock_lib.resource(RS)] << kmock_lib.KubernetesResourceNotFoundError
    kmock["get /apis/ray.io/v1"] << kmock_lib.KubernetesResourceNotFoundError
    for argv in (["k8s", "status"], ["k8s", "delete"], ["k8s", "apply", "-f", str(config_file), *RENDER_ARGS]):
        code, out, err = await asyncio.to_thread(run_cli, [*argv, "--kubeconfig", str(kc)])
        assert code == 2, (argv, out, err)
        assert "the RayService custom resource (rayservices.ray.io/v1) is not installed" in err
        assert "KubeRay operator" in err and "Traceback" not in err


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


def test_api_unreachable(tmp_path, config_file):
    with socket.socket() as s:                  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    for argv in (["k8s", "status"], ["k8s", "delete"], ["k8s", "apply", "-f", str(config_file), *RENDER_ARGS]):
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
