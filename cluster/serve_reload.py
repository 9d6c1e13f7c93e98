"""`herd serve CONFIG` reloads CONFIG on SIGHUP (`kill -HUP <pid>`, systemd's `ExecReload`): the models'
settings change without a restart, and no request in flight is lost.

Serve updates the application in place (a rolling update). Each deployment whose settings changed gets new
replicas; the ingress does too (its arguments hold the config); the others keep theirs. Serve stops old
replicas before it starts their replacements (its `max_surge_percent` is 0 by default, and herd does not set
it yet), a fifth of a deployment's replicas at a time (at least one),
and each stops the way a scale-down stops it: no new work, its open streams finished within
`graceful_shutdown_timeout_s` (tests/test_autoscale_burst.py: a redeploy under 32 open streams;
tests/test_serve_startup.py: a reload). So a deployment of one replica has none that takes new requests
while its replacement starts: they wait in the caller's queue (seconds for a small model, the load time of
the weights for a big one) rather than fail, unless their deadline is shorter. If the new replicas fail to
start, Serve keeps the old ones it had not stopped yet (none, for a deployment of one replica) and herd serve
says why (ReloadFailed); reloading a config that works brings the model back.

What a reload cannot change is what Serve's proxies and the local Ray were started with (host, ports, `tls`,
`request_timeout_s`, reflection, the transport, the gRPC message limit) and the CPU binding of a local
herd serve. A new config that changes them is refused, naming the keys, and herd serve goes on serving the
config it has. So is one that does not parse or validate, or (local) whose checkpoints or TLS files are
missing: the same checks as at start.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional


class ReloadRefused(Exception):
    """The new config is not deployed; the one being served stays (the message says why)."""


class ReloadFailed(Exception):
    """Serve could not deploy the new config (the message has the deployments' failures; module doc)."""


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


def deploy(new, *, app_name: str, route_prefix: str, logs_dir: Optional[str]) -> float:
    """Update the running application to `new` (Serve's in-place update; module doc). Seconds it took, or
    ReloadFailed with the deployments' failures."""
    from ray import serve

    from cluster.app import build_app
    from cluster.startup import DeployProgress, deploy_failures

    started = time.monotonic()
    progress = DeployProgress(new, app_name, logs_dir, from_now=True).start()
    try:
        serve.run(build_app(new), name=app_name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as e:   # Serve's "Deploying application herd failed"
        raise ReloadFailed("; ".join(deploy_failures(app_name)) or str(e)) from None
    finally:
        progress.stop()
    return time.monotonic() - started

