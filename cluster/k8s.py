"""`herd k8s render | apply | status | delete`: a KubeRay RayService for a herd cluster config, without Helm.

    herd k8s render -f cluster.yaml --image ghcr.io/acme/herd:0.1.0 --gpus-per-worker 4 --workers 2 > rs.yaml
    herd k8s apply  -f cluster.yaml ...      # or -f rs.yaml (a rendered / `helm template` manifest)
    herd k8s status herd -n llm
    herd k8s delete herd -n llm

`render` builds the same RayService the Helm chart (helm/herd) renders for one worker group: the Serve
application `cluster.app:build_app` with the config as its `args` (host 0.0.0.0 so the Services reach the
proxies), a head that takes no replicas (`num-cpus: "0"`), GPU workers with /dev/shm, `ray stop` on preStop,
and the gRPC / HTTP Services in front of the Serve proxies. It refuses a config whose models need more GPUs
than the workers provide, and inline API keys (they would be readable in the custom object: use a Secret).

`apply` creates the objects, or patches them when they exist (409), so it can be run again. `status` prints
the RayService's conditions, the Serve application and each model deployment (with live replica counts from
the Ray dashboard through the API server's service proxy when it answers) and the worker groups. The
kubeconfig is found as kubectl finds it (--kubeconfig, $KUBECONFIG, ~/.kube/config, else in-cluster), as are
--context and the namespace (-n, else the context's). Failures print one line and exit 2 (1 when the
RayService does not exist).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import yaml

GROUP, VERSION = "ray.io", "v1"
RAYSERVICES, RAYCLUSTERS = "rayservices", "rayclusters"
APP_NAME = "herd"                       # cluster.app.APP_NAME
IMPORT_PATH = "cluster.app:build_app"
GRPC_SERVICER_FUNCTIONS = [             # cluster.app.GRPC_SERVICER_FUNCTIONS
    "cluster.pb.inference_pb2_grpc.add_InferenceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
DEFAULT_RAY_VERSION = "2.60.0"
METRICS_PORT = 8080
DASHBOARD_PORT = 8265
MANAGED_BY = "herd"
TIMEOUT = (5, 30)                       # (connect, read) seconds for every API call
KUBERAY_HINT = ("install the KubeRay operator first: helm repo add kuberay https://ray-project.github.io/kuberay-helm/ "
                "&& helm install kuberay-operator kuberay/kuberay-operator")


class K8sError(Exception):
    """A failure to report in one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ==== render ================================================================================================
@dataclass
class RenderOptions:
    name: str = "herd"
    namespace: str | None = None
    image: str = "herd:0.1.0"
    ray_version: str = DEFAULT_RAY_VERSION
    gpus_per_worker: int = 1
    workers: int = 1
    min_workers: int | None = None
    max_workers: int | None = None
    autoscale: bool = False
    worker_cpu: str = "8"
    worker_memory: str = "48Gi"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    shm_size: str = "16Gi"
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    models_pvc: str | None = None
    models_host_path: str | None = None
    models_mount: str = "/models"
    api_keys_secret: str | None = None
    api_keys_key: str = "api-keys"
    upgrade_strategy: str = "NewCluster"
    services: bool = True

    def __post_init__(self) -> None:
        if self.min_workers is None:
            self.min_workers = self.workers if not self.autoscale else min(1, self.workers)
        if self.max_workers is None:
            self.max_workers = self.workers
        if self.gpus_per_worker < 0 or self.workers < 0:
            raise K8sError("--gpus-per-worker and --workers must be >= 0")
        if not self.min_workers <= self.workers <= self.max_workers:
            raise K8sError(f"worker counts: need --min-workers ({self.min_workers}) <= --workers ({self.workers}) "
                           f"<= --max-workers ({self.max_workers})")
        if self.models_pvc and self.models_host_path:
            raise K8sError("give --models-pvc or --models-host-path, not both")

    @property
    def worker_pods_at_most(self) -> int:
        return self.max_workers if self.autoscale else self.workers


