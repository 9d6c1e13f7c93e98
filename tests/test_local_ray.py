"""A local `herd serve` Ray (cluster.local_ray.start_local_ray): every listening socket of the session is on
loopback — GCS, raylet, dashboard and its agents, metrics, workers, the Serve controller, both proxies and a
replica — the gRPC proxy takes herd's message size limit, and the HTTP proxy its connection cap."""
from __future__ import annotations

import os
import socket
import time
import urllib.request

import grpc
import pytest

from cluster.local_ray import (_covered, _rebind, exposure_warnings, is_loopback_ip, listening_sockets,
                               listening_sockets_outside_loopback, local_ray_options, ray_session_pids,
                               start_local_ray)
from tests.raw_sockets import closed_by_server
from tests.serve_fixtures import free_port, free_ports, stop_herd_cluster

MAX_GRPC_MESSAGE = 1 << 20
MAX_HTTP_CONNECTIONS = 32
MAX_HTTP_HEADER_BYTES = 4096
MAX_GRPC_CONNECTIONS = 16
GRPC_CONNECTION_IDLE_S = 4
# What a client that means to hold a gRPC connection without a call sends: HTTP/2's preface, its settings
# (none) and the acknowledgement of the server's.
HTTP2_PREFACE = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                 + b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")


@pytest.fixture(scope="module")
def local_serve():
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    from ray import serve

    from cluster.app import serve_start_options
    from cluster.config import ClusterConfig

    cfg = ClusterConfig.from_dict({"host": "127.0.0.1", **dict(zip(("grpc_port", "http_port"), free_ports(2))),
                                   "limits": {"max_grpc_message_bytes": MAX_GRPC_MESSAGE,
                                              "max_http_connections": MAX_HTTP_CONNECTIONS,
                                              "max_http_header_bytes": MAX_HTTP_HEADER_BYTES,
                                              "max_grpc_connections": MAX_GRPC_CONNECTIONS,
                                              "grpc_connection_idle_s": GRPC_CONNECTION_IDLE_S},
                                   "models": [{"name": "m", "path": "/nonexistent"}]})
    start_local_ray(num_cpus=2, include_dashboard=True, **local_ray_options(cfg), log_to_driver=False,
                    namespace="herd-local-ray-test")
    try:
        serve.start(**serve_start_options(cfg))

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Probe:  # a replica: Serve starts an inter-deployment gRPC server in each
            def __call__(self, request) -> str:
                return "ok"

        serve.run(Probe.bind(), name="probe", route_prefix="/probe")
        yield cfg
    finally:
        stop_herd_cluster()


@pytest.mark.slow
def test_every_session_socket_is_on_loopback(local_serve):
    cfg = local_serve
    pids = ray_session_pids()
    sockets = listening_sockets(pids)
    names = {s.process for s in sockets}
    # the check sees the whole session: core processes, Serve's actors, and the proxies' ports
    for expected in ("gcs_server", "raylet", "ray::ProxyActor", "ray::ServeController", "ray::DashboardAgent"):
        assert any(expected in n for n in names), (expected, sorted(names))
    assert any("ServeReplica" in n for n in names), sorted(names)
    ports = {s.port for s in sockets}
    assert {cfg.grpc_port, cfg.http_port} <= ports
    assert listening_sockets_outside_loopback(pids) == []
    assert exposure_warnings(cfg.host, {cfg.grpc_port, cfg.http_port}, pids) == []
    # ... and Serve still works through the rebound servers
    with urllib.request.urlopen(f"http://127.0.0.1:{cfg.http_port}/probe", timeout=30) as r:
        assert r.read() == b"ok"


@pytest.mark.slow
def test_no_second_server_can_share_the_proxies_ports(local_serve):
    """Serve binds its HTTP proxy with SO_REUSEPORT unless SERVE_SOCKET_REUSE_PORT_ENABLED=0, and then a second
    server on the same port (another herd serve) binds beside it and takes a share of its connections. A local
    herd serve turns it off: a second listener, even with SO_REUSEPORT, is refused. (Serve's gRPC proxy keeps
    SO_REUSEPORT whatever the variable says: Ray 2.60 passes grpc.so_reuseport as the string "0", which grpc
    does not read as false. herd serve's port check before start-up covers it.)"""
    import errno

    with socket.socket() as second:
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError) as bind:
            second.bind(("127.0.0.1", local_serve.http_port))
        assert bind.value.errno == errno.EADDRINUSE


@pytest.mark.slow
def test_serve_proxy_calls_replicas_over_grpc_by_default(local_serve):
    """serve_transport grpc (the default): Serve's proxy reads RAY_SERVE_PROXY_USE_GRPC=1 in its own process."""
    import psutil

    from cluster.local_ray import PROXY_USE_GRPC_ENV

    proxies = [psutil.Process(p) for p, cmd in _live_commands(ray_session_pids()).items() if "ray::ProxyActor" in cmd]
    assert proxies and all(p.environ().get(PROXY_USE_GRPC_ENV) == "1" for p in proxies)
    assert local_serve.serve_transport == "grpc"


