"""`herd serve [CONFIG.yaml]` and `herd client ...` (registered into cluster.cli by `register_cli`).

With no config, `herd serve` serves the embedded demo: three small random-weight checkpoints written once to a
cache folder ($HERD_CACHE, default ~/.cache/herd/demo) — a Llama-2-70B-shaped model as a TP2×PP2 shard group
with CPU fractions per shard, and Llama-3-8B- and Llama-3.2-1B-shaped models as autoscaled replicas — so
`make serve` shows the whole system on one CPU machine.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster.client import register_client
from cluster.settings_flags import SettingField, add_setting_flags, set_flags, setting_fields

log = logging.getLogger(f"herd.{__name__}")

# 64 MiB of KV cache per shard holds tens of thousands of tokens of these small shapes (the CPU default,
# 1 GiB per shard, would make the demo take ~6 GiB of memory).
_DEMO_KV = 64 << 20
DEMO_MODELS = (
    # (model name, demo shape, extra model config)
    ("llama2-70b-mini", "llama2-70b-mini", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2,
                                            "resources_per_shard": {"CPU": 0.25}, "max_model_len": 1024,
                                            "kv_cache_memory": _DEMO_KV}),
    ("llama3-8b-mini", "llama3-8b-mini", {"resources_per_shard": {"CPU": 0.25}, "max_model_len": 2048,
                                          "kv_cache_memory": _DEMO_KV,
                                          "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                                                 "target_ongoing_requests": 4}}),
    ("llama32-1b-mini", "llama32-1b-mini", {"resources_per_shard": {"CPU": 0.25}, "max_model_len": 2048,
                                            "kv_cache_memory": _DEMO_KV,
                                            "autoscaling_config": {"min_replicas": 1, "max_replicas": 3,
                                                                   "target_ongoing_requests": 4}}),
)


def demo_cache_dir() -> Path:
    return Path(os.environ.get("HERD_CACHE") or Path.home() / ".cache" / "herd" / "demo")


def demo_config(cache_dir: Path | None = None, *, host: str = "127.0.0.1", grpc_port: int = 9000,
                http_port: int = 8000) -> dict[str, Any]:
    """The embedded demo's cluster config (writing the demo checkpoints on first use)."""
    from workers.demo import write_demo_checkpoint

    cache_dir = Path(cache_dir or demo_cache_dir())
    models = []
    for name, shape, extra in DEMO_MODELS:
        path = cache_dir / shape
        if not (path / "config.json").is_file():
            print(f"herd: writing the {shape} demo checkpoint to {path} ...", file=sys.stderr)
            write_demo_checkpoint(path, shape)
        models.append({"name": name, "path": str(path), **extra})
    return {"host": host, "grpc_port": grpc_port, "http_port": http_port, "models": models}


# `herd serve` flags that override the config: cluster-wide keys, and for every model each engine setting
# (workers.EngineConfig's fields, as ModelDeploymentConfig takes them), Serve's capacity keys and where the
# engine runs. The flags' types, help and defaults come from the fields (cluster.settings_flags).
CLUSTER_FLAGS = ("host", "grpc_port", "http_port", "ingress_replicas", "ingress_max_surge_percent",
                 "request_timeout_s", "serve_transport", "cpu_binding", "cpu_binding_serving_cpus")
SERVE_MODEL_FLAGS = ("max_ongoing_requests", "serve_max_queued_requests", "max_surge_percent", "engine_process",
                     "engine_cpu_cores")


def cluster_flag_fields() -> list[SettingField]:
    from cluster.config import ClusterConfig

    return setting_fields(ClusterConfig, CLUSTER_FLAGS)


def model_flag_fields() -> list[SettingField]:
    """Every engine setting and SERVE_MODEL_FLAGS, as ModelDeploymentConfig declares them; a key the model
    config leaves unset (None) shows the engine's default."""
    from cluster.config import ModelDeploymentConfig
    from workers.engine_config import EngineConfig

    engine_defaults = {f.name: f.default for f in setting_fields(EngineConfig)}
    return [f._replace(default=engine_defaults.get(f.name)) if f.default is None else f
            for f in setting_fields(ModelDeploymentConfig, (*EngineConfig.model_fields, *SERVE_MODEL_FLAGS))]


def apply_overrides(cfg, args):
    """The config with the flags given on the command line (validated again, so errors name the key)."""
    from cluster.config import ClusterConfig

    cluster = set_flags(args, cluster_flag_fields())
    model = set_flags(args, model_flag_fields())
    if not cluster and not model:
        return cfg
    data = cfg.model_dump()
    data.update(cluster)
    data["models"] = [{**m, **model} for m in data["models"]]
    return ClusterConfig.from_dict(data)