def load_config_dict(path: str | Path) -> dict[str, Any]:
    """The config as written (validated by ClusterConfig). Rendering uses what the user wrote, not the parsed
    model, so no default of this machine's (resources_per_shard: GPU if CUDA is here) leaks into it; cluster_args
    fills that one in from the worker shape."""
    from cluster.config import ClusterConfig, ConfigError, read_yaml

    try:
        data = read_yaml(path)
        ClusterConfig.from_dict(data)
    except ConfigError as e:
        msg = str(e)
        raise K8sError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return data


def check_gpu_fit(models: Iterable[dict[str, Any]], opts: RenderOptions) -> None:
    """The chart's check: every model at its largest (TP x PP x GPU per shard x replicas, max_replicas when
    autoscaled) must fit the GPUs the workers provide at theirs."""
    provided = opts.gpus_per_worker * opts.worker_pods_at_most
    needed, asks = 0.0, []
    for i, m in enumerate(models):
        tp, pp = int(m.get("tensor_parallel_size", 1)), int(m.get("pipeline_parallel_size", 1))
        shard = m.get("resources_per_shard") or ({"GPU": 1} if opts.gpus_per_worker else {"CPU": 1})
        per_replica = tp * pp * float(shard.get("GPU", 0))
        if per_replica <= 0:
            continue
        auto = m.get("autoscaling_config")
        replicas = int(auto.get("max_replicas", 1)) if auto else int(m.get("num_replicas") or 1)
        if m.get("placement_strategy") == "STRICT_PACK" and per_replica > opts.gpus_per_worker:
            raise K8sError(f"models[{i}] ({m['name']}): placement_strategy STRICT_PACK puts all TP x PP = {tp} x {pp} "
                           f"shards ({per_replica:g} GPUs) on one node, but a worker has {opts.gpus_per_worker} GPUs")
        needed += per_replica * replicas
        asks.append(f"{m['name']}: TP x PP = {tp} x {pp} x {float(shard['GPU']):g} GPU x {replicas} replica(s)")
    if needed > provided:
        raise K8sError(f"models need {needed:g} GPUs at their largest size ({'; '.join(asks)}), but the workers "
                       f"provide {provided} ({opts.worker_pods_at_most} pod(s) x {opts.gpus_per_worker} GPU); raise "
                       f"--gpus-per-worker / --workers (--max-workers with --autoscale)")


def _labels(opts: RenderOptions, component: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "herd", "app.kubernetes.io/instance": opts.name,
              "app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/part-of": "herd"}
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


def _pod_labels(opts: RenderOptions) -> dict[str, str]:
    # KubeRay sets app.kubernetes.io/name=kuberay on its pods, so Services select by a label of herd's own.
    return {"herd.dev/instance": opts.name, "app.kubernetes.io/instance": opts.name, "app.kubernetes.io/part-of": "herd"}


def cluster_args(data: dict[str, Any], opts: RenderOptions) -> dict[str, Any]:
    """The Serve application's args: the user's config, bound to every interface, paths and keys mounted."""
    if data.get("api_keys"):
        raise K8sError("the config has inline api_keys, which would be readable by anyone who can read the "
                       "RayService; put them in a Secret (one key per line) and pass --api-keys-secret NAME")
    args = json.loads(json.dumps(data))         # a deep copy of plain data
    args["host"] = "0.0.0.0"
    if opts.api_keys_secret:
        args["api_keys_file"] = f"/etc/herd/api-keys/{opts.api_keys_key}"
    for m in args["models"]:
        if opts.models_pvc or opts.models_host_path:
            if not str(m["path"]).startswith("/"):
                m["path"] = str(PurePosixPath(opts.models_mount) / m["path"])
        # Always explicit: ClusterConfig's own default depends on the host that parses it (the head, no GPU).
        m.setdefault("resources_per_shard", {"GPU": 1} if opts.gpus_per_worker else {"CPU": 1})
    return args


def serve_config(args: dict[str, Any]) -> dict[str, Any]:
    http = {"host": "0.0.0.0", "port": int(args.get("http_port", 8000))}
    grpc = {"port": int(args.get("grpc_port", 9000)), "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS)}
    if args.get("request_timeout_s"):
        http["request_timeout_s"] = grpc["request_timeout_s"] = args["request_timeout_s"]
    if args.get("tls"):
        http["ssl_certfile"], http["ssl_keyfile"] = args["tls"]["cert_file"], args["tls"]["key_file"]
    return {"proxy_location": "EveryNode", "http_options": http, "grpc_options": grpc,
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}]}


