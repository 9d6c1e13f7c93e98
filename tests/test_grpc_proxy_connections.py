"""cluster.grpc_proxy_connections: Serve's gRPC proxy server (a grpc.aio server of the class gRPCGenericServer)
gets gRPC's connection cap and idle timeout from the environment; every other gRPC server keeps its options.
A real grpc.aio server over loopback; Serve's own proxy with them is tests/test_local_ray.py's."""
from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster import grpc_proxy_connections
from cluster.grpc_proxy_connections import install, proxy_server_options, with_preload
from tests.raw_sockets import closed_by_server

HTTP2_PREFACE = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                 + b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")


def test_options_come_from_the_environment_with_defaults():
    import resource

    share = int(resource.getrlimit(resource.RLIMIT_NOFILE)[0] * 0.4)   # the cap's bound on this machine
    assert dict(proxy_server_options({})) == {"grpc.max_allowed_incoming_connections": min(10_000, share),
                                              "grpc.max_connection_idle_ms": 300_000}
    assert dict(proxy_server_options({"HERD_GRPC_MAX_CONNECTIONS": "5", "HERD_GRPC_CONNECTION_IDLE_S": "2.5"})) \
        == {"grpc.max_allowed_incoming_connections": 5, "grpc.max_connection_idle_ms": 2500}


def test_preload_keeps_the_modules_already_named():
    assert with_preload(None) == "cluster.grpc_proxy_preload"
    assert with_preload("a.b,c") == "a.b,c,cluster.grpc_proxy_preload"
    assert with_preload("cluster.grpc_proxy_preload,a") == "cluster.grpc_proxy_preload,a"


def test_the_preload_quiets_serves_log_of_answered_calls_in_every_worker():
    """What the chart's Ray workers import first (RAY_preload_python_modules) also puts StatusLogFilter on Serve's
    logger, so a KubeRay cluster's proxy logs refusals as a local herd serve's does (cluster.grpc_status);
    it imports neither Ray nor the engine."""
    import subprocess
    import sys

    code = ("import logging, sys; import cluster.grpc_proxy_preload; "
            "print([type(f).__name__ for f in logging.getLogger('ray.serve').filters], "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'workers', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['StatusLogFilter'] []"


async def _held_connections(server_class, monkeypatch, connections: int) -> int:
    """How many of `connections` idle HTTP/2 connections a server of `server_class` holds, with a cap of 3."""
    monkeypatch.setenv("HERD_GRPC_MAX_CONNECTIONS", "3")
    monkeypatch.setenv("HERD_GRPC_CONNECTION_IDLE_S", "60")
    server = server_class(None, (), (), [], None, None)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        def hold() -> int:
            held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
            for s in held:
                s.sendall(HTTP2_PREFACE)
            time.sleep(0.5)
            try:
                return sum(not closed_by_server(s, 0.1) for s in held)
            finally:
                for s in held:
                    s.close()
        return await asyncio.get_running_loop().run_in_executor(None, hold)
    finally:
        await server.stop(0)


@pytest.mark.asyncio
async def test_only_serves_proxy_server_is_capped(monkeypatch):
    from grpc.aio._server import Server

    install()
    install()  # idempotent: one wrapper

    class gRPCGenericServer(Server):  # noqa: N801 - the name of Serve's proxy server class is what counts
        pass

    assert getattr(Server.__init__, "herd_connection_options", False)
    assert await _held_connections(gRPCGenericServer, monkeypatch, 8) <= 3
    assert await _held_connections(Server, monkeypatch, 8) == 8
    assert grpc_proxy_connections.SERVE_PROXY_SERVER_CLASS == gRPCGenericServer.__name__


@pytest.mark.asyncio
async def test_a_capped_server_serves_calls(monkeypatch):
    from grpc.aio._server import Server

    install()

    class gRPCGenericServer(Server):  # noqa: N801
        pass

    monkeypatch.setenv("HERD_GRPC_MAX_CONNECTIONS", "3")
    server = gRPCGenericServer(None, (), (), [("grpc.max_receive_message_length", 1 << 20)], None, None)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)
