"""`herd k8s render | apply | status | delete`: herd's Helm chart on a Kubernetes cluster, without `helm install`.

    herd k8s render -f helm/examples/llama3-small-autoscaled.yaml --set image.repository=ghcr.io/acme/herd > rs.yaml
    herd k8s apply  -f helm/examples/llama3-small-autoscaled.yaml -n llm     # or -f rs.yaml (a rendered manifest)
    herd k8s status herd -n llm
    herd k8s delete herd -n llm

There is one renderer, the chart: `render` prints what `helm template` prints for the same values (cluster/helm.py
runs it), so every check the chart makes (GPU fit, secure defaults, ClusterConfig's rules) holds here too. This
module keeps what a Kubernetes client library is for:

`apply` sends every object with server-side apply (field manager "herd", forced), so it can be run again after
editing the values; it records the objects it applied in an annotation of the RayService, so that the next
`apply` prunes those the values no longer render and `delete` removes them with it (objects the chart marks
create-only, its generated API key, are created once and then left alone). `status` prints the RayService's
conditions, the Serve application and each model deployment (with live replica counts from the Ray dashboard
through the API server's service proxy when it answers) and the worker groups. The kubeconfig is found as
kubectl finds it (--kubeconfig, $KUBECONFIG, ~/.kube/config, else in-cluster), as are --context and the
namespace (-n, else the context's). Failures print one line and exit 2 (1 when the RayService does not exist).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.helm import HelmError, helm_template

GROUP, VERSION = "ray.io", "v1"
RAYSERVICES, RAYCLUSTERS = "rayservices", "rayclusters"
DASHBOARD_PORT = 8265
FIELD_MANAGER = "herd"
INVENTORY_ANNOTATION = "herd.dev/applied-objects"   # JSON [[apiVersion, kind, name], ...] beside the RayService
# An object the chart marks so is created when missing and otherwise left as it is: the chart's generated API
# key, which `helm install` keeps with `lookup` but a render without a cluster would make anew every time.
APPLY_ANNOTATION, CREATE_ONLY = "herd.dev/apply", "create-only"
TIMEOUT = (5, 30)                       # (connect, read) seconds for every API call
KUBERAY_HINT = ("install the KubeRay operator first: helm repo add kuberay https://ray-project.github.io/kuberay-helm/ "
                "&& helm install kuberay-operator kuberay/kuberay-operator")


class K8sError(Exception):
    """A failure to report in one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


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


def _api_base(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def _raw(kube: Kube, what: str, method: str, path: str, **kwargs) -> Any:
    """A request on an API path the typed clients do not cover (discovery, objects of any kind)."""
    return call(kube, what, kube.api.call_api, path, method, response_type="object", auth_settings=["BearerToken"],
                _return_http_data_only=True, **kwargs)


def served_resources(kube: Kube, api_version: str) -> list[dict[str, Any]]:
    """API discovery of one group version, as `kubectl api-resources` does it; [] when it is not served."""
    from kubernetes.client.exceptions import ApiException

    try:
        listing = _raw(kube, f"discover {api_version}", "GET", _api_base(api_version))
    except ApiException:
        return []
    return (listing or {}).get("resources") or []


def crd_installed(kube: Kube) -> bool:
    """Whether the API serves ray.io/v1 rayservices."""
    return any(r.get("name") == RAYSERVICES for r in served_resources(kube, f"{GROUP}/{VERSION}"))


def _crd_missing_error(kube: Kube) -> K8sError:
    return K8sError(f"the RayService custom resource ({RAYSERVICES}.{GROUP}/{VERSION}) is not installed in the "
                    f"cluster at {kube.host}; {KUBERAY_HINT}")


# ==== apply / delete: server-side apply of any kind, found by API discovery =================================
@dataclass(frozen=True)
class Resource:
    """Where objects of one kind live in the API (from discovery, as kubectl finds them)."""
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, namespace: str, name: str) -> str:
        scope = f"/namespaces/{namespace}" if self.namespaced else ""
        return f"{_api_base(self.api_version)}{scope}/{self.plural}/{name}"


def discover(kube: Kube, api_version: str, kind: str) -> Resource:
    """The API resource of `kind` in `api_version`; K8sError when the cluster does not serve it."""
    for r in served_resources(kube, api_version):
        if r.get("kind") == kind and "/" not in r.get("name", ""):       # not a subresource such as pods/log
            return Resource(api_version, kind, r["name"], bool(r.get("namespaced")))
    if kind == "RayService":
        raise _crd_missing_error(kube)
    raise K8sError(f"the Kubernetes API at {kube.host} does not serve {kind} ({api_version}): install what provides "
                   f"it, or turn that feature off in the values")