def cmd_serve(args) -> int:
    import ray
    from ray import serve

    from cluster import cpu_binding, serve_reload
    from cluster.app import APP_NAME, serve_start_options
    from cluster.app_deploy import DeployFailed, deploy
    from cluster.config import ClusterConfig
    from cluster.local_ray import connect_ray, local_ray_options, start_local_ray
    from cluster.shared_serve import ROUTE_PREFIX
    from cluster.startup import summary_lines

    if args.config:
        cfg = ClusterConfig.from_yaml(args.config)
    else:
        print("herd: no config given; serving the embedded demo", file=sys.stderr)
        cfg = ClusterConfig.from_dict(demo_config())
    cfg = apply_overrides(cfg, args)
    if not args.address and _say_problems(_local_start_problems(cfg)):
        return 2

    started = time.monotonic()
    # Ray's and Serve's own INFO lines go to Ray's log files (the summary says where); -v streams them here.
    verbose = bool(getattr(args, "verbose", False))
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    shared = None   # the Serve already running on a joined cluster (cluster.shared_serve)
    cpus = binding = None   # a local herd serve's CPUs before binding, and its binding (cluster.cpu_binding)
    if args.address:
        print(f"herd: joining the Ray cluster at {args.address} ...", file=sys.stderr)
        try:
            connect_ray(args.address, **quiet)
        except ConnectionError as e:
            print(f"herd: error: cannot join a Ray cluster: {e}", file=sys.stderr)
            return 1
        cfg, shared = _join_running_serve(cfg)
        if cfg is None:
            ray.shutdown()
            return 1
    else:  # a private single-node Ray: never join a cluster by accident; every port on loopback but the proxies
        cpus = cpu_binding.allowed_cpus()
        cfg, binding = bind_cpus(cfg)
        print("herd: starting a local Ray (every port on 127.0.0.1 but the gRPC / HTTP proxies) ...", file=sys.stderr)
        start_local_ray(**local_ray_options(cfg), **quiet)
    stop = threading.Event()
    serving = threading.Event()
    hurried = False
    wakes: queue.SimpleQueue = queue.SimpleQueue()   # "stop" / "reload", from the signal handlers

    def on_signal(*_):  # while starting, or a second one while draining: stop at once; the first one drains
        if not serving.is_set() or stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        wakes.put("stop")

    def on_hangup(*_):  # SIGHUP: reload the config file (cluster.serve_reload)
        wakes.put("reload")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        if shared is None:
            print(f"herd: starting Serve: gRPC proxy on {cfg.host}:{cfg.grpc_port}, HTTP proxy on "
                  f"{cfg.host}:{cfg.http_port} ...", file=sys.stderr)
            serve.start(**serve_start_options(cfg))
        else:   # its proxies keep their options (serve.start would only warn that ours are ignored)
            print(f"herd: Serve already runs on the cluster (gRPC proxy port {cfg.grpc_port}, HTTP proxy port "
                  f"{cfg.http_port}, applications: {', '.join(shared.applications) or 'none'}); deploying "
                  "herd beside them ...", file=sys.stderr)
        try:
            deploy(cfg, app_name=APP_NAME, route_prefix=ROUTE_PREFIX, logs_dir=_logs_dir())
        except DeployFailed as e:   # say why, without Serve's traceback
            _say_problems(e.failures)
            print(f"herd: the replicas' logs: {os.path.join(_logs_dir() or '<ray session>/logs', 'serve')}",
                  file=sys.stderr)
            return 1
        if not args.address and _say_problems(_grpc_tls_problems(cfg)):
            return 1
        _report_exposure(cfg, joined=bool(args.address))
        from cluster.status import dashboard_url, metrics_urls

        for line in summary_lines(cfg, elapsed_s=time.monotonic() - started, dashboard_url=dashboard_url(),
                                  metrics_urls=metrics_urls(), logs_dir=_logs_dir(), joined=bool(args.address)):
            print(line, file=sys.stderr)
        sys.stderr.flush()
        serving.set()
        started_as = serve_reload.started_with(cfg, local=not args.address, cpus=cpus, binding=binding)
        while wakes.get() == "reload" and not stop.is_set():
            # A reload waits for its replicas, which may have no room to start: a newer SIGHUP or a Ctrl-C ends
            # that wait (cluster.app_deploy).
            cfg = _reload(args, cfg, started_as, shared, interrupted=lambda: not wakes.empty())
    except KeyboardInterrupt:
        hurried = serving.is_set()   # a second Ctrl-C while a reload deployed: no drain
        raise
    finally:
        print("herd: shutting down", file=sys.stderr)
        if hurried:
            print("herd: stopping without waiting", file=sys.stderr)
        elif serving.is_set():
            _drain(cfg)
        if args.address:   # Serve on a joined cluster outlives this process unless shut down
            _leave_joined_serve(started_serve=shared is None)
        ray.shutdown()     # a local Ray ends with everything in it (Serve's controller and proxies too)
    return 0


