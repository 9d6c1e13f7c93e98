"""The Serve application: one model deployment per configured model, behind one ingress (gRPC + OpenAI HTTP).

    build_app(args) -> serve.Application          # import path cluster.app:build_app (herd serve)
    build_ingress_app(args), build_model_app(args)  # cluster.app:build_ingress_app, :build_model_app (the chart)

`args` is the cluster config (cluster.config.ClusterConfig, its dict form, or {"config": "path.yaml"}), the
same YAML that `herd serve` reads and that the Helm chart embeds as serveConfigV2 `args`. Ports, host and the
gRPC servicers are Serve-wide options, not part of an application: `serve_start_options(cfg)` gives them
for `serve.start` (what `herd serve` does); in a serveConfigV2 they are `http_options` / `grpc_options`
with `grpc_servicer_functions: GRPC_SERVICER_FUNCTIONS`.

Deployments per model (names: `model-<name>`; the ingress is `Ingress`):
- TP·PP = 1: whole-model replicas, each reserving `resources_per_shard` (ray_actor_options).
- TP·PP > 1: each replica owns a placement group `[{"CPU": DRIVER_CPUS}] + [resources_per_shard] * (TP*PP)`
  with the model's placement strategy; the replica (the engine's driver) takes bundle 0 and the engine puts
  its shard actors in the others.
- `autoscaling_config` (if set) uses cluster.autoscaling's LLM policy unless the config names another, with a
  downscale delay and `graceful_shutdown_timeout_s` so a replica being removed finishes its streams first.
- The PrefixCacheRouter (cluster.routing) routes every model's requests.

TLS: Serve's HTTP proxy terminates TLS when `http_options` has ssl_keyfile/ssl_certfile; Serve's gRPC proxy
(Ray 2.60) only listens in plaintext (`add_insecure_port`). A local `herd serve` makes it TLS through its
worker set-up hook (cluster.grpc_tls); elsewhere terminate gRPC TLS at the gateway / ingress controller in
front of it (Envoy, an Ingress with backend-protocol GRPC, a service mesh).
"""
from __future__ import annotations

import secrets
from typing import Any, Collection

from ray import serve

from cluster.app_name import APP_NAME
from cluster.config import ClusterConfig
from cluster.deployment import ModelDeployment, ModelSpec, ServedModel
from cluster.deployment_version import ingress_version, model_version
from cluster.ingress import IngressDeployment
from workers.engine_config import EngineConfig

INGRESS_NAME = "Ingress"
# herd.v1.Inference and grpc.health.v1.Health, registered so that a client's cancel of a stream always reaches
# the replica (Serve's proxy loses some: cluster.proxy_streams).
GRPC_SERVICER_FUNCTIONS = [
    "cluster.proxy_streams.add_inference_servicer",
    "cluster.proxy_streams.add_health_servicer",
    # Add no service: the HTTP proxy answers 503, not 404, while herd's application is not deployed; and
    # serves a renewed certificate without a restart.
    "cluster.proxy_not_serving.install_http_not_serving",
    "cluster.https_renewal.install_https_renewal",
    # Add no service: a call whose ingress replica died is UNAVAILABLE / 503, not INTERNAL / 500.
    "cluster.proxy_replica_lost.install_replica_lost",
    # Add no service: the HTTP proxy holds at most limits.max_http_connections, none idle past keep-alive.
    "cluster.proxy_http_connections.install_http_connection_limits",
]
# Added (last) when `enable_reflection` is on: reflection v1 beside Serve's v1alpha (see cluster.reflection).
REFLECTION_SERVICER_FUNCTIONS = ["cluster.reflection.add_reflection_v1_to_server"]
# CPU reserved by the engine driver of a TP×PP replica (bundle 0 of its placement group).
DRIVER_CPUS = 0.1
INGRESS_CPUS = 0.1
ROUTER_CLASS = "cluster.routing:PrefixCacheRouter"
AUTOSCALING_POLICY = "cluster.autoscaling:llm_autoscaling_policy"


def deployment_name(model_name: str) -> str:
    return f"model-{model_name}"


