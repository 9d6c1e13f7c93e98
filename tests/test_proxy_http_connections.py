"""cluster.proxy_http_connections on a real uvicorn server (both of its HTTP protocols) over loopback sockets:
connections with no request in flight are closed after keep-alive from the start, and at the cap a new one
closes the longest idle, never a request in flight.

The keep-alive here is 1 s, so a connection's fate is decided in a second or two; no outcome depends on how
fast this machine is beyond "a loopback request is answered within a few seconds"."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest
import uvicorn

from cluster import proxy_http_connections
from cluster.proxy_http_connections import ConnectionLimits, install_http_connection_limits, max_connections_from_env
from tests.raw_sockets import closed_by_server
from tests.serve_fixtures import free_port

KEEP_ALIVE_S = 1
CAP = 6
# /slow's response takes this long: its connection has a request in flight all that while.
SLOW_S = 3.0
# Under h11's own bound (16 KiB), so both protocols meet this one.
HEAD_BYTES = 8192


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:                                    # the whole body first
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_S)
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=["httptools", "h11"])
def server(request, monkeypatch):
    """A uvicorn server on its own thread, with the limits installed (cap CAP, keep-alive 1 s)."""
    limits = ConnectionLimits(CAP, max_head_bytes=HEAD_BYTES)
    monkeypatch.setattr(proxy_http_connections, "_limits", None)
    install_http_connection_limits(limits=limits)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=request.param, lifespan="off",
                                       timeout_keep_alive=KEEP_ALIVE_S, log_level="critical", access_log=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port, limits
    uv.should_exit = True
    thread.join(timeout=30)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def request(s: socket.socket, path: str = "/") -> None:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def response(s: socket.socket, timeout_s: float = 10) -> bytes:
    s.settimeout(timeout_s)
    data = b""
    while not data.endswith(b"ok"):
        chunk = s.recv(65536)
        assert chunk, f"the server closed the connection before its response ended: {data!r}"
        data += chunk
    return data


def test_silent_and_half_sent_connections_are_closed_after_keep_alive(server):
    port, limits = server
    silent, half = connect(port), connect(port)
    half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")   # the head's blank line never comes
    assert closed_by_server(silent, KEEP_ALIVE_S + 3)
    assert closed_by_server(half, 3)
    assert limits.expired == 2


def test_a_request_in_flight_outlives_keep_alive_and_its_connection_then_idles_out(server):
    port, limits = server
    s = connect(port)
    request(s, "/slow")
    assert response(s, SLOW_S + 5).startswith(b"HTTP/1.1 200")   # open 3 s, past the 1 s keep-alive
    request(s)                                                     # still usable: keep-alive
    assert response(s).startswith(b"HTTP/1.1 200")
    assert closed_by_server(s, KEEP_ALIVE_S + 3)


def test_at_the_cap_a_new_connection_closes_the_longest_idle_one(server):
    port, limits = server
    idle = [connect(port) for _ in range(CAP)]
    time.sleep(0.2)                                # all registered, the first the longest idle
    newcomer = connect(port)
    request(newcomer)
    assert response(newcomer).startswith(b"HTTP/1.1 200")
    assert closed_by_server(idle[0], 0.5)
    assert not any(closed_by_server(s, 0.05) for s in idle[1:])
    assert limits.evicted == 1 and limits.refused == 0


def test_at_the_cap_requests_in_flight_are_never_cut_and_a_new_connection_is_refused(server):
    port, limits = server
    busy = [connect(port) for _ in range(CAP)]
    for s in busy:
        request(s, "/slow")
    time.sleep(0.5)                                # every head read: each has a request in flight
    late = connect(port)
    assert closed_by_server(late, 2)
    assert all(response(s, SLOW_S + 5).startswith(b"HTTP/1.1 200") for s in busy)
    assert limits.refused == 1 and limits.evicted == 0


def test_a_request_head_past_its_bound_is_refused_and_a_large_body_is_not(server):
    port, limits = server
    endless = connect(port)
    endless.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        for _ in range(1000):                      # 4 MiB, if the server went on reading
            endless.sendall(b"a" * 4096)
            time.sleep(0.001)
    assert limits.oversized == 1
    over = connect(port)                           # past the bound, then it waits: it reads the answer
    over.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (HEAD_BYTES + 1))
    over.settimeout(10)
    assert over.recv(65536).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert closed_by_server(over, 5) and limits.oversized == 2
    within = connect(port)
    within.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"a" * (HEAD_BYTES // 2) + b"\r\n\r\n")
    assert response(within).startswith(b"HTTP/1.1 200")
    body = b"b" * (1 << 20)                       # a head and a large body in one send: the body never counts
    within.sendall(b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    assert response(within).startswith(b"HTTP/1.1 200")
    assert limits.oversized == 2


def test_the_cap_is_read_from_the_environment_and_kept_within_its_share_of_open_files(monkeypatch):
    import resource

    share = int(resource.getrlimit(resource.RLIMIT_NOFILE)[0] * proxy_http_connections.OPEN_FILES_SHARE)
    assert max_connections_from_env({}) == min(proxy_http_connections.DEFAULT_MAX_CONNECTIONS, share)
    assert max_connections_from_env({"HERD_HTTP_MAX_CONNECTIONS": "7"}) == 7
    assert max_connections_from_env({"HERD_HTTP_MAX_CONNECTIONS": str(10 * share)}) == share


def test_eviction_skips_connections_that_started_a_request_since_they_were_idle():
    """The order is lazy: a connection that began a request is still in it until looked at."""
    class Cycle:
        response_complete = False

    class Transport:
        closed = False

        def is_closing(self):
            return self.closed

        def close(self):
            self.closed = True

    class Protocol:
        timeout_keep_alive = 5

        def __init__(self, connections):
            self.connections, self.transport, self.cycle = connections, Transport(), None
            connections.add(self)

    now = [0.0]
    limits = ConnectionLimits(2, clock=lambda: now[0])
    connections: set = set()
    first, second = Protocol(connections), Protocol(connections)
    limits.admit(first)
    limits.admit(second)
    first.cycle = Cycle()                          # first starts a request: busy, still first in the order
    third = Protocol(connections)
    assert limits.admit(third)
    assert second.transport.closed and not first.transport.closed
    now[0] = 10.0
    limits.sweep()                                 # third idle past keep-alive; first busy: left open
    assert third.transport.closed and not first.transport.closed
    with contextlib.suppress(KeyError):
        connections.remove(third)
    assert limits.expired == 1 and limits.evicted == 1