def _reload(args, cfg, started_as, shared, interrupted=lambda: False):
    """SIGHUP: deploy the config file anew (with the command line's overrides, and a shared Serve's ports, as at
    start), unless cluster.serve_reload refuses it; the config now served (or being deployed, when
    `interrupted()` ended the wait for its replicas)."""
    from cluster import app_deploy, serve_reload
    from cluster.app import APP_NAME
    from cluster.config import ClusterConfig
    from cluster.shared_serve import ROUTE_PREFIX

    if not args.config:
        print("herd: SIGHUP: serving the embedded demo, there is no config file to reload", file=sys.stderr)
        return cfg

    def load():
        new = apply_overrides(ClusterConfig.from_yaml(args.config), args)
        return new if shared is None else shared.adopt(new)[0]
    print(f"herd: reloading {args.config} ...", file=sys.stderr, flush=True)
    try:
        new = serve_reload.checked_config(load, cfg, started_as)
        deployed = app_deploy.deploy(new, app_name=APP_NAME, route_prefix=ROUTE_PREFIX, logs_dir=_logs_dir(),
                                     from_now=True, interrupted=interrupted)
    except serve_reload.ReloadRefused as e:
        print(f"herd: reload refused: {e}; still serving the previous config", file=sys.stderr, flush=True)
        return cfg
    except app_deploy.DeployFailed as e:
        print(f"herd: reload failed: {e}; a model whose new replicas failed keeps only the old ones not yet "
              "replaced (`herd status` shows them): fix the config and reload again", file=sys.stderr, flush=True)
        return cfg
    except Exception as e:  # noqa: BLE001 - a reload must never stop the server; say what went wrong
        log.debug("the reload failed", exc_info=True)   # -v: where
        print(f"herd: reload failed: {e!r}; `herd status` shows what runs now", file=sys.stderr, flush=True)
        return cfg
    if not deployed.finished:
        print(f"herd: stopped waiting for the reload after {deployed.elapsed_s:.1f} s (Serve goes on with it "
              "unless a newer config replaces it; the old replicas serve meanwhile)", file=sys.stderr, flush=True)
    else:
        print(f"herd: reloaded in {deployed.elapsed_s:.1f} s", file=sys.stderr, flush=True)
    return new


def _join_running_serve(cfg):
    """On a joined cluster, the Serve already running there if any (cluster.shared_serve): (the config with its
    proxies' ports, it), (cfg, None) when Serve is not running, or (None, None) after saying why herd cannot
    deploy onto it."""
    from cluster.shared_serve import running_serve

    shared = running_serve()
    if shared is None:
        return cfg, None
    if _say_problems(shared.problems()):
        return None, None
    cfg, warnings = shared.adopt(cfg)
    for w in warnings:
        print(f"herd: WARNING: {w}", file=sys.stderr)
    return cfg, shared


def _leave_joined_serve(*, started_serve: bool) -> None:
    """After the drain on a joined cluster: Serve is shut down only if this herd serve started it and no other
    application runs there (serve.shutdown() ends every application on the cluster)."""
    from cluster.shared_serve import stop_serve_unless_shared

    try:
        kept = stop_serve_unless_shared(started_serve)
    except Exception as e:  # noqa: BLE001 - the process is ending either way; say what was left running
        print(f"herd: WARNING: could not stop Serve on the cluster ({e!r})", file=sys.stderr)
        return
    if kept:
        print(f"herd: {kept}", file=sys.stderr)


def _drain(cfg) -> None:
    """Let every in-flight request finish before anything stops: deleting the application stops its replicas
    the way a scale-down does (no new work; each waits up to its graceful_shutdown_timeout_s for its streams).
    A second Ctrl-C (or SIGTERM) stops at once. serve.shutdown() alone killed the proxies first, which ended
    every open stream UNAVAILABLE."""
    from ray import serve

    from cluster.app import APP_NAME

    wait_s = max(m.graceful_shutdown_timeout_s for m in cfg.models)
    print(f"herd: finishing in-flight requests (up to {wait_s:g} s; Ctrl-C again stops at once) ...",
          file=sys.stderr)
    started = time.monotonic()
    try:
        serve.delete(APP_NAME)
    except KeyboardInterrupt:
        print("herd: stopping without waiting", file=sys.stderr)
        return
    except Exception as e:  # noqa: BLE001 - stopping goes on; say why the requests were not waited for
        print(f"herd: WARNING: could not wait for in-flight requests ({e!r})", file=sys.stderr)
        return
    print(f"herd: in-flight requests finished in {time.monotonic() - started:.1f} s", file=sys.stderr)