def load_config(args: Any) -> ClusterConfig:
    """ClusterConfig from what `serve run` / serveConfigV2 / herd pass as application args."""
    if isinstance(args, ClusterConfig):
        return args
    args = dict(args or {})
    path = args.pop("config", None)
    if path is not None:
        if args:
            raise ValueError("application args: give either `config: <path.yaml>` or the config itself, not both")
        return ClusterConfig.from_yaml(path)
    return ClusterConfig.from_dict(args)


def _actor_resources(resources: dict[str, float]) -> dict[str, Any]:
    """{"CPU": 1, "GPU": 1, "other": 2} -> ray_actor_options."""
    rest = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    opts: dict[str, Any] = {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0)}
    if rest:
        opts["resources"] = rest
    return opts


def model_spec(model, tracing: dict[str, Any] | None = None) -> ModelSpec:
    """What a model replica needs to build its engine (plain data: it is pickled into every replica)."""
    return ModelSpec(name=model.name, path=str(model.path), tensor_parallel_size=model.tensor_parallel_size,
                     pipeline_parallel_size=model.pipeline_parallel_size, dtype=model.dtype,
                     engine_args=model.engine_args(),
                     engine_process=model.engine_process,
                     engine_cpu_cores=model.engine_cpu_cores,
                     stream_pacing={"max_messages_per_s": model.stream_max_messages_per_s,
                                    "max_interval_s": model.stream_max_interval_s},
                     tracing=tracing)


def served_model(model, version: str = "", own_application: bool = False) -> ServedModel:
    """What the ingress knows of a model before its replica answers model_info(); `version` is the deployment's
    (cluster.deployment_version); `own_application`: the model is an application of its own (build_model_app)."""
    return ServedModel(name=model.name, path=str(model.path), deployment=deployment_name(model.name),
                       tensor_parallel_size=model.tensor_parallel_size,
                       pipeline_parallel_size=model.pipeline_parallel_size,
                       autoscaling=model.autoscaling_config is not None, version=version,
                       own_application=own_application)


# How often a stopping replica looks whether its streams have ended. Serve sleeps this long before it first
# looks (2 s by default), so an idle replica being scaled down or redeployed held its CPUs/GPUs (and the
# engine's memory) 2 s for nothing; counting a Python int every 0.25 s costs nothing.
GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 0.25


def model_deployment_options(model) -> dict[str, Any]:
    tp, pp = model.tensor_parallel_size, model.pipeline_parallel_size
    shard = dict(model.resources_per_shard)
    opts: dict[str, Any] = {
        "name": deployment_name(model.name),
        "max_ongoing_requests": model.effective_max_ongoing_requests,
        "max_queued_requests": model.effective_serve_max_queued_requests,
        "graceful_shutdown_timeout_s": model.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
        "max_surge_percent": model.max_surge_percent,
        "health_check_period_s": model.health_check_period_s,
        "health_check_timeout_s": model.health_check_timeout_s,
        "request_router_config": {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {"block_size": model.engine_args().get(
                                          "block_size", EngineConfig.model_fields["block_size"].default),
                                      **dict(model.router_kwargs or {})},
            "request_routing_stats_period_s": model.routing_stats_period_s,
        },
    }
    if tp * pp == 1:
        opts["ray_actor_options"] = _actor_resources(shard)
    else:
        opts["ray_actor_options"] = {"num_cpus": DRIVER_CPUS}
        opts["placement_group_bundles"] = [{"CPU": DRIVER_CPUS}] + [shard] * (tp * pp)
        opts["placement_group_strategy"] = model.placement_strategy
    if model.autoscaling_config is not None:
        opts["autoscaling_config"] = serve_autoscaling_config(model.autoscaling_config)
    else:
        opts["num_replicas"] = model.num_replicas or 1
    return opts


def serve_autoscaling_config(autoscaling) -> dict[str, Any]:
    """A model's autoscaling_config as Serve takes it: every key herd's AutoscalingConfig gives, the policy
    herd's LLM-aware one unless the config names another."""
    out = autoscaling.model_dump(exclude_none=True)
    out.setdefault("policy", {"policy_function": AUTOSCALING_POLICY})
    return out


