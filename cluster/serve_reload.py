"""`herd serve CONFIG` reloads CONFIG on SIGHUP (`kill -HUP <pid>`, systemd's `ExecReload`): the models'
settings change without a restart, and no request in flight is lost.

Serve updates the application in place (a rolling update; cluster.app_deploy submits it and waits). Each
deployment whose settings changed gets new replicas; the ingress does too (its arguments hold the config); the
others keep theirs. Old replicas stop the way a scale-down stops them: no new work, their open streams
finished within `graceful_shutdown_timeout_s` (tests/test_autoscale_burst.py: a redeploy under 32 open
streams; tests/test_serve_startup.py: a reload).
- With `max_surge_percent` (the ingress's default 100) Serve starts the new replicas first and stops old ones
  as new ones run. Without room for them the update waits, and the old replicas go on serving: herd serve
  says which replicas wait for which resources, and a newer SIGHUP (a corrected config) or Ctrl-C ends the wait.
- With a model's default 0 (Serve's), Serve stops old replicas before it starts their replacements, a fifth
  of a deployment's replicas at a time (at least one). A deployment of one replica then has none that takes new
  requests while its replacement starts: they wait in the caller's queue (seconds for a small model, the load
  time of the weights for a big one), up to `serve_max_queued_requests` of them (then RESOURCE_EXHAUSTED).
If the new replicas fail to start, Serve keeps the old ones it had not stopped yet (every one with a surge,
none for a deployment of one replica without) and herd serve says why (app_deploy.DeployFailed); reloading
a config that works brings the model back.

What a reload cannot change is what Serve's proxies and the local Ray were started with (host, ports, `tls`,
`request_timeout_s`, reflection, the transport, the gRPC message limit) and the CPU binding of a local
herd serve. A new config that changes them is refused, naming the keys, and herd serve goes on serving the
config it has. So is one that does not parse or validate, or (local) whose checkpoints or TLS files are
missing: the same checks as at start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


class ReloadRefused(Exception):
    """The new config is not deployed; the one being served stays (the message says why)."""


@dataclass(frozen=True)
class Started:
    """What herd serve started with that a reload must keep: the proxies' and the local Ray's options, and the
    CPU binding (None on a joined cluster, where herd serve started neither)."""
    proxy_options: Any
    local_ray_options: Optional[dict]
    cpus: Optional[frozenset]       # the CPUs herd serve could use before it bound itself (local only)
    binding: Any                    # cluster.cpu_binding.CpuBinding or None


def started_with(cfg, *, local: bool, cpus: Optional[frozenset], binding) -> Started:
    from cluster.app import serve_start_options
    from cluster.local_ray import local_ray_options

    return Started(proxy_options=serve_start_options(cfg), local_ray_options=local_ray_options(cfg) if local else None,
                   cpus=cpus, binding=binding)


def checked_config(load: Callable[[], Any], current, started: Started):
    """The new config (with the CPU binding's engine cores, as at start), or ReloadRefused."""
    from cluster.app import serve_start_options
    from cluster.local_ray import local_ray_options
    from workers.errors import HerdError

    try:
        new = load()
    except (HerdError, OSError) as e:
        raise ReloadRefused(str(e)) from None
    if serve_start_options(new) != started.proxy_options or (
            started.local_ray_options is not None and local_ray_options(new) != started.local_ray_options):
        raise ReloadRefused("it changes what Serve's proxies or the local Ray were started with "
                            f"({', '.join(_changed_cluster_keys(current, new)) or 'their options'}); restart "
                            "herd serve to apply that")
    problems = _file_problems(new) if started.local_ray_options is not None else []
    if problems:
        raise ReloadRefused("; ".join(problems))
    return _with_binding(new, current, started)


def _file_problems(cfg) -> list[str]:
    """The start-up checks that still apply to a running local server (its ports are its own now). On a joined
    cluster the files are on its nodes, and herd serve does not check them at start either."""
    from cluster.grpc_tls import tls_file_problems
    from cluster.preflight import checkpoint_problems

    return checkpoint_problems(cfg.models) + tls_file_problems(cfg.tls)


def _with_binding(new, current, started: Started):
    """A local herd serve's processes stay where it bound them: the new models must fit the same plan."""
    from cluster import cpu_binding

    if started.cpus is None:
        return new
    plan = cpu_binding.plan(new.models, started.cpus, new.cpu_binding, new.cpu_binding_serving_cpus)
    before = started.binding
    if _placement(plan) != _placement(before):
        raise ReloadRefused("it changes the CPU binding (where Ray and Serve run: "
                            f"{_describe(before)} -> {_describe(plan)}); restart herd serve to apply that")
    return cpu_binding.with_engine_cpu_cores(new, plan)


def _placement(binding) -> Optional[frozenset]:
    return binding.serving if binding is not None and binding.active else None


def _describe(binding) -> str:
    from cluster.cpu_binding import format_cpus

    serving = _placement(binding)
    return "every CPU" if serving is None else f"CPU {format_cpus(serving)}"


def _changed_cluster_keys(old, new) -> list[str]:
    """The cluster-level keys (not a model's) whose values differ."""
    before, after = old.model_dump(exclude={"models"}), new.model_dump(exclude={"models"})
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
