"""`herd serve --address`: herd's application on a Ray cluster it joins, where Serve may already run, with its
own proxies and applications beside herd's.

Serve applies its proxies' options (ports, the gRPC servicer functions that make herd's services callable)
only when it starts; `serve.start()` on a cluster where it runs keeps them and says so in one INFO line. So
before deploying, herd looks at the Serve it joins: without herd's gRPC services on its proxy, herd's front
door would answer UNIMPLEMENTED, and an application already named `herd` (another herd serve, a RayService)
would be replaced and later deleted by this one. Both stop herd serve with the reason. Other ports than the
config's are adopted, with a warning, so the summary names the addresses that answer.

At the end, herd serve deletes only its own application (after draining it). It shuts Serve down only when it
started Serve and no other application runs there: `serve.shutdown()` ends every application on the cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.app import APP_NAME, GRPC_SERVICER_FUNCTIONS

ROUTE_PREFIX = "/"   # herd's application's (herd serve deploys it there)


@dataclass(frozen=True)
class RunningServe:
    """What a cluster's running Serve exposes, read from its controller."""
    grpc_port: int
    http_port: int
    grpc_servicer_functions: tuple[str, ...]
    applications: tuple[str, ...]
    route_prefixes: tuple[str, ...] = ()   # the applications' HTTP route prefixes

    def problems(self) -> list[str]:
        """Why herd serve cannot deploy onto this Serve (each one line)."""
        out = []
        missing = [f for f in GRPC_SERVICER_FUNCTIONS if f not in self.grpc_servicer_functions]
        if missing:
            out.append(f"Serve already runs on this Ray cluster, and its gRPC proxy (port {self.grpc_port}) lacks "
                       f"herd's services ({', '.join(missing)}): Serve sets its proxies' options only when it "
                       "starts. Start Serve with them (docs/kubernetes.md lists its grpc_servicer_functions) or "
                       "shut it down first")
        if APP_NAME in self.applications:
            out.append(f"an application named {APP_NAME!r} already runs on this Ray cluster (another herd serve "
                       "or a RayService); deploying would replace it")
        elif ROUTE_PREFIX in self.route_prefixes:
            out.append(f"another application on this Ray cluster's Serve has the HTTP route prefix {ROUTE_PREFIX!r} "
                       "that herd's application takes")
        return out

    def adopt(self, cfg) -> tuple[object, list[str]]:
        """The config with this Serve's proxy ports (the addresses that will answer), and a warning for each
        port the config asked for in vain."""
        warnings = []
        if cfg.grpc_port != self.grpc_port:
            warnings.append(f"Serve already runs on this Ray cluster: its gRPC proxy keeps port {self.grpc_port} "
                            f"(the config's grpc_port {cfg.grpc_port} is not used)")
        if cfg.http_port != self.http_port:
            warnings.append(f"Serve already runs on this Ray cluster: its HTTP proxy keeps port {self.http_port} "
                            f"(the config's http_port {cfg.http_port} is not used)")
        return cfg.model_copy(update={"grpc_port": self.grpc_port, "http_port": self.http_port}), warnings


def running_serve() -> RunningServe | None:
    """The connected cluster's Serve, or None when it does not run there."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:   # no such actor: Serve has not started on this cluster
        return None
    grpc_config, http_config = ray.get([controller.get_grpc_config.remote(), controller.get_http_config.remote()])
    routes = _route_prefixes()
    return RunningServe(
        grpc_port=grpc_config.port, http_port=http_config.port,
        grpc_servicer_functions=tuple(grpc_config.grpc_servicer_functions or ()),
        applications=tuple(sorted(routes)), route_prefixes=tuple(p for p in routes.values() if p))


def _route_prefixes() -> dict[str, str | None]:
    """Each application on the connected cluster's Serve and its HTTP route prefix (None: no HTTP route)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    return {name: app.route_prefix for name, app in details.applications.items()}


def _applications() -> list[str]:
    """The names of the applications on the connected cluster's Serve."""
    return sorted(_route_prefixes())


def stop_serve_unless_shared(started_here: bool) -> str | None:
    """When herd serve ends on a joined cluster: delete herd's application if it is still there (a deploy that
    failed or was interrupted; a drained one is gone already), then shut Serve down when this herd serve
    started it and nothing else runs on it; otherwise leave it running and return why, for the operator."""
    from ray import serve

    if APP_NAME in _applications():
        serve.delete(APP_NAME)
    if not started_here:
        return "Serve keeps running on the cluster (it was running before herd serve joined)"
    others = [name for name in _applications() if name != APP_NAME]
    if others:
        return f"Serve keeps running on the cluster for its other applications: {', '.join(others)}"
    serve.shutdown()
    return None