# A model's keys that are Serve options Serve changes on the running replicas (its rolling update restarts
# none for them). The chart gives them in its model application's `deployments` override, not in the `args`
# that version the model: changing them (scaling a model, say) restarts nothing. Their defaults are the code's,
# except autoscaling_config's, which the chart completes from helm/herd/files/serve-defaults.json
# (cluster.schema_gen writes it from serve_autoscaling_config, with this list and the next).
MODEL_SERVE_OPTIONS = ("num_replicas", "autoscaling_config", "max_surge_percent", "graceful_shutdown_timeout_s",
                       "health_check_period_s", "health_check_timeout_s")


def build_app(args: Any) -> serve.Application:
    """Every model and the ingress as one application (`herd serve`, local or joined; `serve run
    cluster.app:build_app`). Serve calls an application builder with exactly one argument (a config file's, a
    serveConfigV2's `args`) and refuses one that takes more."""
    return build_app_restarting(args, restart=())


def build_app_restarting(args: Any, restart: Collection[str]) -> serve.Application:
    """build_app, where the deployments named in `restart` start anew even if nothing of theirs changed (a retry
    of one that failed: Serve does not redeploy a deployment whose version and options are unchanged)."""
    cfg = load_config(args)
    versioned = _versioning(restart)
    handles, versions = {}, {}
    for model in cfg.models:
        handles[model.name], versions[model.name] = _model_deployment(model, cfg, versioned)
    bound = _ingress_arguments(cfg, versions)
    return _ingress(cfg, bound, versions, versioned).bind(handles, *bound)


# The cluster keys a model's replica is built from besides its own entry (a model without its own `router`
# takes the cluster's; cluster.tracing): a model's own application (build_model_app) gets these and no others.
MODEL_APPLICATION_CLUSTER_KEYS = ("router", "tracing")


def build_model_app(args: Any) -> serve.Application:
    """One model as an application of its own (import path cluster.app:build_model_app), beside the ingress's
    (build_ingress_app): how the chart's serveConfigV2 deploys herd on KubeRay.

    Why not one application there: Serve's declarative path (a config file, KubeRay's serveConfigV2) versions
    every deployment of an application by a hash of the application's whole `args`, so with every model in one
    application a change of any key restarted every model (a 70B shard group reloading its weights because
    another model's max_num_seqs changed). Each model's application holds its own entry and the cluster keys it
    is built from (MODEL_APPLICATION_CLUSTER_KEYS): a change restarts that model only. `herd serve` deploys one
    application (build_app), where herd versions each deployment itself (cluster.deployment_version)."""
    cfg = load_config(args)
    if len(cfg.models) != 1:
        raise ValueError(f"cluster.app:build_model_app builds one model; its args name {len(cfg.models)} "
                         f"({', '.join(m.name for m in cfg.models)})")
    bound, _ = _model_deployment(cfg.models[0], cfg, _versioning(()))
    return bound


def build_ingress_app(args: Any) -> serve.Application:
    """The ingress as an application of its own (import path cluster.app:build_ingress_app), `args` the whole
    config: it reaches each model's deployment in the model's own application (build_model_app; the names are
    cluster.app_name.model_application's), and restarts on any change of the config (it is cheap to start, and
    its rolling update surges: ingress_max_surge_percent)."""
    cfg = load_config(args)
    versioned = _versioning(())
    versions = {m.name: model_version(_spec(m, cfg)) for m in cfg.models}
    bound = _ingress_arguments(cfg, versions, own_applications=True)
    # No bound handles: the ingress looks each model up by name in its own application (cluster.ingress).
    return _ingress(cfg, bound, versions, versioned).bind(None, *bound)


def _versioning(restart: Collection[str]):
    """deployment.options(**options) with its version (cluster.deployment_version): an update restarts only
    what changed. Serve's options() takes a version only from Serve's own builders (`_internal`), as its
    config-file builds pass theirs (which then replace it by the application's: build_model_app says why)."""
    attempt = secrets.token_hex(4)

    def versioned(deployment, options: dict[str, Any], version: str):
        version = f"{version}-{attempt}" if options["name"] in restart else version
        return deployment.options(**options, version=version, _internal=True)
    return versioned


