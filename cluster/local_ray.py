"""A private single-node Ray whose every listening socket is on loopback (what `herd serve` starts locally).

    start_local_ray(num_cpus=..., serve_grpc_host=cfg.host, serve_grpc_port=cfg.grpc_port, ...)
    listening_sockets_outside_loopback(ray_session_pids())   # -> [Listener(pid, process, ip, port), ...]
    exposure_warnings(cfg.host, {cfg.grpc_port, cfg.http_port})  # what `herd serve` prints after start

What binds where in Ray 2.60 and what keeps it on 127.0.0.1 (observed with psutil, docs/security.md):
- `ray.init(_node_ip_address="127.0.0.1")` alone does not: Ray turns a loopback node address into the
  machine's external one (services.resolve_ip_for_localhost) unless `ray_constants.ENABLE_RAY_CLUSTER` is off
  (its Windows/macOS default). With the external node address the GCS, raylet and every worker's gRPC server
  listen on [::], the dashboard agent's gRPC and metrics ports and the autoscaler/dashboard metrics ports on
  0.0.0.0/[::], the agent's HTTP port and the runtime-env agent on the external address. With the node
  address really 127.0.0.1 all of them bind 127.0.0.1 (the C++ servers as ::ffff:127.0.0.1), so
  start_local_ray turns that constant off for the duration of ray.init.
- Serve binds two gRPC servers to "[::]" whatever the options say: the gRPC proxy (grpc_util.start_grpc_server)
  and every replica's inter-deployment server ("[::]:0", replica.py). A worker_process_setup_hook (runs in
  every worker of this job, the detached Serve controller and proxy included: they inherit the job's
  runtime_env) rebinds wildcard addresses: the Serve gRPC port to `serve_grpc_host`, anything else to
  127.0.0.1. `exposure_warnings` checks the result after start, so a Ray upgrade that bypasses the hook is
  reported, not silently assumed. With `serve_grpc_tls` the hook also makes the Serve gRPC port TLS
  (cluster.grpc_tls); herd serve checks the handshake after start.
- The proxy's gRPC receive (and send) limit is RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, and whether it calls the ingress
  over Serve's gRPC transport is RAY_SERVE_PROXY_USE_GRPC (cluster config `serve_transport`), both read in the
  proxy process; they travel in the job's runtime_env env_vars (the driver's own environment is left alone),
  as do the proxies' connection limits (proxy_connection_env: cluster.proxy_http_connections,
  cluster.grpc_proxy_connections, which the workers install from RAY_preload_python_modules).

This module is imported by every Ray worker of the session (the setup hook): keep its imports light.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from typing import Any, Iterable, NamedTuple, Optional

from cluster import grpc_proxy_connections, proxy_http_connections

LOOPBACK = "127.0.0.1"
# Read by the worker setup hook (set through the job's runtime_env env_vars).
_BIND_ENV = "HERD_LOCAL_RAY_BIND"              # where wildcard binds in workers go
_GRPC_HOST_ENV = "HERD_SERVE_GRPC_HOST"        # ... except the Serve gRPC proxy's port, which goes here
_GRPC_PORT_ENV = "HERD_SERVE_GRPC_PORT"
_SETUP_HOOK = "cluster.local_ray._worker_setup_hook"
_WILDCARDS = ("0.0.0.0", "::", "[::]", "")
# Serve (2.60) reads it in its proxy process: "1" = the proxy calls the ingress over Serve's gRPC transport.
PROXY_USE_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"
# The cluster config's `serve_transport` values and its default (here, where every user can import it lightly).
SERVE_TRANSPORTS = ("grpc", "ray")
DEFAULT_SERVE_TRANSPORT = "grpc"


class Listener(NamedTuple):
    """A listening TCP socket of a Ray session process."""
    pid: int
    process: str   # process name as `ps` shows it (Ray workers rename themselves, e.g. ray::ProxyActor)
    ip: str
    port: int


def local_ray_options(cfg) -> dict[str, Any]:
    """start_local_ray's options that a herd cluster config decides (cluster.config.ClusterConfig): the gRPC
    proxy's host, port, message limit and TLS, the proxies' connection limits, and Serve's transport. A reload
    keeps them (they are fixed once the local Ray runs: cluster.serve_reload)."""
    return {"grpc_max_message_bytes": cfg.limits.max_grpc_message_bytes,
            "proxy_connection_env": proxy_connection_env(cfg.limits), "serve_grpc_host": cfg.host,
            "serve_grpc_port": cfg.grpc_port, "serve_transport": cfg.serve_transport, "serve_grpc_tls": cfg.tls}


def proxy_connection_env(limits) -> dict[str, str]:
    """The environment that carries the config's connection limits to Serve's proxies (limits: a LimitsConfig):
    cluster.proxy_http_connections and cluster.grpc_proxy_connections read it in the proxy process."""
    return {proxy_http_connections.MAX_CONNECTIONS_ENV: str(limits.max_http_connections),
            proxy_http_connections.MAX_HEAD_BYTES_ENV: str(limits.max_http_header_bytes),
            grpc_proxy_connections.MAX_CONNECTIONS_ENV: str(limits.max_grpc_connections),
            grpc_proxy_connections.IDLE_ENV: str(limits.grpc_connection_idle_s)}


def start_local_ray(*, num_cpus: Optional[float] = None, include_dashboard: bool = True,
                    grpc_max_message_bytes: Optional[int] = None,
                    proxy_connection_env: Optional[dict[str, str]] = None, serve_grpc_host: str = LOOPBACK,
                    serve_grpc_port: Optional[int] = None, log_to_driver: bool = True,
                    namespace: Optional[str] = None, logging_level: int = logging.INFO,
                    serve_transport: str = DEFAULT_SERVE_TRANSPORT, serve_grpc_tls: Any = None) -> None:
    """Start a private single-node Ray (never joins a running cluster) with every port on 127.0.0.1.

    serve_grpc_host/port: where Serve's gRPC proxy is to listen (the cluster config's host and grpc_port);
    without a port every wildcard bind in a worker goes to loopback. grpc_max_message_bytes: the gRPC proxy's
    message size limit (Serve's default is 2 GiB). proxy_connection_env: the proxies' connection limits
    (proxy_connection_env(); their defaults without it), which the workers of this Ray apply to Serve's gRPC
    proxy from RAY_preload_python_modules (cluster.grpc_proxy_connections). The dashboard, when included, is on
    127.0.0.1:8265 (or the next free port). log_to_driver / logging_level: ray.init's (False / WARNING keep
    Ray's and its workers' lines in the session's log files, off this process's terminal). serve_transport: the
    cluster config's (`grpc`: Serve's proxies call the ingress over gRPC). serve_grpc_tls: the config's `tls`
    (a TLSConfig or None): the gRPC proxy's port serves TLS with its certificate and key (needs
    serve_grpc_port). Ray's background processes (dashboard, agents, monitors) then run at the lowest priority
    (cluster.background_priority)."""
    import ray

    from cluster.grpc_tls import tls_env

    if serve_grpc_tls is not None and serve_grpc_port is None:
        raise ValueError("serve_grpc_tls needs serve_grpc_port: the hook finds the proxy's port by its number")

    # SERVE_SOCKET_REUSE_PORT_ENABLED=0: Serve's proxies bind with SO_REUSEPORT by default, so a second server
    # on the same port (another herd serve) would bind beside them and take a share of the connections,
    # silently. One proxy per port here: a second one fails to bind instead. That holds for the HTTP proxy;
    # Ray 2.60 hands the gRPC proxy grpc.so_reuseport as the string "0", which grpc does not take as false, so
    # there herd serve's port check before start-up (cluster/preflight.py) is what refuses a second server.
    env_vars = {_BIND_ENV: LOOPBACK, _GRPC_HOST_ENV: serve_grpc_host,
                PROXY_USE_GRPC_ENV: "1" if serve_transport == "grpc" else "0",
                "SERVE_SOCKET_REUSE_PORT_ENABLED": "0", **tls_env(serve_grpc_tls)}
    if serve_grpc_port is not None:
        env_vars[_GRPC_PORT_ENV] = str(serve_grpc_port)
    if grpc_max_message_bytes is not None:
        env_vars["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(int(grpc_max_message_bytes))
    env_vars.update(proxy_connection_env or {})
    # Ray replaces a loopback _node_ip_address by the external address when clusters are enabled (Linux);
    # with the node address really 127.0.0.1, every Ray process binds loopback.
    # A node that does not come up in Ray's fixed wait is started once more (cluster.ray_node_start).
    from cluster.ray_node_start import init_local_ray

    with _loopback_addresses_kept(), _token_notice_quiet(), _workers_preload():
        init_local_ray(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                       dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, namespace=namespace,
                       log_to_driver=log_to_driver, logging_level=logging_level,
                       runtime_env={"worker_process_setup_hook": _SETUP_HOOK, "env_vars": env_vars})
    # Its dashboard, agents and monitors below the serving processes (cluster/background_priority.py).
    from cluster.background_priority import lower_background_priority

    lower_background_priority()


def _workers_preload():
    """While inside, a Ray started here has its workers import cluster.grpc_proxy_preload before they take work
    (the raylet reads RAY_preload_python_modules when it starts; the driver's environment is restored after)."""
    name = grpc_proxy_connections.PRELOAD_ENV
    return env_set(name, grpc_proxy_connections.with_preload(os.environ.get(name)))


@contextlib.contextmanager
def env_set(name: str, value: str):
    """While inside, this process's environment has `name` set to `value`; as it was after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _token_notice_quiet():
    """Ray's "token authentication is enabled ... set RAY_AUTH_MODE=disabled to opt out" notice is not shown:
    herd keeps token authentication on deliberately (docs/security.md)."""
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def _loopback_addresses_kept():
    """While inside, Ray keeps 127.0.0.1 addresses as they are (ray_constants.ENABLE_RAY_CLUSTER off)."""
    from ray._private import ray_constants

    had = hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if had:
            ray_constants.ENABLE_RAY_CLUSTER = saved
        else:
            del ray_constants.ENABLE_RAY_CLUSTER


def connect_ray(address: Optional[str] = None, **init_kwargs) -> None:
    """Join a running Ray cluster as a driver: `address` (HOST:PORT, ray://..., or None / "auto": $RAY_ADDRESS,
    else the cluster this machine runs). A loopback address — a local `herd serve`'s private Ray, which
    listens on 127.0.0.1 only — is used as it is: Ray would otherwise swap 127.0.0.1 for the machine's
    external address, where nothing listens."""
    import ray
    from ray._private import services

    resolved = services.get_ray_address_from_environment(address or "auto", None)
    host = resolved.rpartition(":")[0] if "://" not in resolved else ""
    if host:
        _check_reachable(resolved)
    if host == "localhost" or (host and is_loopback_ip(host)):
        # A cluster on this machine: its token (~/.ray/auth_token) is used as Ray uses it for a cluster it
        # finds with "auto" (Ray does not for an explicit address: set RAY_AUTH_MODE=token for a remote one).
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)

        with _token_notice_quiet():
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        with _loopback_addresses_kept():
            ray.init(address=resolved, _node_ip_address=LOOPBACK, **init_kwargs)
    else:
        ray.init(address=resolved, **init_kwargs)


# How long a driver waits for a Ray cluster's GCS port to accept a connection before saying there is none.
GCS_CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """ConnectionError at once when nothing accepts connections at `address` (HOST:PORT): ray.init would retry
    an unreachable GCS for minutes, printing its own warnings, before it gave up."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise ConnectionError(f"no Ray cluster at {address} ({e})") from None


def _bind_host(host: str) -> str:
    """`host` as the host part of a gRPC listening address."""
    if host in ("", "::", "[::]"):
        return "[::]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _rebind(address: str) -> str:
    """A worker's wildcard gRPC address rebound per the HERD_* env vars (other addresses unchanged)."""
    host, sep, port = address.rpartition(":")
    if not sep or host not in _WILDCARDS:
        return address
    if port == os.environ.get(_GRPC_PORT_ENV):
        return f"{_bind_host(os.environ.get(_GRPC_HOST_ENV) or LOOPBACK)}:{port}"
    return f"{_bind_host(os.environ.get(_BIND_ENV) or LOOPBACK)}:{port}"


def _worker_setup_hook() -> None:
    """Runs in every worker process of a start_local_ray session (Serve controller, proxy, replicas, actors):
    rebinds wildcard gRPC listening addresses (Serve's gRPC proxy and replica servers use "[::]") and makes the
    Serve gRPC port TLS when the session has a certificate (cluster.grpc_tls). (Serve's log of each answered
    call is kept to one line by cluster.grpc_proxy_preload, which these workers import first.)"""
    if not os.environ.get(_BIND_ENV):
        return
    try:
        from grpc.aio import _server

        server_cls = _server.Server
        if getattr(server_cls, "_herd_rebind", False):
            return
        insecure, secure = server_cls.add_insecure_port, server_cls.add_secure_port
    except Exception:  # never fail a worker's start; exposure_warnings reports what actually listens
        return

    def add_insecure_port(self, address):
        # Reading the certificate may raise: then the proxy does not start (herd serve says so), never plaintext.
        credentials = _serve_grpc_tls_credentials(address)
        if credentials is not None:
            return secure(self, _rebind(address), credentials)
        return insecure(self, _rebind(address))

    def add_secure_port(self, address, server_credentials):
        return secure(self, _rebind(address), server_credentials)

    server_cls.add_insecure_port, server_cls.add_secure_port = add_insecure_port, add_secure_port
    server_cls._herd_rebind = True


def _serve_grpc_tls_credentials(address: str):
    """The session's TLS credentials when `address` is the Serve gRPC proxy's port, else None."""
    port = address.rpartition(":")[2]
    if not port or port != os.environ.get(_GRPC_PORT_ENV):
        return None
    from cluster.grpc_tls import server_credentials_from_env

    return server_credentials_from_env()


def is_loopback_ip(ip: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1, how gRPC's dual-stack sockets show)."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]").split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def ray_session_pids() -> set[int]:
    """This process and every process of the local Ray session it started (GCS, raylet, dashboard and its
    agents, log monitor, autoscaler monitor, workers): processes whose command line names the session
    folder, with their descendants (workers rename themselves, e.g. ray::ProxyActor)."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    session_dir = node.get_session_dir_path() if node is not None else None
    pids = {os.getpid()}
    if not session_dir:
        return pids
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session_dir in arg for arg in proc.info["cmdline"] or ()):
                pids.add(proc.pid)
                pids.update(child.pid for child in proc.children(recursive=True))
        except psutil.Error:
            continue
    return pids


def listening_sockets(pids: Iterable[int]) -> list[Listener]:
    """The listening TCP sockets (IPv4 and IPv6) of these processes."""
    import psutil

    found = []
    for pid in sorted(set(pids)):
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found += [Listener(pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def listening_sockets_outside_loopback(pids: Iterable[int]) -> list[Listener]:
    """The listening TCP sockets of these processes reachable from other machines (not on loopback)."""
    return [s for s in listening_sockets(pids) if not is_loopback_ip(s.ip)]


def _covered(ip: str, host: str) -> bool:
    """Does a socket on `ip` listen no wider than `host` asks for?"""
    if is_loopback_ip(ip):
        return True
    if host in _WILDCARDS:
        return True
    try:
        return ipaddress.ip_address(ip.strip("[]")) == ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False   # a host name: only loopback counts as certainly no wider


def unexpected_listeners(host: str, serving_ports: Iterable[int], pids: Optional[Iterable[int]] = None
                         ) -> list[Listener]:
    """Sockets of the local Ray session that listen wider than they should: the Serve proxies' ports (HTTP,
    gRPC) wider than `host`, everything else anywhere but loopback."""
    ports = set(serving_ports)
    return [s for s in listening_sockets_outside_loopback(ray_session_pids() if pids is None else pids)
            if not (s.port in ports and _covered(s.ip, host))]


def exposure_warnings(host: str, serving_ports: Iterable[int], pids: Optional[Iterable[int]] = None
                      ) -> list[str]:
    """Human-readable warnings for `unexpected_listeners` (empty when everything binds as configured)."""
    ports = set(serving_ports)
    out = []
    for s in unexpected_listeners(host, ports, pids):
        what = f"port {s.port} of {s.process} (pid {s.pid}) listens on {s.ip or '*'}"
        if s.port in ports:
            out.append(f"{what}, wider than the configured host {host!r}: it is reachable from other machines. "
                       "Block it with a firewall or serve behind a gateway that alone is exposed "
                       "(docs/security.md).")
        else:
            out.append(f"{what}: a Ray-internal port reachable from other machines. Block it with a firewall "
                       "(docs/security.md).")
    return out
