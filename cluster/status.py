"""`herd status`: the one screen an operator checks first.

    herd status                 # the Ray cluster this machine runs (`herd serve` started it), else $RAY_ADDRESS
    herd status --address HOST:6379 | auto | ray://...

What it shows, and where each part comes from:
- the application and each model's deployment status, replicas with their state, node and pid: Serve's
  controller (`get_serve_details`, what the Ray dashboard's Serve page reads);
- shard placement of a TP×PP replica, per node: the replica's placement group (bundle -> node, bundle
  resources) and the same rank -> bundle assignment the engine uses (workers.parallel.placement.assign_bundles);
  TP·PP from the model's own `model_info()`;
- KV use, running / waiting sequences and the prefix-cache hit rate (hit tokens / prompt tokens since the
  replica started), per replica: the replicas' herd_* series on each node's Prometheus endpoint
  (cluster.metrics), so nothing is asked of a busy engine;
- the gRPC / HTTP addresses (Serve's proxy options), the Ray dashboard URL and the metrics endpoints.

`collect_status()` needs a connected Ray driver (`connect(address)`); `format_status()` is plain text.
"""
from __future__ import annotations

import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from cluster.app_name import APP_NAME, model_application

MODEL_PREFIX = "model-"  # cluster.app.deployment_name


# ---- Prometheus endpoints ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


def metrics_urls() -> list[str]:
    """The Prometheus endpoint of every alive node of the connected Ray cluster."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")]


def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> list[Sample]:
    """Every sample on these endpoints (an endpoint that does not answer contributes nothing)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: list[Sample] = []
    for url in urls:
        try:
            text = urllib.request.urlopen(url, timeout=timeout_s).read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            out += [Sample(s.name, dict(s.labels), float(s.value)) for s in family.samples]
    return out


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (a counter or gauge summed over workers)."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def present(samples: Iterable[Sample], name: str, **labels: str) -> bool:
    return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) for s in samples)


# ---- the status ----------------------------------------------------------------------------------------------
@dataclass
class ShardStatus:
    rank: int
    tp_rank: int
    pp_rank: int
    node_ip: str
    resources: dict


@dataclass
class ReplicaStatus:
    replica_id: str
    state: str
    node_ip: str
    pid: Optional[int]
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    reported: bool = False          # its engine series were on a metrics endpoint
    shards: list[ShardStatus] = field(default_factory=list)

    @property
    def kv_usage(self) -> Optional[float]:
        blocks = self.kv_blocks_used + self.kv_blocks_free
        return self.kv_blocks_used / blocks if self.reported and blocks else None

    @property
    def prefix_hit_rate(self) -> Optional[float]:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else None


@dataclass
class RouterStatus:
    """The model's routers (one per ingress replica), summed: cluster.metrics.RouterMetrics."""
    decisions: dict[str, int]          # reason -> generations routed
    prompt_blocks: int
    matched_blocks: int
    report_age_s: Optional[float]      # the stalest report any router holds of any replica

    @property
    def hit_rate(self) -> Optional[float]:
        return self.matched_blocks / self.prompt_blocks if self.prompt_blocks else None


@dataclass
class ModelStatus:
    name: str
    deployment: str
    status: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    replicas: list[ReplicaStatus] = field(default_factory=list)
    router: Optional["RouterStatus"] = None
    message: str = ""          # Serve's word on the deployment (why a replica is not up yet, ...)

    def _sum(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.replicas)

    @property
    def running(self) -> int:
        return self._sum("running")

    @property
    def waiting(self) -> int:
        return self._sum("waiting")

    @property
    def kv_usage(self) -> Optional[float]:
        reported = [r for r in self.replicas if r.reported]
        blocks = sum(r.kv_blocks_used + r.kv_blocks_free for r in reported)
        return sum(r.kv_blocks_used for r in reported) / blocks if blocks else None

    @property
    def prefix_hit_rate(self) -> Optional[float]:
        prompt = self._sum("prompt_tokens")
        return self._sum("hit_tokens") / prompt if prompt else None


@dataclass
class ClusterStatus:
    app_status: str
    app_message: str
    models: list[ModelStatus]
    grpc_address: Optional[str]
    http_url: Optional[str]
    dashboard_url: Optional[str]
    metrics_urls: list[str]


def connect(address: Optional[str]) -> None:
    """Join the Ray cluster at `address` ("auto": the one this machine runs) as a quiet driver."""
    import logging

    import ray

    from cluster.local_ray import connect_ray

    if not ray.is_initialized():
        connect_ray(address, log_to_driver=False, logging_level=logging.WARNING)


def dashboard_url() -> Optional[str]:
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()  # "" / None when the cluster runs no dashboard
    except Exception:  # noqa: BLE001
        return None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def status_name(value: Any) -> str:
    """A Serve status enum (or string) as its plain name: ApplicationStatus.RUNNING -> "RUNNING"."""
    return str(getattr(value, "value", value) or "?")