def _ref(doc: dict[str, Any]) -> list[str]:
    return [doc["apiVersion"], doc["kind"], doc["metadata"]["name"]]


def apply_objects(kube: Kube, docs: list[dict[str, Any]], out=None) -> None:
    """Server-side apply every object, in the order given (helm's install order). The RayService also records
    the other objects, so that `delete` removes what `apply` made, and objects an earlier apply recorded that
    these manifests no longer have (a feature turned off in the values) are pruned, as `helm upgrade` does."""
    out = out or sys.stdout
    from kubernetes.client.exceptions import ApiException

    others = [_ref(d) for d in docs if d["kind"] != "RayService"]
    resources = [discover(kube, d["apiVersion"], d["kind"]) for d in docs]   # every kind served, before any change
    services = [d for d in docs if d["kind"] == "RayService"]
    before = _recorded(_existing_rayservice(kube, services[0])) if services else []
    for doc, res in zip(docs, resources):
        meta = doc.setdefault("metadata", {})
        name, kind = meta["name"], doc["kind"]
        ns = (meta.get("namespace") or kube.namespace) if res.namespaced else ""
        if res.namespaced:
            meta["namespace"] = ns
        if kind == "RayService":
            meta.setdefault("annotations", {})[INVENTORY_ANNOTATION] = json.dumps(others)
        where = f"{kind} {ns}/{name}" if ns else f"{kind} {name}"
        if (meta.get("annotations") or {}).get(APPLY_ANNOTATION) == CREATE_ONLY and _exists(kube, res, ns, name):
            print(f"{kind.lower()}/{name} unchanged (create-only: it exists)" + (f" (namespace {ns})" if ns else ""),
                  file=out)
            continue
        try:
            _raw(kube, f"apply {where}", "PATCH", res.path(ns, name), body=doc,
                 query_params=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                 header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"})
        except ApiException as e:
            hint = f" (does namespace {ns} exist?)" if e.status == 404 else ""
            raise K8sError(f"apply {where} failed: {e.status} {_message(e)}{hint}") from None
        print(f"{kind.lower()}/{name} serverside-applied" + (f" (namespace {ns})" if ns else ""), file=out)
    if services:
        stale = [ref for ref in before if ref not in others]
        _delete_recorded(kube, services[0]["metadata"]["namespace"], stale, "pruned", out)


def _exists(kube: Kube, res: Resource, ns: str, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        _raw(kube, f"get {res.kind} {name}", "GET", res.path(ns, name))
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise K8sError(f"get {res.kind} {ns}/{name} failed: {e.status} {_message(e)}") from None


def _existing_rayservice(kube: Kube, doc: dict[str, Any]) -> dict[str, Any]:
    """The RayService as the cluster has it now; {} when it does not exist yet."""
    from kubernetes.client.exceptions import ApiException

    ns = doc["metadata"].get("namespace") or kube.namespace
    name = doc["metadata"]["name"]
    try:
        return call(kube, f"get RayService {ns}/{name}", kube.custom.get_namespaced_custom_object,
                    GROUP, VERSION, ns, RAYSERVICES, name)
    except ApiException as e:
        if e.status == 404:
            return {}
        raise K8sError(f"get RayService {ns}/{name} failed: {e.status} {_message(e)}") from None


def _recorded(rs: dict[str, Any]) -> list[list[str]]:
    """The [apiVersion, kind, name] of each object `apply` recorded on this RayService."""
    annotations = (rs.get("metadata") or {}).get("annotations") or {}
    try:
        return [list(ref) for ref in json.loads(annotations.get(INVENTORY_ANNOTATION) or "[]")]
    except (TypeError, ValueError):
        return []


def _delete_recorded(kube: Kube, ns: str, refs: list[list[str]], verb: str, out) -> None:
    """Delete recorded objects; one already gone is what was wanted."""
    from kubernetes.client.exceptions import ApiException

    for api_version, kind, name in refs:
        res = discover(kube, api_version, kind)
        try:
            _raw(kube, f"delete {kind} {name}", "DELETE", res.path(ns, name))
        except ApiException as e:
            if e.status != 404:
                raise K8sError(f"delete {kind} {ns}/{name} failed: {e.status} {_message(e)}") from None
            continue
        print(f"{kind.lower()}/{name} {verb}" + (f" (namespace {ns})" if res.namespaced else ""), file=out)


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
    """Delete the RayService and the objects `apply` recorded beside it (nothing else of the same name)."""
    out = out or sys.stdout
    from kubernetes.client.exceptions import ApiException

    ns = kube.namespace
    try:
        rs = get_rayservice(kube, name)
    except K8sError as e:
        if e.code == 1 and ignore_not_found:
            return 0
        raise
    try:
        call(kube, f"delete RayService {ns}/{name}", kube.custom.delete_namespaced_custom_object,
             GROUP, VERSION, ns, RAYSERVICES, name)
    except ApiException as e:
        if e.status != 404:
            raise K8sError(f"delete RayService {ns}/{name} failed: {e.status} {_message(e)}") from None
    print(f"rayservice/{name} deleted (namespace {ns})", file=out)
    _delete_recorded(kube, ns, _recorded(rs), "deleted", out)
    return 0


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
    models_cfg: dict[str, dict[str, Any]] = {}
    for a in apps_cfg.values():   # the ingress's application comes first, with every model's whole entry
        for m in (a.get("args") or {}).get("models", []):
            models_cfg.setdefault(f"model-{m['name']}", m)

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


def _add_chart_args(p: argparse.ArgumentParser, files_help: str) -> None:
    g = p.add_argument_group("the Helm chart (helm/herd): the values and the binary")
    g.add_argument("-f", "--values", dest="files", action="append", default=[], metavar="FILE", help=files_help)
    g.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                   help="a chart value, as `helm --set` takes it (repeatable)")
    g.add_argument("--name", default="herd", help="release name (default herd; the RayService is the chart's "
                                                  "fullname: the release name when it contains \"herd\")")
    g.add_argument("--chart", default=None, help="chart folder (default: helm/herd of this source checkout)")
    g.add_argument("--helm", default=None, help="helm binary (default: $HERD_HELM, else helm on PATH)")


def _read_docs(path: str) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except OSError as e:
        raise K8sError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise K8sError(f"{path}: invalid YAML ({e})") from None


def _is_manifest(docs: list[Any]) -> bool:
    return bool(docs) and all(isinstance(d, dict) and "kind" in d and "apiVersion" in d for d in docs)


def _render(args: argparse.Namespace, namespace: str | None) -> str:
    try:
        return helm_template(args.name, values_files=args.files, set_values=args.set_values, namespace=namespace,
                             chart=args.chart, helm=args.helm)
    except HelmError as e:
        raise K8sError(str(e)) from None


def _docs_to_apply(args: argparse.Namespace, namespace: str) -> list[dict[str, Any]]:
    """A rendered manifest (`kind:` objects) as it is, or the chart rendered with these values."""
    read = [_read_docs(f) for f in args.files]
    manifests = [f for f, docs in zip(args.files, read) if _is_manifest(docs)]
    if manifests and (len(args.files) > 1 or args.set_values):
        raise K8sError(f"{manifests[0]} is a rendered manifest: apply it alone, or give chart values instead")
    if manifests:
        return read[0]
    return [d for d in yaml.safe_load_all(_render(args, namespace)) if d]


def _fail(e: K8sError) -> int:
    print(f"herd k8s: {e}", file=sys.stderr)
    return e.code


def cmd_render(args: argparse.Namespace) -> int:
    try:
        text = _render(args, args.namespace)
    except K8sError as e:
        return _fail(e)
    if args.output and args.output != "-":
        Path(args.output).write_text(text)
        count = sum(1 for d in yaml.safe_load_all(text) if d)
        print(f"wrote {count} object(s) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        kube = connect(args.kubeconfig, args.context, args.namespace)
        apply_objects(kube, _docs_to_apply(args, kube.namespace))
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
    k8s = subparsers.add_parser("k8s", help="the Helm chart on Kubernetes: render, apply, status, delete",
                                description=__doc__.split("\n\n")[0])
    sub = k8s.add_subparsers(dest="k8s_command", required=True)

    p = sub.add_parser("render", help="print the chart's manifests for these values (`helm template`)")
    p.add_argument("-n", "--namespace", default=None, help="the release namespace (default: helm's, default)")
    p.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    _add_chart_args(p, "chart values file, as `helm -f` takes it (repeatable)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("apply", help="server-side apply the chart's manifests (or a rendered manifest)")
    _add_chart_args(p, "chart values file (repeatable), or one manifest from `herd k8s render`")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("status", help="RayService conditions, Serve application, models and worker groups")
    p.add_argument("name", nargs="?", default="herd", help="RayService name (default herd)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("delete", help="delete the RayService and the objects `herd k8s apply` made with it")
    p.add_argument("name", nargs="?", default="herd", help="RayService name (default herd)")
    p.add_argument("--ignore-not-found", action="store_true", help="exit 0 when it does not exist")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_delete)
    return k8s