def _spec(model, cfg: ClusterConfig) -> ModelSpec:
    return model_spec(model, tracing=cfg.tracing.model_dump())   # cluster.tracing: each replica sets itself up


def _model_deployment(model, cfg: ClusterConfig, versioned):
    """A model's deployment, bound to its ModelSpec, and its version."""
    spec = _spec(model, cfg)
    version = model_version(spec)
    return versioned(ModelDeployment, model_deployment_options(model), version).bind(spec), version


def _ingress_arguments(cfg: ClusterConfig, versions: dict[str, str], own_applications: bool = False) -> tuple:
    """What the ingress is bound to besides the model handles. A key file is read by the ingress itself (where
    the Secret is mounted, and re-read when it changes), so the keys are not copied into the stored arguments."""
    specs = {m.name: served_model(m, versions[m.name], own_application=own_applications) for m in cfg.models}
    return specs, list(cfg.api_keys), cfg.api_keys_file, ingress_settings(cfg)


def _ingress(cfg: ClusterConfig, bound: tuple, versions: dict[str, str], versioned):
    return versioned(IngressDeployment, ingress_deployment_options(cfg), ingress_version(*bound, versions))


def ingress_deployment_options(cfg: ClusterConfig) -> dict[str, Any]:
    """The ingress is sized to carry every model's full capacity at once (cluster.config), so it never holds
    back a request a model could take; past that the proxy answers RESOURCE_EXHAUSTED at once."""
    opts: dict[str, Any] = {
        "name": INGRESS_NAME, "ray_actor_options": {"num_cpus": INGRESS_CPUS},
        "max_ongoing_requests": cfg.effective_ingress_max_ongoing_requests,
        "max_queued_requests": cfg.ingress_max_queued_requests,
        "max_surge_percent": cfg.ingress_max_surge_percent,
        "graceful_shutdown_timeout_s": max(m.graceful_shutdown_timeout_s for m in cfg.models),
        "graceful_shutdown_wait_loop_s": GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
    }
    if cfg.ingress_autoscaling is not None:
        autoscaling = cfg.ingress_autoscaling.model_dump(exclude_none=True)
        opts["autoscaling_config"] = autoscaling
    else:
        opts["num_replicas"] = cfg.ingress_replicas
    return opts


def ingress_settings(cfg: ClusterConfig) -> dict[str, Any]:
    """What the ingress needs of the config besides keys and models (plain data: pickled into each replica)."""
    return {"limits": cfg.limits.model_dump(), "prefix_cache_isolation": cfg.prefix_cache_isolation,
            "enable_openapi_docs": cfg.enable_openapi_docs, "tracing": cfg.tracing.model_dump(),
            "serve_transport": cfg.serve_transport}


def serve_start_options(cfg: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments for serve.start(): HTTP and gRPC proxies on the configured host and ports."""
    from ray.serve.config import gRPCOptions, HTTPOptions

    http: dict[str, Any] = {"host": cfg.host, "port": cfg.http_port}
    servicers = GRPC_SERVICER_FUNCTIONS + (REFLECTION_SERVICER_FUNCTIONS if cfg.enable_reflection else [])
    grpc_opts: dict[str, Any] = {"port": cfg.grpc_port, "grpc_servicer_functions": servicers,
                                 "enable_reflection": cfg.enable_reflection,
                                 "request_timeout_s": cfg.request_timeout_s}
    http["request_timeout_s"] = cfg.request_timeout_s
    if cfg.tls is not None:  # HTTPS on the HTTP proxy; the gRPC proxy's TLS is cluster.grpc_tls' (module doc)
        http["ssl_certfile"], http["ssl_keyfile"] = cfg.tls.cert_file, cfg.tls.key_file
    return {"http_options": HTTPOptions(**http), "grpc_options": gRPCOptions(**grpc_opts)}