def serve_details() -> dict:
    """Serve's controller's details as the plain dict it sends (`serve status` and the dashboard read it). Not
    `serve.status()`: that builds pydantic models of the same dict, and each deployment's RequestRouterConfig
    cloudpickles its router class again: ~13 ms of the caller's CPU a call against ~1 ms (measured in a
    driver; a serving process that polls it pays that with its event loops waiting for the GIL)."""
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def _shards(replica_actor_name: Optional[str], tp: int, pp: int, node_ips: dict[str, str],
            groups: dict[str, dict]) -> list[ShardStatus]:
    """Where the replica's shards run: its placement group's bundles 1..TP·PP (Serve names a replica's group
    after the replica's actor), ranks assigned as the engine assigns them."""
    if tp * pp <= 1 or not replica_actor_name:
        return []
    from workers.parallel.placement import assign_bundles

    table = next((g for g in groups.values() if g.get("name") == replica_actor_name
                  and g.get("state") != "REMOVED"), None)
    if table is None:
        return []
    node_of = {int(b): n for b, n in (table.get("bundles_to_node_id") or {}).items()}
    bundles = {int(b): r for b, r in (table.get("bundles") or {}).items()}
    shard_bundles = [b for b in sorted(bundles) if b != 0][: tp * pp]
    out = []
    for rank, bundle in enumerate(assign_bundles(shard_bundles, node_of, tp)):
        out.append(ShardStatus(rank, rank % tp, rank // tp, node_ips.get(node_of.get(bundle, ""), "?"),
                               {k: v for k, v in bundles[bundle].items() if not k.startswith("bundle")}))
    return out


def _router_status(samples: list[Sample], model: str) -> Optional[RouterStatus]:
    decisions = {s.labels.get("reason", "?"): 0 for s in samples
                 if s.name == "ray_herd_router_decisions_total" and s.labels.get("model") == model}
    if not decisions:
        return None   # no generation routed yet
    for reason in decisions:
        decisions[reason] = int(total(samples, "ray_herd_router_decisions_total", model=model, reason=reason))
    ages = [s.value for s in samples if s.name == "ray_herd_router_report_age_seconds" and s.labels.get("model") == model]
    return RouterStatus(decisions, int(total(samples, "ray_herd_router_prompt_blocks_total", model=model)),
                        int(total(samples, "ray_herd_router_matched_blocks_total", model=model)),
                        max(ages) if ages else None)


def _model_deployments(applications: dict[str, Any], app_name: str) -> dict[str, tuple[dict[str, Any], str]]:
    """Each model deployment of herd's application `app_name` (Serve's details) and the application it is in:
    `app_name` itself (herd serve), or the model's own beside it (the chart's serveConfigV2: cluster.app)."""
    own_prefix = model_application(app_name, "")
    found = {}
    for name, app in applications.items():
        if name == app_name or name.startswith(own_prefix):
            for dep_name, dep in (app.get("deployments") or {}).items():
                if dep_name.startswith(MODEL_PREFIX):
                    found[dep_name] = (dep, name)
    return found


def collect_status(app_name: str = APP_NAME) -> ClusterStatus:
    """Everything `herd status` shows, from the connected Ray cluster."""
    import ray
    from ray import serve

    details = serve_details()
    app = (details.get("applications") or {}).get(app_name)
    urls = metrics_urls()
    samples = scrape(urls)
    from ray.util.placement_group import placement_group_table

    node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    groups = placement_group_table()
    http, grpc_opts = details.get("http_options") or {}, details.get("grpc_options") or {}
    host = http.get("host") or "127.0.0.1"
    grpc_address = f"{host}:{grpc_opts['port']}" if grpc_opts.get("port") else None
    http_url = f"http://{host}:{http['port']}/v1" if http.get("port") else None
    if app is None:
        return ClusterStatus("NOT_DEPLOYED", f"no Serve application {app_name!r} on this cluster", [],
                             grpc_address, http_url, dashboard_url(), urls)
    models = []
    for dep_name, (dep, dep_app) in sorted(_model_deployments(details.get("applications") or {}, app_name).items()):
        model = ModelStatus(dep_name[len(MODEL_PREFIX):], dep_name, status_name(dep.get("status")),
                            message=dep.get("message") or "")
        try:
            info = serve.get_deployment_handle(dep_name, app_name=dep_app).model_info.remote().result(timeout_s=10)
            model.tensor_parallel_size = int(info.get("tensor_parallel_size", 1))
            model.pipeline_parallel_size = int(info.get("pipeline_parallel_size", 1))
        except Exception:  # noqa: BLE001 - no replica up yet: placement is shown once one is
            pass
        for rep in dep.get("replicas") or []:
            rid = rep.get("replica_id", "?")
            r = ReplicaStatus(rid, status_name(rep.get("state")), rep.get("node_ip") or "?", rep.get("pid"))
            tags = {"model": model.name, "replica": rid}
            r.reported = present(samples, "ray_herd_kv_blocks_free", **tags)
            r.running = int(total(samples, "ray_herd_running_sequences", **tags))
            r.waiting = int(total(samples, "ray_herd_queue_depth", **tags))
            r.kv_blocks_used = int(total(samples, "ray_herd_kv_blocks_used", **tags))
            r.kv_blocks_free = int(total(samples, "ray_herd_kv_blocks_free", **tags))
            r.prompt_tokens = int(total(samples, "ray_herd_prompt_tokens_total", **tags))
            r.hit_tokens = int(total(samples, "ray_herd_prefix_cache_hit_tokens_total", **tags))
            try:
                r.shards = _shards(rep.get("actor_name"), model.tensor_parallel_size, model.pipeline_parallel_size,
                                   node_ips, groups)
            except Exception:  # noqa: BLE001 - placement is a detail; the rest of the screen still matters
                r.shards = []
            model.replicas.append(r)
        model.router = _router_status(samples, model.name)
        models.append(model)
    return ClusterStatus(status_name(app.get("status")), app.get("message") or "", models, grpc_address, http_url,
                         dashboard_url(), urls)