def _local_start_problems(cfg) -> list[str]:
    """What would keep a local herd serve from starting, found before Ray starts (cluster/preflight.py); a
    joined cluster's paths and proxies are on its nodes, and are not checked."""
    from cluster.grpc_tls import tls_file_problems
    from cluster.preflight import checkpoint_problems, port_problems

    return checkpoint_problems(cfg.models) + tls_file_problems(cfg.tls) + port_problems(
        cfg.host, {"grpc_port": cfg.grpc_port, "http_port": cfg.http_port})


def _grpc_tls_problems(cfg) -> list[str]:
    """With `tls` configured, what a local herd serve's gRPC port answers if not TLS: the set-up hook that
    makes it TLS (cluster.grpc_tls) works on Serve's internals, so its result is checked, never assumed."""
    from cluster.grpc_tls import tls_problem

    if cfg.tls is None:
        return []
    problem = tls_problem(cfg.host, cfg.grpc_port)
    return [] if problem is None else [f"tls is configured, but the gRPC proxy's {problem}; stopping rather "
                                       "than serve gRPC in plaintext"]


def _say_problems(problems: list[str]) -> bool:
    """Print each as a `herd: error:` line; whether there were any."""
    for line in problems:
        print(f"herd: error: {line}", file=sys.stderr)
    return bool(problems)


def bind_cpus(cfg):
    """Apply the config's cpu_binding (cluster.cpu_binding) before the local Ray starts: the config to serve, and
    the binding."""
    from cluster import cpu_binding

    binding = cpu_binding.bind_this_process(cfg.models, cfg.cpu_binding, cfg.cpu_binding_serving_cpus,
                                            say=lambda line: print(f"herd: CPU binding: {line}", file=sys.stderr))
    return cpu_binding.with_engine_cpu_cores(cfg, binding), binding


def _logs_dir() -> str | None:
    """This machine's Ray session log folder (Serve's replica, proxy and controller logs are in serve/)."""
    import ray

    node = ray._private.worker._global_node
    try:
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001
        return None


def _report_exposure(cfg, *, joined: bool) -> None:
    """Say plainly what listens wider than the config asks (docs/security.md)."""
    from cluster.config import is_loopback
    from cluster.local_ray import exposure_warnings

    if joined and cfg.tls is not None:
        print(f"herd: WARNING: on a joined Ray cluster, Serve's gRPC proxy (port {cfg.grpc_port}) serves plaintext: "
              "`tls` covers the HTTP proxy only there; terminate gRPC TLS in a gateway in front of it "
              "(docs/security.md)", file=sys.stderr)
    if cfg.tls is None and not is_loopback(cfg.host) and (cfg.api_keys or cfg.api_keys_file):
        print(f"herd: WARNING: no `tls`: API keys cross the network to {cfg.host} in plaintext; set tls (cert_file, "
              "key_file) or serve behind a gateway that terminates TLS (docs/security.md)", file=sys.stderr)
    if joined:  # the proxies run on the cluster's nodes, with the cluster's settings: nothing to check here
        if is_loopback(cfg.host):
            print(f"herd: WARNING: on a joined Ray cluster, Serve's gRPC proxy (port {cfg.grpc_port}) listens on "
                  "all interfaces ([::]) whatever `host` says (Ray 2.60), and the cluster's own settings decide "
                  "its message size limit (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE); firewall it or expose only a "
                  "gateway (docs/security.md)", file=sys.stderr)
        return
    try:
        warnings = exposure_warnings(cfg.host, {cfg.grpc_port, cfg.http_port})
    except Exception as e:  # noqa: BLE001 - never stop serving over a failed check; say it did not run
        print(f"herd: WARNING: could not check which addresses Ray listens on ({e!r})", file=sys.stderr)
        return
    for w in warnings:
        print(f"herd: WARNING: {w}", file=sys.stderr)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve models on Ray Serve (gRPC + OpenAI HTTP); no config = demo")
    p.add_argument("config", nargs="?", default=None, help="cluster config YAML (default: the embedded demo)")
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. 'auto'); default: start a local one")
    overrides = p.add_argument_group("config overrides", "each replaces the config's key of the same name")
    add_setting_flags(overrides, cluster_flag_fields(), show_default=False)
    models = p.add_argument_group("model overrides", "each sets the key of the same name of every model "
                                  "(engine settings, and capacity: docs/serving.md, Capacity)")
    add_setting_flags(models, model_flag_fields())
    p.set_defaults(func=cmd_serve)
    register_client(subparsers)