@pytest.mark.slow
def test_grpc_proxy_takes_the_message_size_limit(local_serve):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{local_serve.grpc_port}",
                               options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as big:
            stub.Check(health_pb2.HealthCheckRequest(service="x" * (MAX_GRPC_MESSAGE + 1024)), timeout=30)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        try:  # a small request gets past the limit (no herd app here, so any answer but RESOURCE_EXHAUSTED)
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.slow
def test_idle_http_connections_cannot_take_the_proxy(local_serve):
    """Connections that send nothing, or half a request head, were held by Serve's HTTP proxy for ever, with no
    cap, until they took every file descriptor of the proxy process (cluster/proxy_http_connections.py). With
    limits.max_http_connections the proxy holds at most that many: each new one past it closes the one idle the
    longest, and a request on a new connection is still served."""
    idle = []
    for i in range(6 * MAX_HTTP_CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", local_serve.http_port), timeout=30)
        if i % 2:
            s.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\n")   # the head's end never comes
        idle.append(s)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{local_serve.http_port}/probe", timeout=30) as r:
            assert r.read() == b"ok"
        still_open = [s for s in idle if not closed_by_server(s, 0.3)]
        assert len(still_open) <= MAX_HTTP_CONNECTIONS
        assert idle[0] not in still_open and idle[-1] in still_open   # the longest idle went first
    finally:
        for s in idle:
            s.close()


@pytest.mark.slow
def test_a_request_head_past_its_bound_is_refused_431(local_serve):
    """uvicorn's httptools parser kept a header line that never ended, whatever its size; the proxy now answers
    431 past limits.max_http_header_bytes and closes the connection. A head within it is served."""
    with socket.create_connection(("127.0.0.1", local_serve.http_port), timeout=30) as s:
        s.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HTTP_HEADER_BYTES)
        assert s.recv(65536).startswith(b"HTTP/1.1 431 ")
        assert closed_by_server(s, 10)
    request = urllib.request.Request(f"http://127.0.0.1:{local_serve.http_port}/probe",
                                     headers={"X-Fine": "a" * (MAX_HTTP_HEADER_BYTES // 2)})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.read() == b"ok"


@pytest.mark.slow
def test_idle_grpc_connections_are_capped_and_closed(local_serve):
    """Serve's gRPC proxy kept every connection that finished its HTTP/2 handshake and made no call, with no
    cap, until they took every file descriptor of the proxy process (cluster/grpc_proxy_connections.py). With
    limits.max_grpc_connections gRPC closes a connection past the cap at once, and with
    limits.grpc_connection_idle_s the idle ones are closed after it; then a new client is served."""
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    held = []
    for _ in range(3 * MAX_GRPC_CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", local_serve.grpc_port), timeout=30)
        s.sendall(HTTP2_PREFACE)
        held.append(s)
    try:
        time.sleep(1)
        assert len([s for s in held if not closed_by_server(s, 0.3)]) <= MAX_GRPC_CONNECTIONS
        with urllib.request.urlopen(f"http://127.0.0.1:{local_serve.http_port}/probe", timeout=30) as r:
            assert r.read() == b"ok"                                  # the HTTP proxy is untouched
        deadline = time.monotonic() + GRPC_CONNECTION_IDLE_S + 10
        while any(not closed_by_server(s, 0.05) for s in held):
            assert time.monotonic() < deadline, "idle gRPC connections were not closed"
            time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{local_serve.grpc_port}") as channel:
            reply = serve_pb2_grpc.RayServeAPIServiceStub(channel).Healthz(serve_pb2.HealthzRequest(), timeout=30)
            assert reply.message == "success"
    finally:
        for s in held:
            s.close()


def test_exposure_warnings_report_a_wide_socket():
    with socket.socket() as wide, socket.socket() as local:
        wide.bind(("0.0.0.0", 0))
        wide.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        wide_port, local_port = wide.getsockname()[1], local.getsockname()[1]
        found = listening_sockets_outside_loopback([os.getpid()])
        assert [(s.ip, s.port) for s in found if s.port in (wide_port, local_port)] == [("0.0.0.0", wide_port)]
        # a serving port wider than a loopback host is reported, and says what to do
        warnings = exposure_warnings("127.0.0.1", {wide_port}, pids=[os.getpid()])
        assert len([w for w in warnings if f"port {wide_port} " in w]) == 1
        assert "wider than the configured host" in warnings[0] and "firewall" in warnings[0]
        # ... not when the host asks for every interface
        assert not [w for w in exposure_warnings("0.0.0.0", {wide_port}, pids=[os.getpid()])
                    if f"port {wide_port} " in w]
        # a non-serving port outside loopback is always reported
        assert [w for w in exposure_warnings("0.0.0.0", set(), pids=[os.getpid()]) if f"port {wide_port} " in w]


def test_loopback_and_rebind_rules(monkeypatch):
    assert is_loopback_ip("127.0.0.1") and is_loopback_ip("::1") and is_loopback_ip("::ffff:127.0.0.1")
    assert not is_loopback_ip("0.0.0.0") and not is_loopback_ip("::") and not is_loopback_ip("192.0.2.2")
    assert _covered("10.0.0.5", "0.0.0.0") and _covered("10.0.0.5", "10.0.0.5") and _covered("::1", "10.0.0.5")
    assert not _covered("::", "127.0.0.1") and not _covered("::", "10.0.0.5")
    monkeypatch.setenv("HERD_LOCAL_RAY_BIND", "127.0.0.1")
    monkeypatch.setenv("HERD_SERVE_GRPC_PORT", "9000")
    for host, bound in (("127.0.0.1", "127.0.0.1:9000"), ("0.0.0.0", "0.0.0.0:9000"), ("::", "[::]:9000"),
                        ("::1", "[::1]:9000"), ("localhost", "localhost:9000")):
        monkeypatch.setenv("HERD_SERVE_GRPC_HOST", host)
        assert _rebind("[::]:9000") == bound
    assert _rebind("[::]:0") == "127.0.0.1:0"          # Serve replicas' inter-deployment server
    assert _rebind("0.0.0.0:1234") == "127.0.0.1:1234"
    assert _rebind("10.1.2.3:9000") == "10.1.2.3:9000"  # an explicit address is left alone


def test_joining_an_address_where_nothing_listens_fails_at_once():
    """`herd status --address` / `herd serve --address` at a wrong address: ConnectionError naming it within the
    probe's time-out (ray.init retried for minutes, printing its own warnings)."""
    import time

    from cluster.local_ray import GCS_CONNECT_TIMEOUT_S, connect_ray

    port = free_port()   # bound and released: nothing listens there now
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Ray cluster at 127.0.0.1:{port} "):
        connect_ray(f"127.0.0.1:{port}")
    assert time.monotonic() - started < GCS_CONNECT_TIMEOUT_S + 5   # a guard against the old minutes-long wait


def _live_commands(pids) -> dict[int, str]:
    """pid -> command line of those still running: the dashboard forks short-lived helpers, and one can end
    (or be a zombie not yet reaped) between listing the pids and reading them."""
    import psutil

    commands = {}
    for pid in pids:
        try:
            commands[pid] = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
    return commands


def _thread_niceness(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.slow
def test_rays_background_processes_run_below_the_serving_ones(local_serve):
    """The dashboard (and what it forks), the agents and the monitors at niceness 19 in every thread; the GCS
    and the raylet keep theirs, and Serve's workers Ray's 15 steps below them (cluster/background_priority.py)."""
    import psutil

    from cluster.background_priority import BACKGROUND_NICENESS, background_pids

    import ray
    from ray._private import ray_constants

    background = _live_commands(background_pids())
    for expected in ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/dashboard.py"):
        assert any(expected in n for n in background.values()), (expected, sorted(background.values()))
    # The monitors this driver started, those still running: in two CI-like runs the log monitor had ended
    # (a zombie in one, not found in the other) by the time this test ran.
    node = ray._private.worker._global_node
    monitors = [info.process.pid
                for kind in (ray_constants.PROCESS_TYPE_LOG_MONITOR, ray_constants.PROCESS_TYPE_MONITOR)
                for info in node.all_processes.get(kind, ()) if info.process.poll() is None]
    assert monitors and set(monitors) <= set(background), (monitors, sorted(background.values()))
    for pid, command in background.items():
        try:
            niceness = _thread_niceness(pid)
        except FileNotFoundError:  # ended since it was read
            continue
        assert niceness == {BACKGROUND_NICENESS}, (pid, command)
    # Niceness relative to this process's: a CI runner may start the suite at another base than 0.
    base = os.getpriority(os.PRIO_PROCESS, 0)
    session = _live_commands(p for p in ray_session_pids() if p != os.getpid())
    core = [p for p, cmd in session.items() if "gcs_server" in cmd or "raylet/raylet" in cmd]
    assert len(core) == 2 and all(_thread_niceness(p) == {base} for p in core)
    proxies = [p for p, cmd in session.items() if "ray::ProxyActor" in cmd]
    ray_worker_niceness = 15  # the raylet's nice(15) for every worker it starts
    assert proxies and all(psutil.Process(p).nice() == min(base + ray_worker_niceness, 19) for p in proxies)