# ---- the screen ----------------------------------------------------------------------------------------------
def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _resources(res: dict) -> str:
    return " ".join(f"{k} {v:g}" for k, v in sorted(res.items())) or "-"


def _placement_lines(shards: list[ShardStatus]) -> list[str]:
    by_node: dict[str, list[ShardStatus]] = {}
    for s in shards:
        by_node.setdefault(s.node_ip, []).append(s)
    lines = []
    for node, group in by_node.items():
        ranks = ", ".join(f"pp{s.pp_rank}/tp{s.tp_rank}" for s in group)
        lines.append(f"      node {node}: {len(group)} shard(s) [{ranks}], each {_resources(group[0].resources)}")
    return lines


def format_status(st: ClusterStatus) -> str:
    lines = [f"herd: application {APP_NAME} {st.app_status}" + (f" ({st.app_message})" if st.app_message else ""),
             f"  gRPC       {st.grpc_address or '-'}",
             f"  HTTP       {st.http_url or '-'}",
             f"  dashboard  {st.dashboard_url or 'not running'}",
             f"  metrics    {', '.join(st.metrics_urls) or '-'}",
             ""]
    header = f"{'MODEL':<24} {'STATUS':<10} {'LAYOUT':<8} {'REPLICAS':>8} {'RUNNING':>8} {'WAITING':>8} " \
             f"{'KV USE':>7} {'PREFIX HIT':>10}"
    lines.append(header)
    for m in st.models:
        up = sum(1 for r in m.replicas if r.state == "RUNNING")
        layout = f"TP{m.tensor_parallel_size}xPP{m.pipeline_parallel_size}"
        lines.append(f"{m.name:<24} {m.status:<10} {layout:<8} {f'{up}/{len(m.replicas)}':>8} {m.running:>8} "
                     f"{m.waiting:>8} {_pct(m.kv_usage):>7} {_pct(m.prefix_hit_rate):>10}")
        if m.message and m.status != "HEALTHY":   # e.g. a replica Ray cannot place: the resources it waits for
            lines.append(f"  serve: {m.message}")
        if m.router is not None:
            routed = ", ".join(f"{m.router.decisions.get(k, 0)} {k}" for k in ("affinity", "load", "fallback"))
            age = "-" if m.router.report_age_s is None else f"{m.router.report_age_s:.1f}s"
            lines.append(f"  router: {routed}; prompt blocks found where sent {_pct(m.router.hit_rate)}; "
                         f"oldest replica report {age}")
        for r in m.replicas:
            lines.append(f"  replica {r.replica_id:<10} {r.state:<9} node {r.node_ip:<15} pid {r.pid or '-':<7} "
                         f"running {r.running} waiting {r.waiting} KV {r.kv_blocks_used}/"
                         f"{r.kv_blocks_used + r.kv_blocks_free} ({_pct(r.kv_usage)}) "
                         f"prefix hit {_pct(r.prefix_hit_rate)}")
            if r.shards:
                lines.append(f"    shards ({layout}):")
                lines += _placement_lines(r.shards)
    if not st.models:
        lines.append("(no models)")
    return "\n".join(lines)


def cmd_status(args) -> int:
    import logging

    import ray.serve  # noqa: F401 - importing it sets "ray.serve" to INFO (Serve's default logger set-up)

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # a driver's handle set-up lines: not the screen
    try:
        connect(args.address)
    except ConnectionError as e:
        print(f"herd: no Ray cluster to report on ({e}); start one with `herd serve` or pass --address",
              file=sys.stderr)
        return 1
    print(format_status(collect_status(args.app)))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("status", help="models, replicas, shard placement, KV use, load, prefix hits, URLs")
    p.add_argument("--address", default=None,
                   help="Ray cluster (HOST:PORT, auto, ray://...); default: the one this machine runs / $RAY_ADDRESS")
    p.add_argument("--app", default=APP_NAME, help="Serve application name (default %(default)s)")
    p.set_defaults(func=cmd_status)
