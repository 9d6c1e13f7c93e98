"""Serve's gRPC proxy holds a bounded number of connections, and closes those that carry no call for long.

Serve builds its gRPC proxy's server with fixed options (Ray 2.60, grpc_util.gRPCGenericServer: the message
limits only), so gRPC's defaults hold: no cap on connections and no idle timeout. Measured on a local herd serve:
~24,000 TCP connections that sent the HTTP/2 preface and settings and then nothing (no call, so no API key is
asked for) were kept until the client let go; they took every file descriptor of the proxy process, and the
HTTP proxy, which runs in the same process, and gRPC both stopped answering. (Connections that never finish the
handshake are gRPC's handshake timeout's: the proxy recovered from those by itself.)

Installed in a Ray worker before it takes work (cluster.grpc_proxy_preload), `install` adds two of gRPC's own
options to Serve's gRPC proxy server when that worker builds one:
- `grpc.max_allowed_incoming_connections`: `HERD_GRPC_MAX_CONNECTIONS` (default 10,000, at most 40% of the
  process's open-file limit: cluster.proxy_http_connections.within_open_files). gRPC closes a connection
  that opens past it at once; clients see UNAVAILABLE and retry.
- `grpc.max_connection_idle_ms`: `HERD_GRPC_CONNECTION_IDLE_S` (default 300): a connection with no call in
  flight for that long gets GOAWAY and is closed; a client's channel reconnects on its next call by itself.
Unlike the HTTP proxy's cap, gRPC's refuses the newcomer and does not close the longest idle connection, so
while idle connections fill the cap new gRPC connections are refused for up to the idle timeout; calls on the
open connections, the HTTP proxy and the health of the process go on.

How it gets there (Serve calls herd's servicer functions only after it has built the server):
- the raylet imports the modules of Ray's `preload_python_modules` into every Python worker before it takes
  work; Ray reads that setting from `RAY_preload_python_modules` where the raylet starts: a local herd serve
  sets it for the Ray it starts (cluster.local_ray), the Helm chart on every Ray container;
- the limits travel as environment variables as well (the local Ray's runtime_env, the chart's env), from the
  cluster config's `limits.max_grpc_connections` and `limits.grpc_connection_idle_s`.

Imported by every Ray worker: keep the imports light (grpc's aio server module, when installed).
"""
from __future__ import annotations

import os
from typing import Sequence

from cluster.proxy_http_connections import within_open_files

MAX_CONNECTIONS_ENV = "HERD_GRPC_MAX_CONNECTIONS"
IDLE_ENV = "HERD_GRPC_CONNECTION_IDLE_S"
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_IDLE_S = 300.0
# Ray's name for the modules its workers import before they take work (the raylet reads RAY_<name>).
PRELOAD_ENV = "RAY_preload_python_modules"
PRELOAD_MODULE = "cluster.grpc_proxy_preload"
# The class of Serve's gRPC proxy server; only its options change (replicas' servers keep theirs).
SERVE_PROXY_SERVER_CLASS = "gRPCGenericServer"


def proxy_server_options(environ=os.environ) -> list[tuple[str, int]]:
    """The options this module adds to Serve's gRPC proxy server, from the environment."""
    cap = within_open_files(int(environ.get(MAX_CONNECTIONS_ENV) or DEFAULT_MAX_CONNECTIONS), MAX_CONNECTIONS_ENV)
    idle_s = float(environ.get(IDLE_ENV) or DEFAULT_IDLE_S)
    return [("grpc.max_allowed_incoming_connections", cap), ("grpc.max_connection_idle_ms", int(idle_s * 1000))]


def with_preload(environ_value: str | None) -> str:
    """RAY_preload_python_modules with PRELOAD_MODULE added (other modules already named are kept)."""
    modules = [m for m in (environ_value or "").split(",") if m]
    return ",".join(modules if PRELOAD_MODULE in modules else modules + [PRELOAD_MODULE])


def install() -> None:
    """Serve's gRPC proxy servers built in this process from now on get proxy_server_options (module doc)."""
    from grpc.aio import _server

    server_init = _server.Server.__init__
    if getattr(server_init, "herd_connection_options", False):
        return

    def __init__(self, thread_pool, generic_handlers, interceptors, options: Sequence, *args, **kwargs):
        if type(self).__name__ == SERVE_PROXY_SERVER_CLASS:
            added = proxy_server_options()
            names = {name for name, _ in added}
            options = [o for o in options if o[0] not in names] + added
        server_init(self, thread_pool, generic_handlers, interceptors, options, *args, **kwargs)

    __init__.herd_connection_options = True
    _server.Server.__init__ = __init__