def _serve_ports(args: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "serve", "containerPort": int(args.get("http_port", 8000)), "protocol": "TCP"},
            {"name": "grpc", "containerPort": int(args.get("grpc_port", 9000)), "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]


def _pod_template(opts: RenderOptions, container: dict[str, Any], volumes: list[dict[str, Any]],
                  worker: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if worker and opts.node_selector:
        spec["nodeSelector"] = dict(opts.node_selector)
    if worker and opts.gpus_per_worker:
        spec["tolerations"] = [{"key": opts.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": _pod_labels(opts)}, "spec": spec}


def rayservice_manifest(data: dict[str, Any], opts: RenderOptions) -> dict[str, Any]:
    """The RayService for a herd config (`data`, as loaded by load_config_dict)."""
    check_gpu_fit(data["models"], opts)
    args = cluster_args(data, opts)
    pre_stop = {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}
    secret_mounts, secret_volumes = [], []
    if opts.api_keys_secret:
        secret_mounts.append({"name": "api-keys", "mountPath": "/etc/herd/api-keys", "readOnly": True})
        secret_volumes.append({"name": "api-keys", "secret": {"secretName": opts.api_keys_secret, "defaultMode": 0o440}})

    head = {
        "name": "ray-head", "image": opts.image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "gcs-server", "containerPort": 6379, "protocol": "TCP"},
                  {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
                  {"name": "client", "containerPort": 10001, "protocol": "TCP"}] + _serve_ports(args),
        "resources": {"requests": {"cpu": opts.head_cpu, "memory": opts.head_memory},
                      "limits": {"cpu": opts.head_cpu, "memory": opts.head_memory}},
        "lifecycle": pre_stop,
        "volumeMounts": [{"name": "shared-mem", "mountPath": "/dev/shm"}] + secret_mounts,
    }
    head_volumes = [{"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}] + secret_volumes

    resources: dict[str, dict[str, str]] = {"requests": {"cpu": opts.worker_cpu, "memory": opts.worker_memory},
                                            "limits": {"cpu": opts.worker_cpu, "memory": opts.worker_memory}}
    if opts.gpus_per_worker:
        for kind in ("requests", "limits"):          # GPUs: requests = limits
            resources[kind][opts.gpu_resource] = str(opts.gpus_per_worker)
    model_mounts, model_volumes = [], []
    if opts.models_pvc:
        model_mounts = [{"name": "models", "mountPath": opts.models_mount, "readOnly": True}]
        model_volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": opts.models_pvc, "readOnly": True}}]
    elif opts.models_host_path:
        model_mounts = [{"name": "models", "mountPath": opts.models_mount, "readOnly": True}]
        model_volumes = [{"name": "models", "hostPath": {"path": opts.models_host_path, "type": "Directory"}}]
    worker = {
        "name": "ray-worker", "image": opts.image, "imagePullPolicy": "IfNotPresent",
        "ports": _serve_ports(args), "resources": resources, "lifecycle": pre_stop,
        "volumeMounts": [{"name": "shared-mem", "mountPath": "/dev/shm"}] + model_mounts + secret_mounts,
    }
    worker_volumes = ([{"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}]
                      + model_volumes + secret_volumes)
    group = "gpu" if opts.gpus_per_worker else "cpu"

    cluster: dict[str, Any] = {
        "rayVersion": opts.ray_version,
        "enableInTreeAutoscaling": opts.autoscale,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            # num-cpus "0": no model replica or ingress lands on the head.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod_template(opts, head, head_volumes, worker=False),
        },
        "workerGroupSpecs": [{
            "groupName": group, "replicas": opts.workers, "minReplicas": opts.min_workers,
            "maxReplicas": opts.max_workers, "rayStartParams": {},
            "template": _pod_template(opts, worker, worker_volumes, worker=True),
        }],
    }
    if opts.autoscale:
        cluster["autoscalerOptions"] = {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": 120}
    metadata: dict[str, Any] = {"name": opts.name, "labels": _labels(opts)}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RayService", "metadata": metadata,
        "spec": {"upgradeStrategy": {"type": opts.upgrade_strategy},
                 "serveConfigV2": yaml.safe_dump(serve_config(args), sort_keys=False),
                 "rayClusterConfig": cluster},
    }


def services_manifests(data: dict[str, Any], opts: RenderOptions) -> list[dict[str, Any]]:
    """gRPC and HTTP Services in front of every pod whose Serve proxy is healthy (KubeRay's ray.io/serve label)."""
    selector = {"herd.dev/instance": opts.name, "ray.io/serve": "true"}
    out = []
    for kind, port, target, proto in (("grpc", int(data.get("grpc_port", 9000)), "grpc", "grpc"),
                                      ("http", int(data.get("http_port", 8000)), "serve", "http")):
        metadata: dict[str, Any] = {"name": f"{opts.name}-{kind}", "labels": _labels(opts, kind)}
        if opts.namespace:
            metadata["namespace"] = opts.namespace
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": metadata,
                    "spec": {"type": "ClusterIP", "selector": selector,
                             "ports": [{"name": kind, "port": port, "targetPort": target, "protocol": "TCP",
                                        "appProtocol": proto}]}})
    return out


def render(data: dict[str, Any], opts: RenderOptions) -> list[dict[str, Any]]:
    docs = [rayservice_manifest(data, opts)]
    if opts.services:
        docs += services_manifests(data, opts)
    return docs


# ==== the Kubernetes API ====================================================================================
@dataclass
class Kube:
    api: Any                 # kubernetes.client.ApiClient
    namespace: str
    host: str

    @property
    def custom(self):
        from kubernetes import client
        return client.CustomObjectsApi(self.api)

    @property
    def core(self):
        from kubernetes import client
        return client.CoreV1Api(self.api)


def connect(kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None) -> Kube:
    """An API client configured as kubectl would be, and the namespace to use."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    conf = client.Configuration()
    default_file = Path(os.path.expanduser("~/.kube/config"))
    try:
        if kubeconfig or os.environ.get("KUBECONFIG") or default_file.exists() or context:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=conf,
                                    persist_config=False)
            if not namespace:
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                chosen = next((c for c in contexts if c["name"] == context), active) if context else active
                namespace = ((chosen or {}).get("context") or {}).get("namespace")
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=conf)
            if not namespace:
                ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                namespace = ns_file.read_text().strip() if ns_file.exists() else None
        else:
            raise K8sError("no Kubernetes configuration: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config")
    except ConfigException as e:
        raise K8sError(f"cannot load the Kubernetes configuration: {e}") from None
    except OSError as e:
        raise K8sError(f"cannot read the Kubernetes configuration: {e}") from None
    conf.retries = 1
    return Kube(client.ApiClient(conf), namespace or "default", conf.host)


def _message(e) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


def call(kube: Kube, what: str, fn, *args, **kwargs):
    """One API call; transport failures and refusals become K8sError (ApiException 404/409 pass through)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        return fn(*args, _request_timeout=TIMEOUT, **kwargs)
    except ApiException as e:
        if e.status in (404, 409):
            raise
        if e.status == 401:
            raise K8sError(f"the Kubernetes API at {kube.host} rejected the credentials (401 Unauthorized)") from None
        if e.status == 403:
            raise K8sError(f"not allowed to {what}: {_message(e)}") from None
        raise K8sError(f"{what} failed: {e.status} {_message(e)}") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise K8sError(f"cannot reach the Kubernetes API at {kube.host}: {reason}") from None


def crd_installed(kube: Kube) -> bool:
    """Whether the API serves ray.io/v1 rayservices (API discovery, as kubectl api-resources does)."""
    from kubernetes.client.exceptions import ApiException

    try:
        resp = call(kube, "discover ray.io/v1", kube.custom.get_api_resources, GROUP, VERSION, _preload_content=False)
        listing = json.loads(resp.data)
    except (ApiException, ValueError):
        return False
    return any(r.get("name") == RAYSERVICES for r in listing.get("resources") or [])


def _crd_missing_error(kube: Kube) -> K8sError:
    return K8sError(f"the RayService custom resource ({RAYSERVICES}.{GROUP}/{VERSION}) is not installed in the "
                    f"cluster at {kube.host}; {KUBERAY_HINT}")


def apply_objects(kube: Kube, docs: list[dict[str, Any]], out=None) -> None:
    """Create each object, or patch it when it exists (so apply can be repeated)."""
    out = out or sys.stdout
    from kubernetes.client.exceptions import ApiException

    for doc in docs:
        ns = doc.get("metadata", {}).get("namespace") or kube.namespace
        doc.setdefault("metadata", {})["namespace"] = ns
        name, kind = doc["metadata"]["name"], doc["kind"]
        if kind == "RayService":
            create = lambda: call(kube, f"create RayService {ns}/{name}", kube.custom.create_namespaced_custom_object,
                                  GROUP, VERSION, ns, RAYSERVICES, doc)
            patch = lambda: call(kube, f"patch RayService {ns}/{name}", kube.custom.patch_namespaced_custom_object,
                                 GROUP, VERSION, ns, RAYSERVICES, name, doc)
        elif kind == "Service" and doc.get("apiVersion") == "v1":
            create = lambda: call(kube, f"create Service {ns}/{name}", kube.core.create_namespaced_service, ns, doc)
            patch = lambda: call(kube, f"patch Service {ns}/{name}", kube.core.patch_namespaced_service, name, ns, doc)
        else:
            raise K8sError(f"herd k8s apply handles RayService and Service objects, not {kind} {name} "
                           f"(use kubectl apply or helm for the rest)")
        try:
            create()
            verb = "created"
        except ApiException as e:
            if e.status == 409:
                patch()
                verb = "configured"
            elif e.status == 404 and kind == "RayService" and not crd_installed(kube):
                raise _crd_missing_error(kube) from None
            elif e.status == 404:
                raise K8sError(f"create {kind} {ns}/{name}: {_message(e)} (does namespace {ns} exist?)") from None
            else:
                raise K8sError(f"create {kind} {ns}/{name} failed: {e.status} {_message(e)}") from None
        print(f"{kind.lower()}/{name} {verb} (namespace {ns})", file=out)


def get_rayservice(kube: Kube, name: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    try:
        return call(kube, f"get RayService {kube.namespace}/{name}", kube.custom.get_namespaced_custom_object,
                    GROUP, VERSION, kube.namespace, RAYSERVICES, name)
    except ApiException as e:
        if e.status == 404 and not crd_installed(kube):
            raise _crd_missing_error(kube) from None
        if e.status == 404:
            raise K8sError(f"RayService {kube.namespace}/{name} not found", code=1) from None
        raise


def delete_objects(kube: Kube, name: str, ignore_not_found: bool = False, out=None) -> int:
    out = out or sys.stdout
    from kubernetes.client.exceptions import ApiException

    ns = kube.namespace
    try:
        call(kube, f"delete RayService {ns}/{name}", kube.custom.delete_namespaced_custom_object,
             GROUP, VERSION, ns, RAYSERVICES, name)
        print(f"rayservice/{name} deleted (namespace {ns})", file=out)
        status = 0
    except ApiException as e:
        if e.status != 404:
            raise
        if not crd_installed(kube):
            raise _crd_missing_error(kube) from None
        if not ignore_not_found:
            raise K8sError(f"RayService {ns}/{name} not found", code=1) from None
        status = 0
    for suffix in ("grpc", "http"):           # the Services `herd k8s apply` created beside it
        svc = f"{name}-{suffix}"
        try:
            found = call(kube, f"get Service {ns}/{svc}", kube.core.read_namespaced_service, svc, ns)
        except ApiException:
            continue
        if (found.metadata.labels or {}).get("app.kubernetes.io/managed-by") != MANAGED_BY:
            continue                           # not ours (e.g. the Helm chart's): leave it
        try:
            call(kube, f"delete Service {ns}/{svc}", kube.core.delete_namespaced_service, svc, ns)
            print(f"service/{svc} deleted (namespace {ns})", file=out)
        except ApiException:
            pass
    return status


# ==== status ================================================================================================
def _serve_details(kube: Kube, name: str) -> dict[str, Any] | None:
    """Live Serve state from the Ray dashboard (/api/serve/applications/) through the API server's service proxy;
    None when it does not answer (no access to services/proxy, dashboard auth, cluster not up)."""
    from kubernetes.client.exceptions import ApiException

    try:
        resp = call(kube, "read the Ray dashboard", kube.core.connect_get_namespaced_service_proxy_with_path,
                    f"{name}-head-svc:{DASHBOARD_PORT}", kube.namespace, "api/serve/applications/",
                    _preload_content=False)
        return json.loads(resp.data)
    except (ApiException, K8sError, ValueError):
        return None


def _configured_replicas(model: dict[str, Any]) -> str:
    auto = model.get("autoscaling_config")
    if auto:
        return f"{auto.get('min_replicas', 1)}..{auto.get('max_replicas', 1)}"
    return str(model.get("num_replicas") or 1)


def _table(rows: list[list[str]], out) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def collect_status(kube: Kube, name: str) -> dict[str, Any]:
    """Everything `herd k8s status` prints, as data."""
    from kubernetes.client.exceptions import ApiException

    rs = get_rayservice(kube, name)
    spec, st = rs.get("spec", {}), rs.get("status", {}) or {}
    try:
        serve_cfg = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
    except yaml.YAMLError:
        serve_cfg = {}
    apps_cfg = {a.get("name"): a for a in serve_cfg.get("applications", [])}
    models_cfg = {f"model-{m['name']}": m for a in apps_cfg.values() for m in (a.get("args") or {}).get("models", [])}

    active = st.get("activeServiceStatus") or {}
    pending = st.get("pendingServiceStatus") or {}
    details = _serve_details(kube, name) if active.get("rayClusterName") else None
    live_apps = (details or {}).get("applications") or {}

    deployments = []
    apps = []
    for app_name, app in (active.get("applicationStatuses") or {}).items():
        apps.append({"name": app_name, "status": app.get("status", ""), "message": app.get("message", "")})
        for dep, dst in (app.get("serveDeploymentStatuses") or {}).items():
            live = ((live_apps.get(app_name) or {}).get("deployments") or {}).get(dep)
            if live is not None:
                running = sum(1 for r in live.get("replicas", []) if r.get("state") == "RUNNING")
                replicas = f"{running}/{live.get('target_num_replicas', running)}"
            elif dep in models_cfg:
                replicas = f"{_configured_replicas(models_cfg[dep])} (configured)"
            else:
                replicas = "-"
            deployments.append({"model": dep[len("model-"):] if dep in models_cfg else "", "deployment": dep,
                                "status": dst.get("status", ""), "replicas": replicas,
                                "message": (dst.get("message") or "").splitlines()[0] if dst.get("message") else ""})
    if not deployments:                        # nothing reported yet: list what is configured
        for dep, m in models_cfg.items():
            deployments.append({"model": m["name"], "deployment": dep, "status": "-",
                                "replicas": f"{_configured_replicas(m)} (configured)", "message": ""})

    groups = []
    cluster_name = active.get("rayClusterName")
    group_specs = (spec.get("rayClusterConfig") or {}).get("workerGroupSpecs") or []
    if cluster_name:
        try:
            rc = call(kube, f"get RayCluster {cluster_name}", kube.custom.get_namespaced_custom_object,
                      GROUP, VERSION, kube.namespace, RAYCLUSTERS, cluster_name)
            group_specs = (rc.get("spec") or {}).get("workerGroupSpecs") or group_specs
        except (ApiException, K8sError):
            pass
    running: dict[str, int] | None = None
    if cluster_name:
        try:
            pods = call(kube, "list pods", kube.core.list_namespaced_pod, kube.namespace,
                        label_selector=f"ray.io/cluster={cluster_name},ray.io/node-type=worker")
            running = {}
            for pod in pods.items:
                grp = (pod.metadata.labels or {}).get("ray.io/group", "")
                if pod.status and pod.status.phase == "Running":
                    running[grp] = running.get(grp, 0) + 1
        except (ApiException, K8sError):
            running = None
    for g in group_specs:
        groups.append({"group": g.get("groupName", ""), "desired": g.get("replicas", 0),
                       "min": g.get("minReplicas", 0), "max": g.get("maxReplicas", 0),
                       "running": "-" if running is None else running.get(g.get("groupName", ""), 0)})

    return {
        "name": name, "namespace": kube.namespace,
        "service_status": st.get("serviceStatus", ""),
        "endpoints": st.get("numServeEndpoints"),
        "conditions": [{k: c.get(k, "") for k in ("type", "status", "reason", "message")}
                       for c in st.get("conditions") or []],
        "active_cluster": cluster_name or "",
        "active_cluster_state": (active.get("rayClusterStatus") or {}).get("state", ""),
        "pending_cluster": pending.get("rayClusterName", ""),
        "applications": apps, "deployments": deployments, "worker_groups": groups,
    }


def print_status(s: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    state = s["service_status"] or ("Ready" if any(c["type"] == "Ready" and c["status"] == "True"
                                                   for c in s["conditions"]) else "NotReady")
    print(f"RayService {s['namespace']}/{s['name']}: {state}"
          + (f", {s['endpoints']} serve endpoint(s)" if s["endpoints"] is not None else ""), file=out)
    if s["active_cluster"]:
        print(f"active cluster: {s['active_cluster']}"
              + (f" ({s['active_cluster_state']})" if s["active_cluster_state"] else ""), file=out)
    if s["pending_cluster"]:
        print(f"pending cluster: {s['pending_cluster']} (upgrade in progress)", file=out)
    if s["conditions"]:
        print("\nCONDITIONS", file=out)
        _table([["TYPE", "STATUS", "REASON", "MESSAGE"]]
               + [[c["type"], c["status"], c["reason"], c["message"]] for c in s["conditions"]], out)
    for app in s["applications"]:
        print(f"\nserve application {app['name']}: {app['status']}"
              + (f" ({app['message']})" if app["message"] else ""), file=out)
    if s["deployments"]:
        print("\nMODELS", file=out)
        _table([["MODEL", "DEPLOYMENT", "STATUS", "REPLICAS", "MESSAGE"]]
               + [[d["model"] or "-", d["deployment"], d["status"], d["replicas"], d["message"]]
                  for d in s["deployments"]], out)
    if s["worker_groups"]:
        print("\nWORKER GROUPS", file=out)
        _table([["GROUP", "DESIRED", "MIN", "MAX", "RUNNING"]]
               + [[g["group"], g["desired"], g["min"], g["max"], g["running"]] for g in s["worker_groups"]], out)


# ==== CLI ===================================================================================================
def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    p.add_argument("-n", "--namespace", default=None, help="namespace (default: the context's, else default)")


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


def _add_render_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rendering a herd config")
    g.add_argument("--name", default="herd", help="RayService name (default herd)")
    g.add_argument("--image", default="herd:0.1.0", help="herd image (see the Dockerfile)")
    g.add_argument("--ray-version", default=DEFAULT_RAY_VERSION)
    g.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs of each worker pod (0 = CPU workers)")
    g.add_argument("--workers", type=int, default=1, help="worker pods at start")
    g.add_argument("--min-workers", type=int, default=None)
    g.add_argument("--max-workers", type=int, default=None)
    g.add_argument("--autoscale", action="store_true", help="Ray autoscaler between --min-workers and --max-workers")
    g.add_argument("--worker-cpu", default="8")
    g.add_argument("--worker-memory", default="48Gi")
    g.add_argument("--head-cpu", default="2")
    g.add_argument("--head-memory", default="8Gi")
    g.add_argument("--shm-size", default="16Gi", help="/dev/shm of each worker")
    g.add_argument("--gpu-resource", default="nvidia.com/gpu")
    g.add_argument("--node-selector", type=_key_value, action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--models-pvc", default=None, help="existing ReadOnlyMany PVC with the models, mounted at --models-mount")
    g.add_argument("--models-host-path", default=None, help="node folder with the models, mounted at --models-mount")
    g.add_argument("--models-mount", default="/models", help="where relative model paths resolve (default /models)")
    g.add_argument("--api-keys-secret", default=None, help="existing Secret with one API key per line")
    g.add_argument("--api-keys-key", default="api-keys", help="key of the API keys in that Secret")
    g.add_argument("--upgrade-strategy", choices=["NewCluster", "Incremental", "None"], default="NewCluster")
    g.add_argument("--no-services", dest="services", action="store_false",
                   help="leave out the gRPC / HTTP Services")


def _render_options(args: argparse.Namespace, namespace: str | None) -> RenderOptions:
    return RenderOptions(
        name=args.name, namespace=namespace, image=args.image, ray_version=args.ray_version,
        gpus_per_worker=args.gpus_per_worker, workers=args.workers, min_workers=args.min_workers,
        max_workers=args.max_workers, autoscale=args.autoscale, worker_cpu=args.worker_cpu,
        worker_memory=args.worker_memory, head_cpu=args.head_cpu, head_memory=args.head_memory,
        shm_size=args.shm_size, gpu_resource=args.gpu_resource, node_selector=dict(args.node_selector),
        models_pvc=args.models_pvc, models_host_path=args.models_host_path, models_mount=args.models_mount,
        api_keys_secret=args.api_keys_secret, api_keys_key=args.api_keys_key,
        upgrade_strategy=args.upgrade_strategy, services=args.services)


def _docs_from_file(path: str, args: argparse.Namespace, namespace: str | None) -> list[dict[str, Any]]:
    """A herd config (rendered here) or a manifest with `kind:` objects (applied as is)."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except OSError as e:
        raise K8sError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise K8sError(f"{path}: invalid YAML ({e})") from None
    if docs and all(isinstance(d, dict) and "kind" in d for d in docs):
        return docs
    return render(load_config_dict(path), _render_options(args, namespace))


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as `|` blocks, so the manifest reads like the chart's."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def dump_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


def _fail(e: K8sError) -> int:
    print(f"herd k8s: {e}", file=sys.stderr)
    return e.code


def cmd_render(args: argparse.Namespace) -> int:
    try:
        docs = render(load_config_dict(args.file), _render_options(args, args.namespace))
    except K8sError as e:
        return _fail(e)
    text = dump_yaml(docs)
    if args.output and args.output != "-":
        Path(args.output).write_text(text)
        print(f"wrote {len(docs)} object(s) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        kube = connect(args.kubeconfig, args.context, args.namespace)
        docs = _docs_from_file(args.file, args, kube.namespace)
        apply_objects(kube, docs)
    except K8sError as e:
        return _fail(e)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        kube = connect(args.kubeconfig, args.context, args.namespace)
        s = collect_status(kube, args.name)
    except K8sError as e:
        return _fail(e)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print_status(s)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    try:
        kube = connect(args.kubeconfig, args.context, args.namespace)
        return delete_objects(kube, args.name, ignore_not_found=args.ignore_not_found)
    except K8sError as e:
        return _fail(e)


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add `k8s` (render | apply | status | delete) to the `herd` command's subparsers."""
    k8s = subparsers.add_parser("k8s", help="run herd on Kubernetes (KubeRay RayService) without Helm",
                                description=__doc__.split("\n\n")[0])
    sub = k8s.add_subparsers(dest="k8s_command", required=True)

    p = sub.add_parser("render", help="print the RayService (and Services) for a herd config")
    p.add_argument("-f", "--file", required=True, help="herd cluster config YAML (as for `herd serve`)")
    p.add_argument("-n", "--namespace", default=None, help="namespace written into the objects (default: none)")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    _add_render_args(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("apply", help="create the RayService (and Services), or patch them if they exist")
    p.add_argument("-f", "--file", required=True, help="herd cluster config YAML, or a manifest (e.g. from render)")
    _add_cluster_args(p)
    _add_render_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("status", help="RayService conditions, Serve application, models and worker groups")
    p.add_argument("name", nargs="?", default="herd", help="RayService name (default herd)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("delete", help="delete the RayService (and the Services apply created)")
    p.add_argument("name", nargs="?", default="herd", help="RayService name (default herd)")
    p.add_argument("--ignore-not-found", action="store_true", help="exit 0 when it does not exist")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_delete)
    return k8s
